"""Change windows: when a plan may apply (host config `windows:`, docs/policy.md).

A window is a span of local time in the configured time zone: weekdays and an
`HH:MM-HH:MM` range (a range whose end is not after its start runs past midnight, and
belongs to the day it starts), or a cron expression (croniter) whose matching minutes
are the window. Applies are allowed when the time is in some `allow` window (or no
`allow` is set) and in no `deny` window. Pure: the caller passes the time.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from zoneinfo import ZoneInfo

from croniter import croniter

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_HOURS_RE = re.compile(r"([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-4]):([0-5]\d)")
# How far ahead "opens ..." looks: a window that never opens in a week is reported as such.
LOOKAHEAD = dt.timedelta(days=8)
# How a closed window's hold reason begins (notifications recognise it).
WINDOW_CLOSED = "outside change window"


class FreezeDrift(StrEnum):
    """What drift does while the window is closed."""

    HOLD = "hold"  # the revert waits for the window (or an approval)
    REVERT = "revert"  # drift is reverted anyway (the unit's drift policy decides)


@dataclass(frozen=True, slots=True)
class Span:
    """One window: weekdays (0 = Monday) and minutes of the day, or a cron expression."""

    days: frozenset[int] = frozenset(range(7))
    start: int = 0  # minute of the day
    end: int = 24 * 60  # exclusive; <= start: runs past midnight
    cron: str | None = None

    def contains(self, local: dt.datetime) -> bool:
        if self.cron is not None:
            return _cron_contains(self.cron, local.replace(second=0, microsecond=0))
        minute = local.hour * 60 + local.minute
        day = local.weekday()
        if self.start < self.end:
            return day in self.days and self.start <= minute < self.end
        # Past midnight: the evening part on a listed day, the morning part on the day after.
        return (day in self.days and minute >= self.start) or (
            (day - 1) % 7 in self.days and minute < self.end
        )


@dataclass(frozen=True, slots=True)
class Windows:
    timezone: str
    allow: tuple[Span, ...] = ()
    deny: tuple[Span, ...] = ()
    drift: FreezeDrift = FreezeDrift.HOLD

    def is_open(self, now: dt.datetime) -> bool:
        """Whether a plan may apply at `now` (an aware datetime)."""
        local = now.astimezone(ZoneInfo(self.timezone))
        allowed = not self.allow or any(span.contains(local) for span in self.allow)
        return allowed and not any(span.contains(local) for span in self.deny)

    def next_open(self, now: dt.datetime) -> dt.datetime | None:
        """The first minute after `now` at which the window is open (within LOOKAHEAD)."""
        start = now.astimezone(ZoneInfo(self.timezone)).replace(second=0, microsecond=0)
        for minutes in range(1, int(LOOKAHEAD.total_seconds() // 60) + 1):
            moment = start + dt.timedelta(minutes=minutes)
            if self.is_open(moment):
                return moment
        return None

    def closed_reason(self, now: dt.datetime) -> str | None:
        """None when open; else "outside change window (opens ...)"."""
        if self.is_open(now):
            return None
        opens = self.next_open(now)
        when = (
            f"opens {opens:%a %Y-%m-%d %H:%M} {self.timezone}"
            if opens
            else f"does not open in the next {LOOKAHEAD.days} days"
        )
        return f"{WINDOW_CLOSED} ({when})"


@functools.lru_cache(maxsize=256)
def _cron_fields(expression: str) -> tuple[frozenset[int] | None, ...] | None:
    """The five fields as croniter expands them (None: `*`), or None when the expression
    uses what only croniter's own matcher knows (`L`, `#`)."""
    parsed = croniter(expression)
    if parsed.nth_weekday_of_month:
        return None
    fields: list[frozenset[int] | None] = []
    for values in parsed.expanded[:5]:
        if values == ["*"]:
            fields.append(None)
        elif all(isinstance(v, int) for v in values):
            fields.append(frozenset(values))
        else:
            return None
    return tuple(fields)


def _cron_contains(expression: str, local: dt.datetime) -> bool:
    # croniter.match costs ~1 ms a call: looking a week ahead minute by minute would take
    # seconds. The expanded fields are matched here instead, with cron's own rule that a
    # restricted day of month and day of week match either (croniter's day_or).
    fields = _cron_fields(expression)
    if fields is None:
        return bool(croniter.match(expression, local))
    minute, hour, dom, month, dow = fields
    if (minute is not None and local.minute not in minute) or (
        hour is not None and local.hour not in hour
    ):
        return False
    if month is not None and local.month not in month:
        return False
    weekday = (local.weekday() + 1) % 7  # cron: 0 is Sunday
    if dom is None or dow is None:
        return (dom is None or local.day in dom) and (dow is None or weekday in dow)
    return local.day in dom or weekday in dow


def parse_hours(text: str) -> tuple[int, int] | None:
    """`HH:MM-HH:MM` as minutes of the day (end 24:00 allowed), or None."""
    found = _HOURS_RE.fullmatch(text.replace(" ", ""))
    if not found:
        return None
    start = int(found.group(1)) * 60 + int(found.group(2))
    end = int(found.group(3)) * 60 + int(found.group(4))
    if end > 24 * 60 or start == end:
        return None
    return start, end


def parse_days(names: Sequence[str]) -> frozenset[int] | None:
    """Weekday names (`mon`..`sun`, or ranges like `mon-fri`), or None if one is unknown."""
    days: set[int] = set()
    for name in names:
        first, _, last = name.strip().lower().partition("-")
        if first not in WEEKDAYS or (last and last not in WEEKDAYS):
            return None
        a = WEEKDAYS.index(first)
        b = WEEKDAYS.index(last) if last else a
        days.update(range(a, b + 1) if a <= b else [*range(a, 7), *range(0, b + 1)])
    return frozenset(days)


def valid_cron(expression: str) -> bool:
    """A five-field cron expression croniter accepts."""
    return len(expression.split()) == 5 and bool(croniter.is_valid(expression))


def valid_timezone(name: str) -> bool:
    try:
        ZoneInfo(name)
    except (ValueError, KeyError, OSError):
        return False
    return True


MAX_REASON_CHARS = 200


def override_record(by: str, reason: object) -> str | None:
    """What a window override records: "by USER: REASON" (None: no override asked).

    Raises ValueError when the reason is missing or not one printable line."""
    if reason is None:
        return None
    if not isinstance(reason, str) or not reason.strip() or not reason.isprintable():
        raise ValueError("--override-window needs --reason TEXT (one printable line)")
    return f"by {by}: {reason.strip()[:MAX_REASON_CHARS]}"
