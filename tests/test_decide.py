"""The decision table: what happens to a unit's plan (tests/cases/decide.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.config import DestroyPolicy, DriftPolicy
from agent.units.decide import Decision, PlanFacts, decide, needs_plan

CASES = json.loads((Path(__file__).parent / "cases" / "decide.json").read_text())


@pytest.mark.parametrize("case", CASES, ids=[c["case"] for c in CASES])
def test_decision_table(case: dict) -> None:
    verdict = decide(
        PlanFacts(
            revision_moved=case["moved"],
            has_changes=case["changes"],
            destroys_anything=case["destroys"],
            resources_drifted=case.get("drifted", False),
        ),
        drift=DriftPolicy(case["drift"]),
        destroy=DestroyPolicy(case["destroy"]),
        dry_run=case["dry_run"],
    )
    assert verdict.decision is Decision(case["decision"])
    assert verdict.drift is case["is_drift"]
    assert verdict.overwrites_drift is case.get("overwrites_drift", False)
    assert verdict.reason


def test_ignore_skips_the_plan_only_at_an_unchanged_revision() -> None:
    assert not needs_plan(False, DriftPolicy.IGNORE)
    assert needs_plan(True, DriftPolicy.IGNORE)
    assert needs_plan(False, DriftPolicy.REPORT)
    assert needs_plan(False, DriftPolicy.REVERT)
