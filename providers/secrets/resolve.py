"""Fetch many references at once: in parallel, each distinct one once, retried while it helps.

A retryable error (sealed, throttled, timed out, unreachable) is retried with exponential
backoff and jitter (0.2 s doubling up to 5 s) until `retry_for` seconds have passed since
the call began; then the last error is the answer for that reference. An error that needs a
person (denied, missing, malformed) is the answer at once. Nothing here raises for a single
reference: the caller gets, per reference, the value or the error, and decides.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from providers.errors import SecretBackendError
from providers.secrets.refs import SecretRef

__all__ = ["BACKOFF_CAP", "BACKOFF_START", "Backend", "resolve_all"]

log = logging.getLogger(__name__)

BACKOFF_START = 0.2
BACKOFF_CAP = 5.0


class Backend(Protocol):
    def read(self, ref: SecretRef) -> str: ...


def _read_once(ref: SecretRef, backend_for: Callable[[SecretRef], Backend]) -> str:
    try:
        return backend_for(ref).read(ref)
    except SecretBackendError:
        raise
    except Exception as exc:
        # A bug or an unmapped library error. Its text could quote anything a library saw,
        # so only its type goes into the message; the traceback goes to the debug log.
        log.debug("unexpected error reading %s", ref.raw, exc_info=True)
        raise SecretBackendError(
            f"{ref.raw}: unexpected error ({type(exc).__name__})", ref=ref.raw
        ) from None


def _resolve_one(
    ref: SecretRef,
    backend_for: Callable[[SecretRef], Backend],
    deadline: float,
) -> str | SecretBackendError:
    delay = BACKOFF_START
    attempt = 1
    while True:
        try:
            return _read_once(ref, backend_for)
        except SecretBackendError as exc:
            remaining = deadline - time.monotonic()
            if not exc.retryable or remaining <= 0:
                return exc
            pause = min(delay * random.uniform(0.5, 1.0), remaining)
            # Only the reference and the kind of failure: the backend's own text may quote a
            # secret that another reference of this pass has not yet registered for redaction.
            log.info("%s: %s (attempt %d); retrying in %.1f s", ref.raw, exc.kind, attempt, pause)
            time.sleep(pause)
            delay = min(delay * 2, BACKOFF_CAP)
            attempt += 1


def resolve_all(
    refs: Iterable[SecretRef],
    backend_for: Callable[[SecretRef], Backend],
    *,
    max_workers: int = 8,
    retry_for: float = 30.0,
) -> dict[str, str | SecretBackendError]:
    """For each distinct `ref.raw`: its value, or the SecretBackendError that explains why not."""
    distinct: dict[str, SecretRef] = {}
    for ref in refs:
        distinct.setdefault(ref.raw, ref)
    if not distinct:
        return {}
    deadline = time.monotonic() + max(retry_for, 0.0)
    workers = max(1, min(max_workers, len(distinct)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="secret") as pool:
        futures = {
            raw: pool.submit(_resolve_one, ref, backend_for, deadline)
            for raw, ref in distinct.items()
        }
        return {raw: future.result() for raw, future in futures.items()}
