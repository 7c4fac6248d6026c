"""Small helpers for the words of messages (shared by `agent` and `providers`)."""

from __future__ import annotations


def plural(count: int, word: str, many: str | None = None) -> str:
    """`1 round trip`, `3 round trips`, `0 errors`: a count with its noun agreeing.

    `many` is the plural when it is not `word` + "s" (`plural(n, "entry", "entries")`).
    For a phrase, the noun is the last word: `plural(2, "round trip")` -> `2 round trips`.
    """
    return f"{count} {word if count == 1 else (many or word + 's')}"
