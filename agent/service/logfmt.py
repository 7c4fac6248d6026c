"""The daemon's log: one line per event on stderr, fit for the journal.

    INFO run=r-20261123T091502-3f9a unit=app: applied (+1 ~0 -0) (1.2s)
    WARNING run=r-20261123T091502-3f9a unit=db: held for approval (+0 ~0 -1)
    INFO http_server: listening on http://127.0.0.1:9100 (webhooks: github)

Every line starts with the level, then the run id and unit when known (else the module),
then the message; a message of several lines (an error, a traceback) is folded onto one
line with " | ", so that one event is one journal entry. Under systemd (stderr connected
to the journal, `$JOURNAL_STREAM`) each line is prefixed with its syslog priority (`<6>`)
so that `journalctl -p warning` works, and no timestamp is written (the journal has one);
elsewhere lines start with a UTC timestamp.

`EventLog` turns the progress events of a pass (agent.core.progress) into such lines.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any, TextIO

from agent.core.progress import Event, EventKind
from agent.state.store import RunStatus, UnitStatus
from agent.units.stacks import describe_outcome
from providers.text import plural

# sd-daemon(3) priority prefixes.
_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}
_PASS_THREADS = ("pass-worker", "unit")  # threads whose records belong to the running pass
_PHASES = {"init": "initializing", "plan": "planning", "apply": "applying"}


def _priority(levelno: int) -> int:
    for level in sorted(_PRIORITY, reverse=True):
        if levelno >= level:
            return _PRIORITY[level]
    return 7


def _one_line(text: str) -> str:
    return " | ".join(part.rstrip() for part in text.splitlines() if part.strip())


def under_journal(stream: TextIO) -> bool:
    """True if `stream` is connected to the journal (systemd sets `$JOURNAL_STREAM` to the
    device and inode of the stream it gave the service)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{info.st_dev}:{info.st_ino}"


class JournalFormatter(logging.Formatter):
    """`LEVEL run=R unit=U: message`, one line; `<N>` prefixed for the journal."""

    def __init__(self, *, journal: bool) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        context = [
            f"{key}={value}" for key in ("run", "unit") if (value := getattr(record, key, None))
        ]
        where = " ".join(context) or _source(record.name)
        text = record.getMessage()
        run = getattr(record, "run", None)
        if run and text.startswith(f"run {run}: "):
            text = text[len(f"run {run}: ") :]  # said once, up front
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text = f"{text}\n{record.exc_text}"
        line = f"{record.levelname} {where}: {_one_line(text)}"
        if self.journal:
            return f"<{_priority(record.levelno)}>{line}"
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created))
        return f"{stamp} {line}"


class RunContext(logging.Filter):
    """Adds `run=` to records logged by the threads of the running pass (the worker and the
    unit threads), so that lines from deep inside a pass carry their run id too."""

    def __init__(self) -> None:
        super().__init__()
        self.run_id: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if (
            self.run_id
            and getattr(record, "run", None) is None
            and record.threadName.startswith(_PASS_THREADS)
        ):
            record.run = self.run_id
        return True


def setup_logging(level: int, stream: TextIO = sys.stderr) -> RunContext:
    """Send every log record to `stream` as journal lines (replacing the root's handlers)."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JournalFormatter(journal=under_journal(stream)))
    context = RunContext()
    handler.addFilter(context)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    quiet_libraries(level)
    return context


# Libraries that speak at INFO about routine work: paramiko logs "Connected (version 2.0,
# client OpenSSH...)" and "Authentication (publickey) successful!" for every host of every
# pass; APScheduler "Added job", "Running job"; botocore and urllib3 their connections.
LIBRARY_LOGGERS = (
    "paramiko",
    "apscheduler",
    "urllib3",
    "botocore",
    "boto3",
    "s3transfer",
    "git",
    "hvac",
)


def quiet_libraries(level: int) -> None:
    """Keep the libraries' loggers at WARNING, unless debug logs are asked for (`--debug`):
    then they say everything, as the agent's own loggers do."""
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(level if level <= logging.DEBUG else logging.WARNING)


class EventLog:
    """A progress reporter that logs a pass's events as journal lines (thread-safe)."""

    def __init__(self, context: RunContext, logger: logging.Logger | None = None) -> None:
        self.context = context
        self.log = logger or logging.getLogger("agent.pass")
        self.describe = ""  # what the daemon was asked (shown when the pass starts)
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        kind, run, unit = event.kind, event.run_id, event.unit
        if kind is EventKind.PASS_STARTED:
            with self._lock:
                self.context.run_id = run
            self._say(logging.INFO, run, None, f"pass started{self.describe}")
        elif kind is EventKind.RECOVERED:
            self._say(logging.WARNING, None, None, f"recovered: {event.message}")
        elif kind is EventKind.FETCHED:
            self._say(logging.DEBUG, run, None, f"fetched {event.message[:12]}")
        elif kind is EventKind.REJECTED:
            self._say(logging.WARNING, run, None, event.message)
        elif kind is EventKind.UNIT_PHASE:
            level = logging.INFO if event.message == "apply" else logging.DEBUG
            self._say(level, run, unit, f"{_PHASES.get(event.message, event.message)}...")
        elif kind is EventKind.UNIT_LINE:
            self._say(logging.DEBUG, run, unit, event.message)
        elif kind is EventKind.UNIT_FINISHED:
            self._unit_finished(event)
        elif kind is EventKind.PASS_FINISHED:
            self._pass_finished(event)
            with self._lock:
                self.context.run_id = None
        elif kind is EventKind.MANIFEST_LOADED:
            units = getattr(event.result, "units", ())
            self._say(logging.DEBUG, run, None, f"manifest: {plural(len(units), 'unit')}")

    def _say(self, level: int, run: str | None, unit: str | None, message: str) -> None:
        self.log.log(level, "%s", message, extra={"run": run, "unit": unit})

    def _unit_finished(self, event: Event) -> None:
        outcome = event.result
        status = getattr(outcome, "status", None)
        level = logging.INFO if status is UnitStatus.OK else logging.WARNING
        took = f" ({event.seconds:.1f}s)" if event.seconds is not None else ""
        text = describe_outcome(outcome) if outcome is not None else event.message
        self._say(level, event.run_id, event.unit, f"{text}{took}")

    def _pass_finished(self, event: Event) -> None:
        result: Any = event.result
        if result is None:
            self._say(logging.INFO, event.run_id, None, f"pass {event.message}")
            return
        revision = result.revision[:12] if result.revision else "no revision"
        took = f" in {event.seconds:.1f}s" if event.seconds is not None else ""
        units = ", ".join(f"{name}: {_short(outcome)}" for name, outcome in result.outcomes.items())
        text = f"pass {result.status} at {revision}{took} ({units or 'no units'})"
        level = logging.INFO if result.status is RunStatus.SUCCEEDED else logging.WARNING
        if result.error:
            text += f": {result.error}"
        self._say(level, event.run_id, None, text)


def _short(outcome: Any) -> str:
    """`applied`, `held`, `failed`...: one word for a unit's result."""
    status = getattr(outcome, "status", "")
    if status is UnitStatus.OK:
        words = {"apply": "applied", "report": "drift reported", "plan-only": "planned"}
        decision = str(outcome.decision or "ok")
        return words.get(decision, "no changes" if decision == "nothing" else decision)
    return str(status)


def _source(logger: str) -> str:
    """The agent's own loggers by module (`daemon`, `notify`), a library's in full."""
    return logger.rsplit(".", 1)[-1] if logger.startswith("agent.") else logger
