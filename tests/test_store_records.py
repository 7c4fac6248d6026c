"""What the run store keeps of a unit's result (tests/cases/records.json): in a real
SQLite file and a real PostgreSQL database. Each case starts from a unit that converged at
revision r1 with fingerprint f1 (or from nothing, with `first`), records the `before`
results, then the case's outcome at r2 / f2, and checks `unit_state`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.state.store import RunStore, UnitOutcome, UnitStatus

CASES = json.loads((Path(__file__).parent / "cases" / "records.json").read_text())


def _outcome(data: dict) -> UnitOutcome:
    return UnitOutcome(
        status=UnitStatus(data["status"]),
        decision=data.get("decision"),
        drift=data.get("drift", False),
        converged=data.get("converged", False),
        preview=data.get("preview", False),
    )


@pytest.mark.parametrize("case", CASES, ids=[c["case"] for c in CASES])
def test_what_a_result_records(open_store: Callable[..., RunStore], case: dict) -> None:
    store = open_store()
    if not case.get("first"):
        run = store.start_run(trigger="test")
        converged = UnitOutcome(UnitStatus.OK, "apply", converged=True)
        store.finish_unit(run, "u", "r1", converged, fingerprint="f1")
    for before in case["before"]:
        run = store.start_run(trigger="test")
        store.finish_unit(run, "u", "r1", _outcome(before), fingerprint="f1")
    outcome = _outcome(case["outcome"])
    run = store.start_run(trigger="test", dry_run=outcome.preview)
    store.finish_unit(run, "u", "r2", outcome, fingerprint="f2")
    state = store.unit_state("u")
    assert state is not None
    for key, expected in case["after"].items():
        assert getattr(state, key) == expected, key
    row = store.unit_runs(run)[0]
    assert row.preview is outcome.preview
