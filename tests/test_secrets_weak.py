"""Secret values too short or too common to mask: refused (or, if allowed, warned about).

A secret `true` would turn `enabled = true` into `enabled = ***`, and a repository author
could print candidates and see which one is masked. The rule as a table, then real passes
(the `file:` backend, the embedded Terraform) with and without
`secrets.allow_weak_values`. No mocks.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from agent.config import load_host_config
from agent.core.redact import MASK, MIN_SECRET_LENGTH, weak_value
from agent.engine.reconcile import PassRequest, Reconciler
from agent.errors import ConfigError
from agent.state.store import UnitStatus
from tests.support.docblocks import block
from tests.support.infra import InfraRepo, write_host_config


@pytest.mark.parametrize(
    ("value", "weak"),
    [
        ("", True),
        ("a", True),
        ("true", True),
        ("1234", True),
        ("k9Zq7X2", True),  # 7 characters
        ("  k9Zq7X2  \n", True),  # surrounding whitespace does not count
        ("password", True),
        ("PassWord", True),  # compared case-insensitively
        ("changeme", True),
        ("12345678", True),
        ("xxxxxxxxxxxxxxxx", True),  # one character repeated
        ("k9Zq7X2m", False),  # 8 characters
        ("97310428655", False),
        ("correct horse battery staple", False),
        ("password-for-the-db-2f9c", False),  # contains a common word: fine
    ],
)
def test_weak_value(value: str, weak: bool) -> None:
    assert weak_value(value) is weak


def test_the_minimum_is_what_the_docs_say() -> None:
    docs = (Path(__file__).resolve().parent.parent / "docs" / "secrets.md").read_text()
    assert f"at least {MIN_SECRET_LENGTH} characters" in docs
    assert "allow_weak_values" in docs


# --- real passes ----------------------------------------------------------------------

STRONG = "k9Zq7X2m-strong-value"
# The stack prints `true` and some guesses of its own: with the weak secret refused and not
# registered, none of them is masked, so printing them tells nothing.
STACK = """
variable "flag" {
  type = string
}
resource "terraform_data" "x" {
  input = { enabled = true, guesses = ["true", "1234", "yes"] }
}
"""
GUESSES = """
resource "terraform_data" "g" {
  input = { enabled = true, guesses = ["true", "1234", "yes"] }
}
"""
STRONG_STACK = """
variable "token" {
  type = string
}
resource "terraform_data" "s" {
  input = "ok"
}
"""


def _world(tmp_path: Path, extra: str = "") -> Path:
    secrets = tmp_path / "secrets"
    secrets.mkdir(mode=0o700)
    for name, value in (("flag", "true"), ("token", STRONG)):
        (secrets / name).write_text(value + "\n")
        (secrets / name).chmod(0o600)
    repo = InfraRepo(tmp_path / "git")
    repo.write("stacks/weak/main.tf", STACK)
    repo.write("stacks/after/main.tf", GUESSES)
    repo.write("stacks/guesses/main.tf", GUESSES)
    repo.write("stacks/strong/main.tf", STRONG_STACK)
    repo.write(
        "gitops.yaml",
        f"""\
        version: 1
        units:
          - {{name: weak, stack: stacks/weak, secrets: {{flag: "file:{secrets}/flag"}}}}
          - {{name: after, stack: stacks/after, depends_on: [weak]}}
          - {{name: guesses, stack: stacks/guesses}}
          - {{name: strong, stack: stacks/strong, secrets: {{token: "file:{secrets}/token"}}}}
        """,
    )
    repo.push("weak secret")
    return write_host_config(
        tmp_path / "agent.yaml",
        repo.url,
        tmp_path / "state",
        f"""\
        secrets:
          allowed: ["file:{secrets}/"]
        """
        + extra,
    )


def _run(config: Path):
    reconciler = Reconciler(load_host_config(config))
    try:
        return reconciler.run_pass(PassRequest(trigger="test"))
    finally:
        reconciler.close()


def _plan(tmp_path: Path, unit: str) -> str:
    return next((tmp_path / "state").glob(f"runs/*/{unit}/plan.txt")).read_text()


def test_a_weak_secret_fails_its_unit_before_planning(tmp_path: Path) -> None:
    result = _run(_world(tmp_path))
    weak = result.outcomes["weak"]
    assert weak.status is UnitStatus.FAILED
    ref = f"file:{tmp_path}/secrets/flag"
    assert f"secret 'flag' ({ref}) is too short or too common" in (weak.error or "")
    assert f"at least {MIN_SECRET_LENGTH} characters" in (weak.error or "")
    assert "allow_weak_values" in (weak.error or "")
    # The message is the one docs/secrets.md quotes (its unit and reference aside).
    quoted = block("output", "weak-secret").text.strip()
    assert quoted.replace("unit app:", "unit weak:").replace("vault:kv/prod/app#flag", ref) == (
        weak.error
    )
    # Nothing was planned for it; its dependent is blocked; the others ran.
    assert not list((tmp_path / "state").glob("runs/*/weak/plan.txt"))
    assert result.outcomes["after"].status is UnitStatus.BLOCKED
    assert result.outcomes["strong"].status is UnitStatus.OK
    assert result.outcomes["guesses"].status is UnitStatus.OK
    # The refused value is not masked anywhere: `true` stays `true`, and no guess is told.
    plan = _plan(tmp_path, "guesses")
    assert "enabled = true" in plan and '"true"' in plan and MASK not in plan


def test_allow_weak_values_uses_it_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    result = _run(_world(tmp_path, "  allow_weak_values: true\n"))
    assert result.outcomes["weak"].status is UnitStatus.OK
    ref = f"file:{tmp_path}/secrets/flag"
    warnings = [r.getMessage() for r in caplog.records if "allow_weak_values" in r.getMessage()]
    assert warnings == [
        f"secret {ref} is too short or too common to be masked safely in output;"
        " used because secrets.allow_weak_values is true"
    ]
    # Registered, so masked (as a whole word, the cost of allowing it).
    assert "enabled = ***" in _plan(tmp_path, "weak")


def test_allow_weak_values_is_validated(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    write_host_config(
        config,
        "file:///nowhere",
        tmp_path / "state",
        """\
        secrets:
          allowed: []
          allow_weak_values: "yes"
        """,
    )
    with pytest.raises(ConfigError) as caught:
        load_host_config(config)
    text = str(caught.value)
    line = next(
        number
        for number, content in enumerate(config.read_text().splitlines(), start=1)
        if content.strip().startswith("allow_weak_values:")
    )
    assert f"agent.yaml:{line}" in text and "secrets.allow_weak_values" in text
    assert "true or false" in text
    assert os.path.basename(config) in text
