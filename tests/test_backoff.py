"""The daemon's backoff policy as a table (tests/cases/backoff.json): a unit that failed N
times in a row waits `min(poll * 2**N, backoff_max)` after its last failure before a timer
pass takes it again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.service.backoff import backoff_delay, backoff_state

CASES = json.loads((Path(__file__).parent / "cases" / "backoff.json").read_text())


@pytest.mark.parametrize("case", CASES, ids=[c["case"] for c in CASES])
def test_backoff_table(case: dict) -> None:
    history = [tuple(row) for row in case["history"]] * case.get("repeat", 1)
    state = backoff_state(history, case["now"], poll=case["poll"], backoff_max=case["backoff_max"])
    assert state == case["state"]


@pytest.mark.parametrize(
    ("failures", "delay"), [(1, 120), (2, 240), (3, 480), (4, 960), (5, 1800), (500, 1800)]
)
def test_the_delay_doubles_up_to_the_cap(failures: int, delay: float) -> None:
    assert backoff_delay(failures, poll=60, backoff_max=1800) == delay
