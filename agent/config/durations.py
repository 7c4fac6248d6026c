"""Durations as people write them in config files: `30s`, `5m`, `2h`, `1h30m`, or seconds."""

from __future__ import annotations

import math
import re

_UNITS = (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0))
_NUMBER = r"(\d+(?:\.\d+)?)"
_DURATION_RE = re.compile("".join(f"(?:{_NUMBER}{unit})?" for unit, _ in _UNITS))
_BARE_RE = re.compile(_NUMBER)

EXAMPLES = "30s, 5m, 2h"


def parse_duration(value: object) -> float | None:
    """Return the duration in seconds, or None if `value` is not a duration.

    Accepts a number of seconds (int or float, not bool) or a string such as `90`,
    `30s`, `5m`, `2h`, `1h30m` or `1d`. Negative and non-finite values are not durations;
    zero is (callers decide whether it is allowed).
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:
            return None
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    if not isinstance(value, str):
        return None
    text = value.strip()
    if _BARE_RE.fullmatch(text):
        seconds = float(text)
    else:
        match = _DURATION_RE.fullmatch(text)
        if not text or match is None:
            return None
        seconds = sum(
            float(amount) * factor
            for amount, (_, factor) in zip(match.groups(), _UNITS, strict=True)
            if amount is not None
        )
    return seconds if math.isfinite(seconds) else None


def format_duration(seconds: float) -> str:
    """Render seconds the way a person would write them: 7200 -> `2h`, 5400 -> `1h30m`."""
    if not math.isfinite(seconds) or seconds < 0:
        return f"{seconds}s"
    parts = []
    rest = round(seconds, 3)  # so 3599.9999 renders as 1h, not 59m60s
    for unit, factor in _UNITS[:-1]:
        whole = int(rest // factor)
        if whole:
            parts.append(f"{whole}{unit}")
            rest -= whole * factor
    if rest or not parts:
        parts.append(f"{round(rest, 3):g}s")
    return "".join(parts)
