"""The shape every test server of tests/support shares: start(), stop(), and a `with` block."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class TestService:
    """A server a test starts and always stops: `with Server(...) as server:`."""

    __test__ = False  # not a test class, for pytest

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
