"""Notifications: what a pass did (apply, failure, drift, hold), sent to webhooks, Slack, and
through apprise to Microsoft Teams, email, PagerDuty, Opsgenie and the rest it speaks.

`Notifier.send` never blocks the pass: it queues the event for each sink that wants its
kind. One background thread per sink delivers with urllib, so a sink that is down delays
no other. A delivery is retried on 408/429/5xx and connection errors, with exponential
backoff and jitter, honouring `Retry-After`, for at most `retry_for_s`; then it is given
up with one log line. Any other answer (400, 403, 404, 410, a redirect) is not retried.
A full queue drops its oldest event, and counts it. A failure, drift or hold that repeats
one sent within the hour (a unit failing at every poll) is not sent again.

An `apprise` sink takes an apprise URL (`msteams://`, `mailtos://`, `pagerduty://`...);
`agent.service.apprise_sink` delivers it a title and a plain-text body built from the same
redacted payload, with the same queue, retries and repeat suppression as the others.

A sink's URL is a credential (a Slack webhook URL is the whole secret; other webhooks carry
tokens in the path or query): logs and errors name a sink by kind and host only, and the
URL stays out of `repr`. Every string of a payload is redacted (with the redactor the
caller passes) before it is serialized, at delivery time, so a secret registered after the
event was queued is masked too.
"""

from __future__ import annotations

import email.utils
import json
import logging
import random
import re
import socket
import ssl
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import urlsplit

from agent import __version__
from agent.core.redact import Redactor
from agent.errors import ConfigError
from agent.policy.windows import WINDOW_CLOSED
from agent.state.store import UnitOutcome, UnitStatus
from providers.text import plural

log = logging.getLogger(__name__)

EVENT_KINDS: Final = frozenset({"apply", "failure", "drift", "hold"})
SINK_KINDS: Final = frozenset({"webhook", "slack", "apprise"})
# Kinds that a pass can report again and again for the same cause (see Notifier._is_repeat).
_REPEATABLE: Final = frozenset({"failure", "drift", "hold"})

# Slack's Block Kit limits (docs.slack.dev/reference/block-kit/blocks): a header's
# plain_text holds 150 characters, a section's text 3000, a section field 2000.
SLACK_HEADER_MAX: Final = 150
SLACK_SECTION_MAX: Final = 3000
SLACK_FIELD_MAX: Final = 2000
SLACK_TEXT_MAX: Final = 3000  # the notification fallback text: a line, not a document
MAX_RESPONSE_BYTES: Final = 64 * 1024
_USER_AGENT: Final = f"gitops-agent/{__version__}"
_RETRY_STATUSES: Final = frozenset({408, 429})
# A response body short and plain enough to quote in a log line (Slack's `invalid_payload`,
# `channel_is_archived`): no slashes or query characters, so it cannot carry the URL.
_QUOTABLE_BODY = re.compile(r"[A-Za-z0-9_ .,:-]{1,80}")

_TITLES: Final = {
    "apply": (":white_check_mark:", "Applied"),
    "failure": (":x:", "Failed"),
    "drift": (":warning:", "Drift found"),
    "hold": (":double_vertical_bar:", "Held for approval"),
}


@dataclass(frozen=True)
class NotificationSink:
    """Where notifications go, and which kinds of event it wants."""

    kind: str  # "webhook" (generic JSON) | "slack" (incoming-webhook format) | "apprise"
    # May itself be a secret (Slack's are): never logged, never in repr.
    url: str = field(repr=False)
    events: frozenset[str] = EVENT_KINDS
    timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if self.kind not in SINK_KINDS:
            raise ConfigError(
                f"notification sink {self.kind!r} at {self.host}: expected kind"
                f" {' or '.join(sorted(SINK_KINDS))}"
            )
        parts = urlsplit(self.url)
        if self.kind == "apprise":
            from agent.service.apprise_sink import apprise_scheme_ok  # apprise loads only when used

            if not apprise_scheme_ok(self.url):
                raise ConfigError(
                    f"apprise notification sink {self.host}: apprise has no service for this"
                    " URL, or cannot read it (the URL is not shown: it may be a credential)",
                    hint="see https://github.com/caronc/apprise/wiki for each service's URL",
                )
        elif parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"{self.kind} notification sink: expected an http:// or https:// URL with a"
                f" host; got a URL with scheme {parts.scheme or 'none'!r}"
                f" and host {parts.hostname or 'none'!r}"
            )
        unknown = set(self.events) - EVENT_KINDS
        if unknown or not self.events:
            raise ConfigError(
                f"{self.kind} notification sink at {self.host}: events must be a non-empty"
                f" subset of {', '.join(sorted(EVENT_KINDS))}; got"
                f" {', '.join(sorted(self.events)) or 'none'}"
            )
        if not self.timeout_s > 0:
            raise ConfigError(
                f"{self.kind} notification sink at {self.host}: timeout must be above 0 s"
            )

    @property
    def host(self) -> str:
        """The URL's host and port: no user, path or query (they may hold tokens). For an
        apprise URL, only its scheme: many put a token where the host would be."""
        if self.kind == "apprise":
            scheme = urlsplit(self.url).scheme
            return f"{scheme if scheme.isalnum() else '?'}://…"
        try:
            parts = urlsplit(self.url)
            host = parts.hostname or "?"
            port = parts.port
        except ValueError:  # a port that is not a number
            return "?"
        host = f"[{host}]" if ":" in host else host
        return f"{host}:{port}" if port else host

    @property
    def label(self) -> str:
        """How logs name this sink: `slack sink hooks.slack.com`."""
        return f"{self.kind} sink {self.host}"


@dataclass(frozen=True)
class Event:
    """Something a person should hear about: a unit applied, failed, drifted or is held."""

    kind: str  # apply | failure | drift | hold
    unit: str
    run_id: int | str
    revision: str | None
    summary: str  # one line
    detail: str = ""  # more lines: the error, the plan's counts

    def __post_init__(self) -> None:
        if self.kind not in EVENT_KINDS:
            raise ValueError(
                f"event kind {self.kind!r} is not one of {', '.join(sorted(EVENT_KINDS))}"
            )


@dataclass(frozen=True)
class SinkStats:
    """What a sink's worker did so far."""

    sink: str  # the sink's label: kind and host
    delivered: int
    failed: int  # given up after retries, or refused by the receiver
    dropped: int  # pushed out of a full queue, or left queued at stop()
    queued: int


@dataclass(frozen=True)
class _Queued:
    event: Event
    at: float  # unix time of send()


@dataclass(frozen=True)
class _Attempt:
    """The result of one POST: done, retry (after at least `wait` s), or give up."""

    outcome: str  # "ok" | "retry" | "fatal"
    reason: str
    wait: float | None = None  # from Retry-After


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # A redirect is not followed: urllib would turn the POST into a GET (301-303) and could
    # carry the notification to another host. The sink's URL must be the final one.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class Notifier:
    """Delivers events to sinks from background threads (one per sink)."""

    def __init__(
        self,
        sinks: Sequence[NotificationSink],
        redactor: Redactor,
        *,
        retry_for_s: float = 60.0,
        max_queue: int = 1000,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        repeat_after_s: float = 3600.0,
        agent_host: str | None = None,
        on_result: Callable[[NotificationSink, str], None] | None = None,
    ) -> None:
        """`backoff_s` is the first retry's delay (doubling up to `max_backoff_s`, each
        with jitter). A failure, drift or hold event the same as one sent less than
        `repeat_after_s` ago (same kind, unit and summary) is not sent again (0: always
        sent). `agent_host` names this agent in payloads (default: the hostname);
        `on_result(sink, result)` is called with "delivered", "failed" or "dropped" (to
        count them in metrics)."""
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        self.redactor = redactor
        for sink in sinks:
            if sink.kind == "apprise":
                # Libraries under apprise log its request paths at debug level, and many
                # services carry their token there: each such piece is a secret too.
                for piece in _url_secrets(sink.url):
                    redactor.register(piece)
        self.repeat_after_s = repeat_after_s
        self._sent: dict[tuple[str, str, str], float] = {}  # repeatable event -> monotonic
        self._sent_lock = threading.Lock()
        self.suppressed = 0  # repeats not sent
        self.agent_host = agent_host or socket.gethostname()
        self._workers = [
            _SinkWorker(
                sink,
                self,
                retry_for_s=retry_for_s,
                max_queue=max_queue,
                backoff_s=backoff_s,
                max_backoff_s=max_backoff_s,
                on_result=on_result,
            )
            for sink in sinks
        ]
        self._started = False
        self._stopped = False

    def send(self, event: Event) -> None:
        """Queue `event` for every sink that wants its kind; never blocks on the network."""
        if self._is_repeat(event):
            log.debug("notification %s for unit %s: a repeat, not sent", event.kind, event.unit)
            return
        for worker in self._workers:
            if event.kind in worker.sink.events:
                worker.put(_Queued(event, time.time()), accepting=not self._stopped)

    def _is_repeat(self, event: Event) -> bool:
        """Whether `event` repeats one sent within `repeat_after_s` (and count it if so).

        A unit that keeps failing, or keeps its drift under `drift: report`, would otherwise
        notify at every pass (every poll or drift interval). Applies are never repeats.
        """
        if event.kind not in _REPEATABLE or self.repeat_after_s <= 0:
            return False
        now = time.monotonic()
        key = (event.kind, event.unit, event.summary)
        with self._sent_lock:
            for old in [k for k, at in self._sent.items() if now - at >= self.repeat_after_s]:
                del self._sent[old]
            if key in self._sent:
                self.suppressed += 1
                return True
            self._sent[key] = now
            return False

    def start(self) -> None:
        """Start delivering (events sent before are delivered too)."""
        if self._started:
            return
        self._started = True
        for worker in self._workers:
            worker.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Deliver what can be delivered within `timeout` seconds, then stop.

        Retries go on until the timeout; what is still queued then is dropped (counted, and
        one log line per sink). A request in flight at the timeout is not waited for.
        """
        self._stopped = True
        deadline = time.monotonic() + max(0.0, timeout)
        for worker in self._workers:
            worker.stop_at(deadline)
        if not self._started:
            for worker in self._workers:
                worker.abandon_queued()
            return
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))

    @property
    def dropped(self) -> int:
        """Events dropped by every sink: pushed out of a full queue, or left at stop()."""
        return sum(w.stats().dropped for w in self._workers)

    def stats(self) -> list[SinkStats]:
        """Per sink: delivered, failed, dropped, queued."""
        return [w.stats() for w in self._workers]

    # --- payloads ---------------------------------------------------------------------

    def payload(
        self, sink: NotificationSink, event: Event, *, at: float | None = None
    ) -> dict[str, Any]:
        """The JSON document `sink` receives for `event` (sent at unix time `at`), redacted."""
        redact = self.redactor.redact
        # Redact before anything is escaped or cut: a cut secret would no longer match.
        values = {
            "event": event.kind,
            "unit": redact(event.unit),
            "run": event.run_id if isinstance(event.run_id, int) else redact(event.run_id),
            "revision": None if event.revision is None else redact(event.revision),
            "summary": redact(event.summary),
            "detail": redact(event.detail),
            "time": datetime.fromtimestamp(at or time.time(), UTC).isoformat(timespec="seconds"),
            "agent": {"version": __version__, "host": redact(self.agent_host)},
        }
        document = _slack_payload(values) if sink.kind == "slack" else values
        # And once more on the finished document: every string, keys too.
        return self.redactor.redact_obj(document)


class _SinkWorker:
    """One sink's queue and the thread that empties it."""

    def __init__(
        self,
        sink: NotificationSink,
        notifier: Notifier,
        *,
        retry_for_s: float,
        max_queue: int,
        backoff_s: float,
        max_backoff_s: float,
        on_result: Callable[[NotificationSink, str], None] | None,
    ) -> None:
        self.sink = sink
        self._notifier = notifier
        self._retry_for = retry_for_s
        self._backoff = backoff_s
        self._max_backoff = max_backoff_s
        self._on_result = on_result
        self._queue: deque[_Queued] = deque()
        self._max_queue = max_queue
        self._cond = threading.Condition()
        self._stop_at: float | None = None  # monotonic; set by stop()
        self._dropping = False  # a drop was logged and the queue has not drained since
        self._counts = {"delivered": 0, "failed": 0, "dropped": 0}
        self._thread = threading.Thread(
            target=self._run, name=f"notify-{sink.kind}-{sink.host}", daemon=True
        )
        self._opener = urllib.request.build_opener(_NoRedirect())
        self._apprise = None
        if sink.kind == "apprise":
            from agent.service.apprise_sink import AppriseSender

            self._apprise = AppriseSender(sink.url)

    # --- queue --------------------------------------------------------------------

    def put(self, item: _Queued, *, accepting: bool) -> None:
        with self._cond:
            if not accepting:
                self._count("dropped")
                log.warning(
                    "notification %s for unit %s dropped for %s: the notifier is stopped",
                    item.event.kind,
                    self._notifier.redactor.redact(item.event.unit),
                    self.sink.label,
                )
                return
            if len(self._queue) >= self._max_queue:
                self._queue.popleft()
                self._count("dropped")
                if not self._dropping:
                    self._dropping = True
                    log.warning(
                        "notifications to %s: the queue is full (%d), dropping the oldest",
                        self.sink.label,
                        self._max_queue,
                    )
            self._queue.append(item)
            self._cond.notify_all()

    def _count(self, result: str) -> None:
        with self._cond:
            self._counts[result] += 1
        if self._on_result is not None:
            try:
                self._on_result(self.sink, result)
            except Exception:
                log.exception("the notification result callback failed")

    def stats(self) -> SinkStats:
        with self._cond:
            return SinkStats(sink=self.sink.label, queued=len(self._queue), **self._counts)

    def start(self) -> None:
        self._thread.start()

    def stop_at(self, deadline: float) -> None:
        with self._cond:
            self._stop_at = deadline
            self._cond.notify_all()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning(
                "notifications to %s: a delivery was still in flight when the agent stopped",
                self.sink.label,
            )

    def abandon_queued(self) -> None:
        with self._cond:
            left = len(self._queue)
            self._queue.clear()
            for _ in range(left):
                self._count("dropped")
        if left:
            log.warning(
                "%s to %s not delivered: the agent is stopping",
                plural(left, "notification"),
                self.sink.label,
            )

    def _next(self) -> _Queued | None:
        with self._cond:
            while not self._queue and self._stop_at is None:
                self._cond.wait()
            if not self._queue:
                return None
            if self._stop_at is not None and time.monotonic() >= self._stop_at:
                return None
            item = self._queue.popleft()
            if not self._queue:
                self._dropping = False
            return item

    def _run(self) -> None:
        while (item := self._next()) is not None:
            try:
                if not self._deliver(item):
                    break  # stopping: what is queued would give up the same way
            except Exception as exc:  # a bug must neither pass silently nor stop the sink
                self._count("failed")
                log.error(
                    "notification %s to %s failed: %s",
                    item.event.kind,
                    self.sink.label,
                    type(exc).__name__,
                )
                log.debug("%s", self._scrub(traceback.format_exc()))
        self.abandon_queued()

    def _pause(self, until: float) -> None:
        """Sleep until `until` (monotonic), or until the stop deadline if that is sooner."""
        with self._cond:
            while True:
                end = until if self._stop_at is None else min(until, self._stop_at)
                left = end - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)

    def _deadline(self, give_up_at: float) -> float:
        with self._cond:
            return give_up_at if self._stop_at is None else min(give_up_at, self._stop_at)

    # --- delivery -------------------------------------------------------------------

    def _deliver(self, item: _Queued) -> bool:
        """Deliver `item`, retrying; False when it was given up because of stop()."""
        redact = self._notifier.redactor.redact
        payload = self._notifier.payload(self.sink, item.event, at=item.at)
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        started = time.monotonic()
        give_up_at = started + self._retry_for
        attempts = 0
        while True:
            attempts += 1
            left = self._deadline(give_up_at) - time.monotonic()
            if self._apprise is not None:
                result = self._notify(payload)
            else:
                result = self._post(data, min(self.sink.timeout_s, max(0.1, left)))
            if result.outcome == "ok":
                self._count("delivered")
                return True
            why, stopping = result.reason, False
            if result.outcome == "retry":
                delay = self._delay(attempts, result.wait)
                if time.monotonic() + delay < self._deadline(give_up_at):
                    log.debug(
                        "notification to %s: %s; retrying in %.1fs",
                        self.sink.label,
                        result.reason,
                        delay,
                    )
                    self._pause(time.monotonic() + delay)
                    if time.monotonic() < self._deadline(give_up_at):  # not cut by stop()
                        continue
                stopping = self._deadline(give_up_at) < give_up_at
                why = self._why_not_retried(result, give_up_at)
            self._count("failed")
            log.warning(
                "notification %s for unit %s (run %s) not delivered to %s after %s in %.1fs: %s",
                item.event.kind,
                redact(item.event.unit),
                redact(str(item.event.run_id)),
                self.sink.label,
                plural(attempts, "attempt"),
                time.monotonic() - started,
                self._scrub(why),
            )
            return not stopping

    def _why_not_retried(self, result: _Attempt, give_up_at: float) -> str:
        if self._deadline(give_up_at) < give_up_at:
            return f"{result.reason}; the agent is stopping"
        if result.wait is not None and time.monotonic() + result.wait >= give_up_at:
            return (
                f"{result.reason}, asked to retry after {result.wait:.0f}s, beyond the"
                f" {self._retry_for:.0f}s retry window"
            )
        return f"{result.reason}; retried for {self._retry_for:.0f}s"

    def _delay(self, attempts: int, retry_after: float | None) -> float:
        """Exponential backoff with jitter: between half and all of base * 2^(n-1), capped.

        Half of it is kept, so retries always back off; the other half is random, so agents
        that failed together do not retry together. A `Retry-After` is a floor.
        """
        ceiling = min(self._max_backoff, self._backoff * 2 ** (attempts - 1))
        delay = ceiling / 2 + random.uniform(0, ceiling / 2)
        return max(delay, retry_after) if retry_after is not None else delay

    def _post(self, data: bytes, timeout: float) -> _Attempt:
        request = urllib.request.Request(
            self.sink.url,
            data=data,
            method="POST",
            headers={"Content-Type": "application/json; charset=utf-8", "User-Agent": _USER_AGENT},
        )
        try:
            with self._opener.open(request, timeout=timeout) as response:
                response.read(MAX_RESPONSE_BYTES)
                return _Attempt("ok", f"HTTP {response.status}")
        except urllib.error.HTTPError as exc:
            return self._http_error(exc)
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, ssl.SSLCertVerificationError):
                return _Attempt("fatal", f"TLS certificate not trusted: {reason.verify_message}")
            return _Attempt("retry", _describe_oserror(reason))
        except OSError as exc:  # reset, refused, a timeout while reading
            return _Attempt("retry", _describe_oserror(exc))
        except ValueError as exc:  # http.client.InvalidURL and kin: the URL is wrong
            return _Attempt("fatal", f"the URL is not usable ({type(exc).__name__})")
        except Exception as exc:  # http.client.HTTPException: a garbled answer
            return _Attempt("retry", f"bad HTTP answer ({type(exc).__name__})")

    def _notify(self, payload: dict[str, Any]) -> _Attempt:
        """One apprise delivery of `payload` (already redacted, as every payload is)."""
        assert self._apprise is not None
        title, body = _apprise_text(payload)
        failed = payload["event"] == "failure"
        redact = self._notifier.redactor.redact
        why = self._apprise.send(redact(title), redact(body), failure=failed)
        return _Attempt("ok", "delivered") if why is None else _Attempt("retry", why)

    def _http_error(self, exc: urllib.error.HTTPError) -> _Attempt:
        status = exc.code
        try:
            text = exc.read(MAX_RESPONSE_BYTES).decode("utf-8", "replace").strip()
        except Exception:
            text = ""
        finally:
            exc.close()
        said = f": {text}" if _QUOTABLE_BODY.fullmatch(text) else ""
        reason = f"HTTP {status}{said}"
        if status in _RETRY_STATUSES or 500 <= status <= 599:
            return _Attempt("retry", reason, _retry_after((exc.headers or {}).get("Retry-After")))
        if 300 <= status <= 399:
            return _Attempt("fatal", f"{reason} (a redirect: configure the final URL)")
        return _Attempt("fatal", reason)

    def _scrub(self, text: str) -> str:
        """`text` without the sink's URL, path or query (defence in depth), redacted."""
        parts = urlsplit(self.sink.url)
        for piece in (self.sink.url, parts.path, parts.query, parts.username, parts.password):
            if piece and len(piece) > 1:
                text = text.replace(piece, "…")
        return self._notifier.redactor.redact(text)


def _url_secrets(url: str) -> list[str]:
    """The pieces of `url` that may be credentials: the whole URL, user, password, each
    path segment and query value (long enough not to be an ordinary word)."""
    parts = urlsplit(url)
    pieces = [url, parts.username or "", parts.password or "", parts.hostname or ""]
    pieces += parts.path.split("/")
    pieces += [value for pair in parts.query.split("&") for value in pair.split("=")[1:]]
    return [p for p in dict.fromkeys(pieces) if len(p) >= 8 and "." not in p]


def _describe_oserror(exc: object) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, socket.gaierror):
        return f"host name not resolved ({exc.strerror or exc})"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    if isinstance(exc, OSError):
        return type(exc).__name__
    return str(exc) or type(exc).__name__


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a `Retry-After` header: a number of seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


# --- which events a unit result makes -------------------------------------------------------


def unit_events(
    unit: str, outcome: UnitOutcome, *, run_id: int | str, revision: str | None
) -> list[Event]:
    """The events a unit's result is worth: failure, hold, drift (found, reverted or only
    reported), apply. A reverted drift is both `drift` and `apply`, so a sink that wants
    only applies still hears of it. Blocked, interrupted and unchanged units make none: the
    failure that blocked them was sent already.
    """
    counts = ""
    if outcome.plan_add is not None:
        counts = f" (+{outcome.plan_add} ~{outcome.plan_change} -{outcome.plan_destroy})"

    def make(kind: str, summary: str, detail: str = "") -> Event:
        return Event(kind, unit, run_id, revision, summary, detail)

    if outcome.status is UnitStatus.FAILED:
        error = (outcome.error or "failed").strip()
        return [make("failure", error.splitlines()[0] if error else "failed", error)]
    if outcome.status is UnitStatus.HELD and outcome.waiting:
        # A fleet has no saved plan to approve: its changes wait for the window.
        reason = (outcome.error or "held").strip()
        detail = reason
        if reason.startswith(WINDOW_CLOSED):
            detail += "\nthey apply in the first pass after the window opens"
        return [make("hold", f"changes wait{counts}: {reason.splitlines()[0]}", detail)]
    if outcome.status is UnitStatus.HELD:
        detail = f"{outcome.error or ''}\napprove it with: agent approve {run_id}".strip()
        if WINDOW_CLOSED in (outcome.error or ""):
            detail += "\n(or let it apply in the first pass after the change window opens)"
        return [make("hold", f"plan held for approval{counts}", detail)]
    if outcome.status is not UnitStatus.OK:
        return []
    events = []
    if outcome.drift_overwritten:
        # The unit's inputs moved: its drift policy did not decide, the change did.
        events.append(make("drift", f"drift overwritten by a change from Git{counts}"))
    elif outcome.drift and outcome.decision == "apply":
        events.append(make("drift", f"drift found and reverted{counts}"))
    elif outcome.drift and outcome.decision == "report":
        events.append(make("drift", f"drift found, left as it is (drift: report){counts}"))
    if outcome.decision == "apply":
        # An applied plan's error field holds its policy warnings (or a window override).
        events.append(make("apply", f"applied{counts}", outcome.error or ""))
    return events


# --- apprise -----------------------------------------------------------------------------


def _apprise_text(values: dict[str, Any]) -> tuple[str, str]:
    """A title and a plain-text body for apprise, from the (redacted) generic payload."""
    kind = values["event"]
    _, title = _TITLES[kind]
    unit = values["unit"] or "the pass"
    lines = [values["summary"]]
    if values["detail"] and values["detail"] != values["summary"]:
        lines += ["", values["detail"]]
    revision = (values["revision"] or "none")[:12]
    lines += ["", f"revision {revision} · run {values['run']} · {values['agent']['host']}"]
    return f"{title}: {unit}", "\n".join(lines)


# --- Slack ------------------------------------------------------------------------------


def _slack_payload(values: dict[str, Any]) -> dict[str, Any]:
    """A message for a Slack incoming webhook: `text` (the notification and fallback line)
    and Block Kit `blocks`: a header, the summary, the facts, the detail, the agent."""
    kind = values["event"]
    emoji, title = _TITLES[kind]
    # A pass-level event (the fetch failed, a revision was refused) has no unit.
    unit, run, revision = values["unit"] or "the pass", str(values["run"]), values["revision"]
    agent = values["agent"]
    short_rev = revision[:12] if revision else "none"
    facts = [
        ("Unit", _mrkdwn(unit, SLACK_FIELD_MAX - 10)),
        ("Run", f"`{_mrkdwn(run, SLACK_FIELD_MAX - 10)}`"),
        ("Revision", f"`{_mrkdwn(short_rev, 40)}`"),
        ("Agent", _mrkdwn(agent["host"], SLACK_FIELD_MAX - 10)),
    ]
    blocks: list[dict[str, Any]] = [
        {
            "type": "header",
            "text": {
                "type": "plain_text",
                "text": _fit(f"{emoji} {title}: {unit}", SLACK_HEADER_MAX, _same),
                "emoji": True,
            },
        },
        {
            "type": "section",
            "text": {
                "type": "mrkdwn",
                "text": _mrkdwn(values["summary"] or title, SLACK_SECTION_MAX),
            },
        },
        {
            "type": "section",
            "fields": [{"type": "mrkdwn", "text": f"*{name}*\n{text}"} for name, text in facts],
        },
    ]
    if values["detail"]:
        blocks.append(
            {
                "type": "section",
                "text": {"type": "mrkdwn", "text": _code_block(values["detail"])},
            }
        )
    blocks.append(
        {
            "type": "context",
            "elements": [
                {
                    "type": "mrkdwn",
                    "text": _mrkdwn(
                        f"gitops-agent {agent['version']} on {agent['host']} · {values['time']}",
                        SLACK_SECTION_MAX,
                    ),
                }
            ],
        }
    )
    line = f"{title}: {unit} (run {run}, revision {short_rev})"
    if values["summary"]:
        line += f": {values['summary']}"
    return {"text": _mrkdwn(line, SLACK_TEXT_MAX), "blocks": blocks}


def _escape(text: str) -> str:
    # Slack parses &, < and > as control characters in text objects: they are sent as
    # HTML entities (and nothing else is: Slack decodes only these three).
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _same(text: str) -> str:
    return text


def _mrkdwn(text: str, limit: int) -> str:
    return _fit(text, limit, _escape)


def _code_block(text: str) -> str:
    # Three backticks inside would close the block early: a zero-width space breaks them.
    body = text.replace("```", "`\u200b``")
    return "```" + _fit(body, SLACK_SECTION_MAX - 6, _escape) + "```"


def _fit(text: str, limit: int, escape: Callable[[str], str]) -> str:
    """`escape(text)`, cut (on the raw text, so no entity is split) to `limit` characters."""
    out = escape(text)
    if len(out) <= limit:
        return out
    cut = limit - 1
    while cut > 0:
        out = escape(text[:cut]) + "…"
        if len(out) <= limit:
            return out
        cut -= len(out) - limit
    return "…"
