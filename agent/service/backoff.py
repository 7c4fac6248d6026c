"""The backoff policy of timer passes, pure (tests/cases/backoff.json): a unit that keeps
failing is retried after `min(poll * 2**N, daemon.backoff_max)` following its N-th failure
in a row."""

from __future__ import annotations

from collections.abc import Iterable

from agent.state.store import UnitStatus

# Results that neither count as a failure nor reset the count.
_NEUTRAL = (UnitStatus.BLOCKED, UnitStatus.INTERRUPTED, UnitStatus.RUNNING)


def backoff_delay(failures: int, *, poll: float, backoff_max: float) -> float:
    """How long a timer waits after the `failures`-th failure in a row."""
    return min(poll * 2 ** min(failures, 32), backoff_max)


def backoff_state(
    history: Iterable[tuple[str, float | None]], now: float, *, poll: float, backoff_max: float
) -> str | None:
    """Where a unit stands from its results, newest first, as (status, when): "waiting" (it
    failed and its backoff has not passed), "due" (it has), or None (not failing)."""
    failures, last_failed = 0, None
    for status, when in history:
        if status in _NEUTRAL:
            continue
        if status != UnitStatus.FAILED:
            break
        failures += 1
        last_failed = last_failed or when
    if not failures or last_failed is None:
        return None
    delay = backoff_delay(failures, poll=poll, backoff_max=backoff_max)
    return "waiting" if now < last_failed + delay else "due"
