"""The control socket: how the CLI talks to a running daemon, and the operations behind it.

A Unix stream socket (`control_socket` in the host config, mode 0660: the agent's user and
group). One request per connection, one JSON line:

    {"version": 1, "op": "reconcile", "args": {"unit": null, "dry_run": false}}

answered by JSON lines: any number of `{"type": "event", "event": {...}}` (the progress of
the pass that serves the request, as it happens) and `{"type": "info", "message": ...}`,
then exactly one `{"type": "result", "result": {...}}` or
`{"type": "error", "error": {"type", "reference", "message", "hint"}}`.

Ops: `reconcile` {unit, dry_run, changed_only, wait, lines, override_window (its reason)},
`approve` {run, unit}, `suspend` {unit, reason}, `resume` {unit}, `ping`. The peer's uid
(SO_PEERCRED) names who suspended, approved or overrode a change window. Reading commands
(`status`, `logs`, `history`) read the store directly.

`suspend_unit`/`resume_unit` are the same whether the daemon or the CLI runs them; the
CLI runs them itself, under the pass lock, when no daemon answers.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pwd
import socket
import socketserver
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import yaml

from agent.core.progress import Event, EventKind
from agent.errors import AgentError, ConfigError, NotFoundError, PassBusyError, StoreError
from agent.state.store import RunStatus, RunStore, UnitOutcome, UnitStatus

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
SOCKET_MODE = 0o660
MAX_REQUEST = 64 * 1024
REQUEST_TIMEOUT = 10.0  # for the request line; answers take as long as the pass
# Events a client never gets: they are for the daemon's own metrics.
_INTERNAL = {EventKind.MANIFEST_LOADED, EventKind.SECRET_FAILED, EventKind.APPLY_FAILED}


class ControlError(AgentError):
    """The control socket cannot be used (permissions, another daemon, a broken answer)."""

    reference = "control-failed"


class UnitSuspended(AgentError):
    """A command names a unit that is suspended."""

    reference = "unit-suspended"


# Errors the daemon sends back are raised again in the CLI as the same type, so that the
# CLI's exit codes are those of direct mode.
_ERROR_TYPES: dict[str, type[AgentError]] = {
    cls.__name__: cls
    for cls in (AgentError, ConfigError, NotFoundError, PassBusyError, StoreError, UnitSuspended)
}


def register_error_type(cls: type[AgentError]) -> None:
    """Let an error type travel over the socket as itself (e.g. ApprovalRefused)."""
    _ERROR_TYPES[cls.__name__] = cls


# --- the wire format ----------------------------------------------------------------------


def encode_event(event: Event) -> dict[str, Any]:
    result = event.result
    if isinstance(result, UnitOutcome):
        result = asdict(result)
    elif result is not None and hasattr(result, "outcomes"):
        result = encode_result(result)
    else:
        result = None
    return {
        "kind": str(event.kind),
        "run_id": event.run_id,
        "unit": event.unit,
        "message": event.message,
        "seconds": event.seconds,
        "result": result,
    }


def decode_event(data: dict[str, Any]) -> Event:
    kind = EventKind(data["kind"])
    result: Any = data.get("result")
    if result is not None and kind is EventKind.UNIT_FINISHED:
        result = decode_outcome(result)
    elif result is not None and kind is EventKind.PASS_FINISHED:
        result = decode_result(result)
    return Event(
        kind=kind,
        run_id=data.get("run_id"),
        unit=data.get("unit"),
        message=data.get("message") or "",
        seconds=data.get("seconds"),
        result=result,
    )


def encode_result(result: Any) -> dict[str, Any]:
    """A PassResult as JSON (the same shape as `agent reconcile --json` plus warnings)."""
    return {
        "run": result.run_id,
        "status": str(result.status),
        "revision": result.revision,
        "head": result.head,
        "error": result.error,
        "warnings": list(result.warnings),
        "suspended": list(result.suspended),
        "units": {name: asdict(o) for name, o in result.outcomes.items()},
    }


def decode_outcome(data: dict[str, Any]) -> UnitOutcome:
    fields = {**data, "status": UnitStatus(data["status"])}
    if "moved" in fields:  # a tuple in the outcome, a list on the wire
        fields["moved"] = tuple(fields["moved"] or ())
    if "hosts" in fields:  # a fleet unit's outcome, with each host's result
        from agent.units.fleettypes import FleetOutcome, HostResult

        hosts = tuple(HostResult(**h) for h in fields.pop("hosts"))
        return FleetOutcome(**fields, hosts=hosts)
    return UnitOutcome(**fields)


def decode_result(data: dict[str, Any]) -> Any:
    from agent.engine.reconcile import PassResult

    return PassResult(
        run_id=data["run"],
        status=RunStatus(data["status"]),
        revision=data.get("revision"),
        head=data.get("head"),
        outcomes={name: decode_outcome(o) for name, o in (data.get("units") or {}).items()},
        error=data.get("error"),
        warnings=tuple(data.get("warnings") or ()),
        suspended=tuple(data.get("suspended") or ()),
    )


def encode_error(exc: AgentError) -> dict[str, Any]:
    return {
        "type": type(exc).__name__,
        "reference": exc.reference,
        "message": exc.message,
        "hint": exc.hint,
    }


def decode_error(data: dict[str, Any]) -> AgentError:
    cls = _ERROR_TYPES.get(str(data.get("type")), AgentError)
    exc = cls(str(data.get("message") or "the agent refused the request"), hint=data.get("hint"))
    if cls is AgentError and data.get("reference"):
        exc.reference = str(data["reference"])
    return exc


# --- the server -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is on the other end of a connection (from the kernel, not from the client)."""

    pid: int
    uid: int

    @property
    def name(self) -> str:
        return user_name(self.uid)


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


class Reply:
    """Writes one connection's answer lines; remembers when the client has gone."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self.gone = False

    def send(self, message: dict[str, Any]) -> bool:
        data = (json.dumps(message, default=str) + "\n").encode()
        with self._lock:
            if self.gone:
                return False
            try:
                self._stream.write(data)
                self._stream.flush()
            except OSError:
                self.gone = True
        return not self.gone

    def event(self, event: Event) -> bool:
        return self.send({"type": "event", "event": encode_event(event)})

    def info(self, message: str) -> bool:
        return self.send({"type": "info", "message": message})

    def result(self, result: dict[str, Any]) -> bool:
        return self.send({"type": "result", "result": result})

    def error(self, exc: AgentError) -> bool:
        return self.send({"type": "error", "error": encode_error(exc)})


class ControlHandler(Protocol):
    def handle(self, op: str, args: dict[str, Any], peer: Peer, reply: Reply) -> None:
        """Answer one request (ends with reply.result or reply.error, or raises AgentError)."""


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, path: str, handler: ControlHandler) -> None:
        self.handler = handler
        super().__init__(path, _Connection, bind_and_activate=False)


class _Connection(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        peer = _peer(self.connection)
        reply = Reply(self.wfile)
        self.connection.settimeout(REQUEST_TIMEOUT)
        try:
            line = self.rfile.readline(MAX_REQUEST + 1)
        except (TimeoutError, OSError):
            return
        self.connection.settimeout(None)
        try:
            request = _parse_request(line)
        except ControlError as exc:
            log.warning("control: bad request from %s (pid %d): %s", peer.name, peer.pid, exc)
            reply.error(exc)
            return
        op, args = request
        log.debug("control: %s from %s (pid %d)", op, peer.name, peer.pid)
        try:
            self.server.handler.handle(op, args, peer, reply)
        except AgentError as exc:
            reply.error(exc)
        except Exception:
            log.exception("control: %s from %s failed", op, peer.name)
            reply.error(AgentError(f"the agent failed to {op}; see its log"))


def _parse_request(line: bytes) -> tuple[str, dict[str, Any]]:
    if len(line) > MAX_REQUEST:
        raise ControlError(f"the request is longer than {MAX_REQUEST} bytes")
    try:
        data = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ControlError("the request is not one line of JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("op"), str):
        raise ControlError('the request has no "op"')
    if data.get("version") != PROTOCOL_VERSION:
        raise ControlError(
            f"protocol version {data.get('version')!r} is not {PROTOCOL_VERSION}",
            hint="the CLI and the daemon are different versions: restart the daemon",
        )
    args = data.get("args") or {}
    if not isinstance(args, dict):
        raise ControlError('"args" is not an object')
    return data["op"], args


def _peer(sock: socket.socket) -> Peer:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", raw)
    except OSError:
        return Peer(pid=0, uid=-1)
    return Peer(pid=pid, uid=uid)


class ControlServer:
    """Serves the control socket from background threads."""

    def __init__(self, path: Path, handler: ControlHandler) -> None:
        self.path = path
        self._server = _Server(str(path), handler)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind the socket (mode 0660), replacing a stale one; ControlError if another
        agent answers on it or it cannot be made."""
        _prepare_path(self.path)
        try:
            self._server.server_bind()
            os.chmod(self.path, SOCKET_MODE)
            self._server.server_activate()
        except OSError as exc:
            raise ControlError(
                f"cannot create the control socket {self.path}: {exc.strerror or exc}",
                hint="check control_socket in the host config and its directory's permissions",
            ) from None
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.25},
            name="control",
            daemon=True,
        )
        self._thread.start()
        log.info("control socket %s", self.path)

    def stop(self) -> None:
        """Stop accepting connections and remove the socket (answers in progress go on)."""
        if self._thread is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _prepare_path(path: Path) -> None:
    if len(os.fsencode(path)) >= 108:
        raise ControlError(f"the control socket path {path} is too long for a Unix socket")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        info = path.lstat()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ControlError(f"cannot use {path.parent}: {exc.strerror or exc}") from None
    if not stat.S_ISSOCK(info.st_mode):
        raise ControlError(f"{path} exists and is not a socket: not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # left by an agent that died
        return
    finally:
        probe.close()
    raise ControlError(
        f"another agent is running: its control socket {path} answers",
        hint="stop it first (systemctl stop gitops-agent), or give this one another"
        " state_dir and control_socket",
    )


# --- the client ------------------------------------------------------------------------------


class ControlClient:
    """One request to the daemon."""

    def __init__(self, sock: socket.socket, path: Path) -> None:
        self._sock = sock
        self.path = path

    @classmethod
    def connect(cls, path: Path) -> ControlClient | None:
        """A connection to the daemon, or None when no daemon listens at `path`."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            sock.close()
            return None
        except PermissionError:
            sock.close()
            raise ControlError(
                f"cannot reach the agent's control socket {path}: permission denied",
                hint="join the agent's group (gitops-agent), or run as its user",
            ) from None
        except OSError as exc:
            sock.close()
            if exc.errno in (errno.ENAMETOOLONG, errno.EINVAL):
                return None
            raise ControlError(f"cannot reach the agent at {path}: {exc.strerror}") from None
        return cls(sock, path)

    def call(self, op: str, **args: Any) -> Iterator[dict[str, Any]]:
        """Send the request; yield each answer line, the result or error last."""
        request = {"version": PROTOCOL_VERSION, "op": op, "args": args}
        with self._sock, self._sock.makefile("rb") as answers:
            self._sock.sendall((json.dumps(request) + "\n").encode())
            for line in answers:
                try:
                    message = json.loads(line)
                except json.JSONDecodeError:
                    raise ControlError(f"the agent at {self.path} answered garbage") from None
                yield message
                if message.get("type") in ("result", "error"):
                    return
        raise ControlError(
            f"the agent at {self.path} closed the connection before answering (did it stop?)",
            hint="see `agent status` and the agent's log (journalctl -u gitops-agent)",
        )


def run_remote(
    client: ControlClient,
    op: str,
    on_event: Callable[[Event], None] | None = None,
    on_info: Callable[[str], None] | None = None,
    **args: Any,
) -> dict[str, Any]:
    """Run `op` on the daemon, passing its events and notes on; its result, or its error
    raised as the same AgentError type the daemon raised."""
    for message in client.call(op, **args):
        kind = message.get("type")
        if kind == "event" and on_event is not None:
            event = decode_event(message["event"])
            if event.kind not in _INTERNAL:
                on_event(event)
        elif kind == "info" and on_info is not None:
            on_info(str(message.get("message", "")))
        elif kind == "result":
            return dict(message.get("result") or {})
        elif kind == "error":
            raise decode_error(message.get("error") or {})
    raise ControlError(f"the agent at {client.path} sent no result")  # pragma: no cover


def is_internal(event: Event) -> bool:
    """Events for the daemon's metrics only, never sent to a client."""
    return event.kind in _INTERNAL


# --- operations shared by the daemon and the CLI ----------------------------------------------


def known_units(reconciler: Any) -> list[str]:
    """The units of the manifest in force (its revision, read from Git), and units the
    store has seen; empty before the first pass."""
    names: dict[str, None] = {state.unit: None for state in reconciler.store.unit_states()}
    revision = reconciler.store.current_revision()
    if revision is not None:
        try:
            text = reconciler.source.read_file(revision, "gitops.yaml")
            data = yaml.safe_load(text) if text else None
        except Exception:  # the store's names are still a fine answer
            log.debug("cannot read the manifest at %s", revision[:12], exc_info=True)
            data = None
        units = data.get("units") if isinstance(data, dict) else None
        for unit in units if isinstance(units, list) else []:
            if isinstance(unit, dict) and isinstance(unit.get("name"), str):
                names[unit["name"]] = None
    return sorted(names)


def check_not_suspended(store: RunStore, unit: str | None) -> None:
    """Refuse a command that names a suspended unit."""
    if unit is None:
        return
    row = store.suspensions.by_unit().get(unit)
    if row is not None:
        raise UnitSuspended(
            f"unit {unit} is suspended ({describe_suspension(row)}): passes leave it out",
            hint=f"`agent resume {unit}` first",
        )


def describe_suspension(row: Any) -> str:
    since = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(row.since))
    by = f" by {row.by}" if row.by else ""
    reason = f": {row.reason}" if row.reason else ""
    return f"since {since}{by}{reason}"


def _unknown(unit: str, known: list[str]) -> NotFoundError:
    return NotFoundError(
        f"no unit named {unit!r} in the manifest in force",
        hint=f"units: {', '.join(known) or 'none yet (no pass has run)'}",
    )


def suspend_unit(
    store: RunStore, unit: str, known: list[str], *, by: str | None, reason: str | None
) -> dict[str, Any]:
    """Suspend `unit`, one of `known` (`known_units`), else NotFoundError."""
    if unit not in known:
        raise _unknown(unit, known)
    changed = store.suspensions.add(unit, by=by, reason=reason)
    row = store.suspensions.by_unit()[unit]
    if changed:
        log.info("unit %s suspended by %s%s", unit, by or "?", f": {reason}" if reason else "")
    message = (
        f"unit {unit} suspended: every pass leaves it out until `agent resume {unit}`"
        if changed
        else f"unit {unit} was already suspended ({describe_suspension(row)})"
    )
    return {"unit": unit, "suspended": True, "changed": changed, "message": message}


def resume_unit(store: RunStore, unit: str, known: list[str], *, by: str | None) -> dict[str, Any]:
    """Lift the suspension of `unit` (NotFoundError if it is neither suspended nor known)."""
    if store.suspensions.remove(unit):
        log.info("unit %s resumed by %s", unit, by or "?")
        message = f"unit {unit} resumed: the next pass reconciles it"
        return {"unit": unit, "suspended": False, "changed": True, "message": message}
    if unit not in known:
        raise _unknown(unit, known)
    message = f"unit {unit} was not suspended"
    return {"unit": unit, "suspended": False, "changed": False, "message": message}
