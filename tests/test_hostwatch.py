"""The new-hosts schedule (agent/service/hostwatch.py) as a table: pure functions, no hosts."""

from __future__ import annotations

import pytest

from agent.service.hostwatch import HostsDecision, Tracked, after_attempt, retry_delay, schedule

OK = Tracked(converged=True)

# tracked, listed, now -> (converge, dropped, waiting)
CASES = [
    ("nothing known, two listed", {}, ["b", "a"], 0, (("a", "b"), (), ())),
    ("converged hosts are left to the passes", {"a": OK}, ["a"], 0, ((), (), ())),
    ("one new beside a converged one", {"a": OK}, ["a", "b"], 0, (("b",), (), ())),
    (
        "a failed host not due yet waits",
        {"a": Tracked(False, attempts=1, next_try=10)},
        ["a"],
        5,
        ((), (), ("a",)),
    ),
    (
        "a failed host is retried once due",
        {"a": Tracked(False, attempts=2, next_try=10)},
        ["a"],
        10,
        (("a",), (), ()),
    ),
    ("a host that left is dropped", {"a": OK, "b": OK}, ["b"], 0, ((), ("a",), ())),
    (
        "a failing host that left is dropped, not retried",
        {"a": Tracked(False, attempts=3, next_try=0)},
        [],
        100,
        ((), ("a",), ()),
    ),
    ("the same name listed twice is one host", {}, ["a", "a"], 0, (("a",), (), ())),
]


@pytest.mark.parametrize(
    ("tracked", "listed", "now", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_schedule(tracked: dict, listed: list, now: float, expected: tuple) -> None:
    assert schedule(tracked, listed, now) == HostsDecision(*expected)


@pytest.mark.parametrize(
    ("attempts", "delay"), [(0, 0.0), (1, 10.0), (2, 20.0), (3, 40.0), (6, 320.0), (7, 600.0)]
)
def test_retry_delay_doubles_up_to_the_cap(attempts: int, delay: float) -> None:
    assert retry_delay(attempts) == delay
    assert retry_delay(10_000) == 600.0


def test_after_attempt_counts_failures_and_forgets_them_on_success() -> None:
    first = after_attempt(None, False, 100.0)
    assert first == Tracked(False, attempts=1, next_try=110.0)
    second = after_attempt(first, False, 110.0)
    assert second == Tracked(False, attempts=2, next_try=130.0)
    assert after_attempt(second, True, 130.0) == OK
    assert after_attempt(None, False, 0.0, base=1.0, cap=1.5) == Tracked(False, 1, 1.0)
