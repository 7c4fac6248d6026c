"""What a proposal plan says on its forge: the commit status and the comment, from store
rows and plan logs as the planner leaves them (a table of cases; pure functions)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.service.proposal_forge import MAX_UNIT_CHARS, change_number, comment_of, status_of
from agent.state.proposals import ProposalRow, ProposalUnitRow

HEAD, BASE = "a" * 40, "b" * 40


def unit(name: str, status: str, counts=(None, None, None), detail=None) -> ProposalUnitRow:
    return ProposalUnitRow("refs/pull/7/head", name, HEAD, "p-1", status, *counts, detail, 0.0)


def row(status: str, *units: ProposalUnitRow, detail: str | None = None) -> ProposalRow:
    return ProposalRow(
        "refs/pull/7/head", HEAD, BASE, "A <a@x>", status, detail, "p-1", 0.0, 1.0, units
    )


WAITING = "a main pass holds a unit's state; planned again at the next poll"
CASES = [
    (
        row("planned", unit("app", "changes", (2, 1, 0)), unit("web", "no-changes", (0, 0, 0))),
        ("success", "plan +2 ~1 -0"),
    ),
    (row("planned"), ("success", "no unit affected")),
    (
        row("planned", unit("app", "failed", detail="boom"), unit("db", "changes", (0, 0, 1))),
        ("failure", "plan failed: app; +0 ~0 -1"),
    ),
    (
        row("planned", unit("db", "skipped", detail="skipped: needs secrets")),
        ("success", "plan +0 ~0 -0"),
    ),
    (
        row("invalid", detail="gitops.yaml:2: units[0]: bad\nmore"),
        ("failure", "gitops.yaml:2: units[0]: bad"),
    ),
    (
        row("refused", detail="author m@x is not allowed"),
        ("failure", "not planned: author m@x is not allowed"),
    ),
    (row("incomplete", unit("app", "skipped")), ("pending", WAITING)),
]


@pytest.mark.parametrize(("proposal", "expected"), CASES)
def test_commit_status(proposal: ProposalRow, expected: tuple[str, str]) -> None:
    assert status_of(proposal) == expected


@pytest.mark.parametrize(
    ("ref", "number"),
    [
        ("refs/pull/7/head", 7),
        ("refs/merge-requests/12/head", 12),
        ("refs/heads/feature/x", None),
        ("refs/pull/7/merge", None),
    ],
)
def test_change_number(ref: str, number: int | None) -> None:
    assert change_number(ref) == number


def test_the_comment_shows_each_plan_capped_and_fenced(tmp_path: Path) -> None:
    runs = tmp_path / "runs" / "p-1"
    (runs / "app").mkdir(parents=True)
    (runs / "app" / "plan.txt").write_text("```` tricky\n" + "x" * (MAX_UNIT_CHARS + 50))
    proposal = row(
        "planned",
        unit("app", "changes", (1, 0, 0)),
        unit("db", "skipped", detail="skipped: needs secrets (a|b)"),
    )

    text = comment_of(proposal, tmp_path)

    assert "| app | changes +1 ~0 -0 |" in text
    assert "| db | skipped (skipped: needs secrets (a\\|b)) |" in text
    assert "`````text\n```` tricky" in text  # a longer fence than any run in the plan
    assert "... (62 more characters)" in text  # the first line counts too
    assert text.endswith("`agent logs UNIT --proposal refs/pull/7/head` on the bastion.")
