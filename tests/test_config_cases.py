"""Bad config files and the exact errors a user sees, as a table; and fuzzing.

Each case is `tests/cases/config/<kind>/NAME.yaml` with `NAME.expected` beside it:
the full error message, one line per error. Manifest cases are checked against the
repository built by `case_repo` with the limits in `LIMITS`; host cases resolve
relative paths against `/etc/gitops-agent` (nothing is read from there).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import (
    ConfigValidationError,
    ManifestLimits,
    load_host_config,
    load_manifest,
    parse_host_config,
    parse_manifest,
)
from agent.errors import ConfigError

CASES_DIR = Path(__file__).parent / "cases" / "config"
LIMITS = ManifestLimits(allowed_paths=("stacks",), max_unit_timeout=7200.0)
HOST_BASE_DIR = Path("/etc/gitops-agent")
CASE_VARIABLES = ("region", "loop", "script", "ids", "vpc_id")


def _cases(kind: str) -> list[Path]:
    return sorted((CASES_DIR / kind).glob("*.yaml"))


def build_case_repo(root: Path) -> Path:
    """The repository the manifest cases refer to."""
    repo = root / "repo"
    for stack in ("base", "web", "network"):
        (repo / "stacks" / stack).mkdir(parents=True)
        (repo / "stacks" / stack / "main.tf").write_text(
            "# a stack, with the variables the cases give it\n"
            + "".join(f'variable "{name}" {{}}\n' for name in CASE_VARIABLES)
        )
    (repo / "stacks" / "empty").mkdir()
    (repo / "stacks" / "empty" / "README.md").write_text("no terraform here\n")
    (repo / "other" / "outside").mkdir(parents=True)
    (repo / "other" / "outside" / "main.tf").write_text("# not under allowed_paths\n")
    (root / "elsewhere").mkdir()
    (root / "elsewhere" / "main.tf").write_text("# outside the repository\n")
    (repo / "stacks" / "escape").symlink_to(root / "elsewhere")
    (repo / "stacks" / "sneaky").symlink_to(Path("..") / "other" / "outside")
    return repo


@pytest.fixture(scope="module")
def case_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_case_repo(tmp_path_factory.mktemp("cases"))


def test_the_table_covers_enough_cases() -> None:
    assert len(_cases("manifest")) + len(_cases("host")) >= 25
    for case in [*_cases("manifest"), *_cases("host")]:
        assert case.with_suffix(".expected").is_file(), f"{case.name} has no .expected"


@pytest.mark.parametrize("case", _cases("manifest"), ids=lambda path: path.stem)
def test_manifest_case(case: Path, case_repo: Path) -> None:
    expected = case.with_suffix(".expected").read_text().strip()
    with pytest.raises(ConfigValidationError) as caught:
        parse_manifest(case.read_text(), "gitops.yaml", case_repo, LIMITS)
    assert str(caught.value) == expected
    assert caught.value.errors == expected.splitlines()


@pytest.mark.parametrize("case", _cases("host"), ids=lambda path: path.stem)
def test_host_case(case: Path) -> None:
    expected = case.with_suffix(".expected").read_text().strip()
    with pytest.raises(ConfigValidationError) as caught:
        parse_host_config(case.read_text(), "agent.yaml", HOST_BASE_DIR)
    assert str(caught.value) == expected
    assert caught.value.errors == expected.splitlines()


# Fuzzing: whatever the input, the only exception is ConfigError.

_FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
_KEYS = [
    "version", "defaults", "units", "name", "stack", "depends_on", "drift", "timeout",
    "vars", "labels", "from_stack", "unit", "output", "repo", "url", "branch",
    "known_hosts", "intervals", "poll", "terraform", "parallelism", "allowed_paths",
    "policy", "destroy", "max_unit_timeout", "state_dir", "TF_X", "x y",
]  # fmt: skip
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.sampled_from(["1", "stacks/base", "../etc", "/etc", "5m", "revert", "base", "web"]),
    st.sampled_from(["ssh://h/x", "git@h:x", "file:///x", "hold", "-x", "stacks/escape"]),
    st.text(max_size=12),
)
_DOCUMENTS = st.recursive(
    _SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=5), children, max_size=5),
    ),
    max_leaves=25,
)
_VALID_MANIFEST = (
    "version: 1\ndefaults: {drift: report}\nunits:\n"
    "  - name: base\n    stack: stacks/base\n    vars: {a: [1, {b: c}]}\n"
    "  - name: web\n    stack: stacks/web\n    depends_on: [base]\n"
    "    vars: {x: {from_stack: {unit: base, output: o}}}\n    labels: {team: infra}\n"
)


def _check(parse: Callable[..., object], *args: object) -> None:
    """Any outcome but an exception other than ConfigError is fine."""
    with contextlib.suppress(ConfigError):
        parse(*args)


@_FUZZ
@given(document=_DOCUMENTS)
def test_fuzz_structured_documents(document: object, case_repo: Path) -> None:
    text = yaml.safe_dump(document)
    _check(parse_manifest, text, "gitops.yaml", case_repo, LIMITS)
    _check(parse_host_config, text, "agent.yaml", HOST_BASE_DIR)
    wrapped = yaml.safe_dump({"version": 1, "units": [document]})
    _check(parse_manifest, wrapped, "gitops.yaml", case_repo, LIMITS)
    wrapped = yaml.safe_dump({"repo": document, "terraform": document})
    _check(parse_host_config, wrapped, "agent.yaml", HOST_BASE_DIR)


@_FUZZ
@given(text=st.text(alphabet=st.sampled_from(list("ab:-[]{},&*!|>'\"#\n\t .1%@?")), max_size=80))
def test_fuzz_yaml_punctuation(text: str, case_repo: Path) -> None:
    _check(parse_manifest, text, "gitops.yaml", case_repo, LIMITS)
    _check(parse_host_config, text, "agent.yaml", HOST_BASE_DIR)


@_FUZZ
@given(position=st.integers(min_value=0), junk=st.text(max_size=6))
def test_fuzz_mutated_valid_manifest(position: int, junk: str, case_repo: Path) -> None:
    at = position % (len(_VALID_MANIFEST) + 1)
    for text in (_VALID_MANIFEST[:at] + junk + _VALID_MANIFEST[at:], _VALID_MANIFEST[:at]):
        _check(parse_manifest, text, "gitops.yaml", case_repo, LIMITS)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@_FUZZ
@given(data=st.binary(max_size=120))
def test_fuzz_bytes_from_disk(data: bytes, scratch: Path) -> None:
    (scratch / "gitops.yaml").write_bytes(data)
    _check(load_manifest, scratch, LIMITS)
    (scratch / "agent.yaml").write_bytes(data)
    _check(load_host_config, scratch / "agent.yaml")
