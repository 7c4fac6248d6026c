"""Secrets that Terraform word-wraps: masked whole in every place the redactor stands.

Terraform wraps a diagnostic's text (a precondition's `error_message`) at whitespace, at
78 columns without a terminal, so a secret with spaces comes out split over lines, with
the indentation (and, on a terminal, the `│ ` box) Terraform adds. First as a table of
shapes through the redactor and the streaming `LineRedactor`; then end to end: the
embedded Terraform, a real pass, and every place the secret could land (the streamed
lines, `plan.txt`, `agent.db`, `agent logs`). No mocks.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import load_host_config
from agent.core.progress import EventKind
from agent.core.redact import MASK, LineRedactor, Redactor
from agent.engine.reconcile import PassRequest, Reconciler
from agent.state.store import UnitStatus
from tests.support.infra import InfraRepo, embedded_terraform, write_host_config

# The issue's secret, and one long enough to span three wrapped lines.
HORSE = "correct horse battery staple 4eb30b69 zebra quantum"
LONG = (
    "amber-falcon 71c2 drifts over quiet harbour lanterns while 9d04e3 copper kites "
    "hum beneath violet tide-clocks and 5be8 glass otters"
)


def _split(value: str, breaks: set[int], sep: str) -> str:
    """`value` with a line break (`sep`: the break and the next line's prefix) after each
    word whose index is in `breaks`, as a wrapping writer lays it out."""
    words = value.split()
    return "".join(
        word + ("" if i == len(words) - 1 else sep if i in breaks else " ")
        for i, word in enumerate(words)
    )


def _fragments(value: str) -> list[str]:
    """What must not survive: the value, its distinctive words (with a digit or a hyphen:
    "while" is also in Terraform's own text), every pair of its words."""
    words = value.split()
    distinctive = [w for w in words if any(c.isdigit() or c == "-" for c in w)]
    return [value, *distinctive, *map(" ".join, itertools.pairwise(words))]


def _leaks(text: str, values: list[str]) -> list[str]:
    return [f for v in values for f in _fragments(v) if f in text]


@pytest.fixture
def redactor() -> Redactor:
    r = Redactor()
    r.register(HORSE)
    r.register(LONG)
    return r


def _streamed(redactor: Redactor, text: str) -> str:
    out: list[str] = []
    lines = LineRedactor(redactor, out.append)
    for line in text.split("\n"):
        lines(line)
    lines.flush()
    return "\n".join(out)


# The break and what Terraform puts before the next line: nothing, its indentation, the
# `│ ` box of a diagnostic on a terminal, both, a CRLF stream; trailing blanks too.
BREAKS = ["\n", "\n    ", "\n│ ", "\n│   ", "\r\n", "  \n  "]


@pytest.mark.parametrize("value", [HORSE, LONG], ids=["horse", "long"])
@pytest.mark.parametrize(
    "sep", BREAKS, ids=["plain", "indent", "box", "box-indent", "crlf", "blanks"]
)
def test_a_secret_wrapped_at_any_whitespace_is_masked_whole(
    redactor: Redactor, value: str, sep: str
) -> None:
    words = len(value.split())
    layouts = [{k} for k in range(words - 1)]  # over two lines, at every word
    layouts += [{k, k + 4} for k in range(words - 5)]  # over three lines
    for breaks in layouts:
        text = f"before\n│ The pool is {_split(value, breaks, sep)} which is refused.\nafter"
        for how, redacted in (
            ("redact", redactor.redact(text)),
            ("stream", _streamed(redactor, text)),
        ):
            assert _leaks(redacted, [value]) == [], (how, breaks, redacted)
            assert redacted == f"before\n│ The pool is {MASK} which is refused.\nafter"


def test_a_text_cut_inside_a_secret_masks_the_pieces(redactor: Redactor) -> None:
    # The last lines of a command's output can start in the middle of a wrapped secret,
    # and a truncated message can end in one.
    head = redactor.redact("battery staple 4eb30b69 zebra quantum which is refused\nnext")
    assert head == f"{MASK} which is refused\nnext"
    tail = redactor.redact("first\nthe pool is correct horse battery")
    assert tail == f"first\nthe pool is {MASK}"
    # A piece shorter than MIN_PART_LENGTH at an edge is left (a common short word).
    assert redactor.redact("amber-falcon? no: quantum") == "amber-falcon? no: quantum"


def test_the_stream_holds_only_lines_that_may_continue_a_secret(redactor: Redactor) -> None:
    out: list[str] = []
    lines = LineRedactor(redactor, out.append)
    lines("Plan: 1 to add")
    assert out == ["Plan: 1 to add"]  # passed on at once
    lines("the pool is correct")
    assert out == ["Plan: 1 to add"]  # may go on with "horse ..."
    lines("horse, said nobody")  # it does not: both lines pass on, unchanged
    assert out == ["Plan: 1 to add", "the pool is correct", "horse, said nobody"]
    lines("a value of correct horse battery")
    lines("staple 4eb30b69 zebra quantum, and then amber-falcon")
    # Both held: the second completes one secret and may start another (its last word).
    assert out[3:] == []
    lines("71c2 drifts over quiet harbour lanterns while 9d04e3 copper kites hum beneath")
    lines("violet tide-clocks and 5be8 glass otters.")
    assert out[3:] == [f"a value of {MASK}, and then {MASK}."]
    lines("done")
    lines.flush()
    assert out[-1] == "done"


def test_the_stream_gives_up_holding_after_max_held_lines() -> None:
    redactor = Redactor()
    redactor.register(" ".join(f"word{i:02d}" for i in range(40)))
    out: list[str] = []
    lines = LineRedactor(redactor, out.append, max_held=3)
    for i in range(5):
        lines(f"word{i:02d}")
    lines.flush()
    # The first three were cut and masked as a piece; the last two start a new text.
    assert out[0] == MASK and "word00" not in "\n".join(out)


def test_a_value_of_many_words_is_registered_and_masked() -> None:
    # The pieces' patterns nest a group per word: a long document must not overflow
    # Python's regex parser (it recursed past its limit at ~1,000 words).
    value = " ".join(f"w{i:04d}x" for i in range(1500))
    redactor = Redactor()
    redactor.register(value)
    cut = value.index(" ", 700)
    assert redactor.redact(f"a {value[:cut]}\n    {value[cut + 1 :]} b") == f"a {MASK} b"
    assert redactor.redact("w1498x w1499x and more") == f"{MASK} and more"


# --- end to end: the embedded Terraform and a real pass ---------------------------------

# Three resources put the secrets at different columns, so that Terraform breaks them at
# different words; every precondition fails, so the plan fails with their diagnostics.
STACK = """
variable "horse" {
  type = string
}
variable "long" {
  type = string
}
resource "terraform_data" "short_lead" {
  lifecycle {
    precondition {
      condition     = length(var.horse) < 0
      error_message = "The pool is ${var.horse} which is not allowed here at all, really."
    }
  }
}
resource "terraform_data" "long_lead" {
  lifecycle {
    precondition {
      condition     = length(var.horse) < 0
      error_message = join(" ", [
        "The password configured for the database connection pool is ${var.horse}",
        "which is not allowed.",
      ])
    }
  }
}
resource "terraform_data" "three_lines" {
  lifecycle {
    precondition {
      condition     = length(var.long) < 0
      error_message = "The phrase configured for the pool is ${var.long} which is refused."
    }
  }
}
"""


def test_terraform_wraps_the_secret_as_the_issue_says(tmp_path: Path) -> None:
    """The reproduction, without the agent: the raw output splits both secrets."""
    (tmp_path / "main.tf").write_text(STACK)
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "CHECKPOINT_DISABLE": "1",
        "TF_CLI_CONFIG_FILE": os.devnull,
        "TF_VAR_horse": HORSE,
        "TF_VAR_long": LONG,
    }
    terraform = embedded_terraform()
    for args in (["init", "-no-color", "-input=false"], ["plan", "-no-color", "-input=false"]):
        done = subprocess.run(
            [terraform, *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    output = done.stdout + done.stderr
    assert done.returncode == 1
    # The issue's `...pool is correct horse` / `battery staple 4eb30b69 zebra quantum ...`
    assert any(line.endswith(" correct horse") for line in output.splitlines()), output
    assert any(line.startswith("battery staple") for line in output.splitlines())
    # The long one over three lines (it is also quoted whole, in the expression values).
    lines = output.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("The phrase"))
    assert lines[first].endswith(" amber-falcon 71c2 drifts over quiet")
    assert lines[first + 1].startswith("harbour") and lines[first + 2].startswith("5be8")


@pytest.fixture
def wrapped_world(tmp_path: Path) -> Path:
    secrets = tmp_path / "secrets"
    secrets.mkdir(mode=0o700)
    for name, value in (("horse", HORSE), ("long", LONG)):
        (secrets / name).write_text(value)
        (secrets / name).chmod(0o600)
    repo = InfraRepo(tmp_path / "git")
    repo.write("stacks/wrap/main.tf", STACK)
    repo.write(
        "gitops.yaml",
        f"""\
        version: 1
        units:
          - name: wrap
            stack: stacks/wrap
            secrets: {{horse: "file:{secrets}/horse", long: "file:{secrets}/long"}}
        """,
    )
    repo.push("wrapped secrets")
    extra = f"""\
        secrets:
          allowed: ["file:{secrets}/"]
        """
    return write_host_config(tmp_path / "agent.yaml", repo.url, tmp_path / "state", extra)


def test_a_wrapped_secret_reaches_nothing_the_agent_writes_or_prints(
    wrapped_world: Path, tmp_path: Path
) -> None:
    streamed: list[str] = []

    def reporter(event: object) -> None:
        if getattr(event, "kind", None) is EventKind.UNIT_LINE:
            streamed.append(event.message)  # type: ignore[attr-defined]

    reconciler = Reconciler(load_host_config(wrapped_world), reporter=reporter)
    try:
        result = reconciler.run_pass(PassRequest(trigger="test"))
    finally:
        reconciler.close()
    outcome = result.outcomes["wrap"]
    assert outcome.status is UnitStatus.FAILED
    assert f"pool is {MASK} which" in (outcome.error or "")

    state = tmp_path / "state"
    plan_txt = next(state.glob("runs/*/wrap/plan.txt")).read_text(encoding="utf-8")
    assert "Resource precondition failed" in plan_txt
    assert plan_txt.count(MASK) >= 3
    stream = "\n".join(streamed)
    assert stream.count(MASK) >= 3

    env = {**os.environ, "GITOPS_AGENT_CONFIG": str(wrapped_world)}
    printed = []
    for args in (("logs", "wrap"), ("logs", "wrap", "--json"), ("history", "--json")):
        done = subprocess.run(
            [sys.executable, "-m", "agent.cli", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )
        printed.append(done.stdout + done.stderr)
    assert MASK in printed[0]

    db = sqlite3.connect(state / "agent.db")
    try:
        rows = "\n".join(
            str(row)
            for table in ("runs", "unit_runs")
            for row in db.execute(f"SELECT * FROM {table}")
        )
    finally:
        db.close()
    assert MASK in rows
    raw_db = b"".join(p.read_bytes() for p in state.glob("agent.db*")).decode("utf-8", "replace")

    places = {
        "streamed": stream,
        "plan.txt": plan_txt,
        "agent logs": "\n".join(printed),
        "agent.db rows": rows,
        "agent.db files": raw_db,
        "outcome": outcome.error or "",
    }
    leaks = {where: _leaks(text, [HORSE, LONG]) for where, text in places.items()}
    assert leaks == {where: [] for where in places}
