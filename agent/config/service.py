"""The daemon's part of the host config: the HTTP listener, webhooks, the control socket,
notifications, scheduling knobs, and per-unit drift intervals.

    http:            {listen: HOST:PORT, max_body: 1MiB, webhooks: {NAME: {kind, secret_file}}}
    control_socket:  /run/gitops-agent/control.sock
    notifications:   [{kind: webhook|slack|apprise, url | url_file, events: [...], timeout: 5s}]
    daemon:          {jitter: 10s, stop_timeout: 30m, backoff_max: 30m}
    intervals.units: {UNIT: {drift: 2m}}
    web:             {listen: HOST:PORT, token_file, trusted_proxies, user_header}

No secret is ever in the config itself: a webhook's secret and a sink's URL (a Slack URL is
the whole credential) live in files that are read when the daemon starts
(`read_secret_file`), and an inline `url` is never repeated in an error. Each file
reference keeps where it was configured (`where`), so that an unreadable file is reported
with the config's file, line and key.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from agent.config.yamlnodes import INVALID, Value
from agent.errors import ConfigError

if TYPE_CHECKING:
    from agent.config.web import WebConfig

DEFAULT_CONTROL_SOCKET = Path("/run/gitops-agent/control.sock")
DEFAULT_MAX_BODY = 1024 * 1024
DEFAULT_STOP_TIMEOUT = 1800.0  # an interrupted Terraform finishes what is in flight
DEFAULT_BACKOFF_MAX = 1800.0
DEFAULT_NOTIFY_TIMEOUT = 5.0
MAX_JITTER = 60.0  # the default jitter: a tenth of the interval, at most this

WEBHOOK_KINDS = ("github", "gitlab", "gitea", "generic")  # agent.service.webhooks.KINDS
SINK_KINDS = ("webhook", "slack", "apprise")  # agent.service.notify.SINK_KINDS
EVENT_KINDS = ("apply", "failure", "drift", "hold")  # agent.service.notify.EVENT_KINDS

_HOOK_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_UNIT_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")  # the manifest's unit names
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252}[A-Za-z0-9])?")
_SIZE_RE = re.compile(r"(\d+)\s*(B|KiB|MiB|kB|KB|MB)?")
_SIZE_FACTORS = {None: 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "kB": 1000, "KB": 1000, "MB": 10**6}
_MAX_BODY_LIMIT = 64 * 1024 * 1024
_MAX_SECRET_FILE = 64 * 1024
_APPRISE_URL_RE = re.compile(r"[a-z][a-z0-9+]{1,31}://\S")

PathReader = Callable[[Value, Path], Path | None]


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    """One sender of `/hooks/<name>`; its secret is read from `secret_file` at start."""

    name: str
    kind: str
    secret_file: Path
    where: str  # "agent.yaml:12: http.webhooks.github.secret_file", for runtime errors


@dataclass(frozen=True, slots=True)
class HttpConfig:
    """The HTTP listener: webhooks, /metrics and /healthz on one address."""

    host: str
    port: int  # 0: a free port, chosen at start and logged
    max_body: int = DEFAULT_MAX_BODY
    webhooks: Mapping[str, WebhookConfig] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class NotificationConfig:
    """A notification sink: exactly one of `url` (inline) and `url_file` is set."""

    kind: str
    url: str | None = field(default=None, repr=False)
    url_file: Path | None = None
    events: frozenset[str] = frozenset(EVENT_KINDS)
    timeout: float = DEFAULT_NOTIFY_TIMEOUT
    where: str = ""


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """Scheduling and stopping. `jitter` None: a tenth of each interval, at most 60 s."""

    jitter: float | None = None
    stop_timeout: float = DEFAULT_STOP_TIMEOUT
    backoff_max: float = DEFAULT_BACKOFF_MAX

    def jitter_for(self, interval: float) -> float:
        """The most a timer firing every `interval` seconds is delayed at random."""
        if self.jitter is not None:
            return min(self.jitter, interval)
        return min(interval / 10, MAX_JITTER)


@dataclass(frozen=True, slots=True)
class UnitIntervals:
    """A unit's own schedule (`intervals.units.NAME`)."""

    drift: float


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """What `agent run` needs beyond the pass itself."""

    http: HttpConfig | None = None
    control_socket: Path = DEFAULT_CONTROL_SOCKET
    notifications: tuple[NotificationConfig, ...] = ()
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    web: WebConfig | None = None  # the web page (agent.config.web), off when None


SERVICE_KEYS = ("http", "control_socket", "notifications", "daemon", "web")


def read_service(
    values: Mapping[str, Value | None], base_dir: Path, path_of: PathReader
) -> ServiceConfig:
    """Read the daemon's top-level keys (`SERVICE_KEYS`) from `values` (key -> value or
    None when absent); problems are recorded on the values (file, line, key)."""
    from agent.config.web import read_web  # it reuses this module's readers

    socket_path = DEFAULT_CONTROL_SOCKET
    if found := values.get("control_socket"):
        socket_path = path_of(found, base_dir) or socket_path
    return ServiceConfig(
        http=_http(values.get("http"), base_dir, path_of),
        control_socket=socket_path,
        notifications=_notifications(values.get("notifications"), base_dir, path_of),
        daemon=_daemon(values.get("daemon")),
        web=read_web(values.get("web"), base_dir, path_of),
    )


def read_unit_intervals(value: Value | None) -> Mapping[str, UnitIntervals]:
    """`intervals.units`: {UNIT: {drift: DURATION}}."""
    fields = value.mapping() if value else None
    if fields is None:
        return MappingProxyType({})
    units: dict[str, UnitIntervals] = {}
    for name, entry in fields:
        if not _UNIT_NAME_RE.fullmatch(name):
            fields.fail_key(name, "a unit name (lowercase letters, digits, - and _)")
            continue
        unit_fields = entry.mapping(["drift"])
        if unit_fields is None:
            continue
        found = unit_fields.require("drift", "the unit's drift interval")
        drift = found.duration() if found else None
        if drift is not None:
            units[name] = UnitIntervals(drift=drift)
    return MappingProxyType(units)


# --- sections ---------------------------------------------------------------------------


def _http(value: Value | None, base_dir: Path, path_of: PathReader) -> HttpConfig | None:
    fields = value.mapping(["listen", "max_body", "webhooks"]) if value else None
    if fields is None:
        return None
    address = None
    if found := fields.require("listen", "HOST:PORT, like 127.0.0.1:9100 or [::1]:9100"):
        address = _listen(found)
    max_body = DEFAULT_MAX_BODY
    if found := fields.get("max_body"):
        max_body = _size(found) or max_body
    hooks: dict[str, WebhookConfig] = {}
    if found := fields.get("webhooks"):
        hooks = _webhooks(found, base_dir, path_of)
    if address is None:
        return None
    return HttpConfig(address[0], address[1], max_body, MappingProxyType(hooks))


def _listen(value: Value) -> tuple[str, int] | None:
    expected = "HOST:PORT, like 127.0.0.1:9100, 0.0.0.0:9100 or [::]:9100"
    text = value.string(expected)
    if text is None:
        return None
    host, colon, port_text = text.rpartition(":")
    if not colon or not port_text.isascii() or not port_text.isdigit():
        return value.fail(expected)
    port = int(port_text)
    if port > 65535:
        return value.fail("a port from 0 to 65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return value.fail(expected)
    elif not host or ":" in host or not _HOSTNAME_RE.fullmatch(host):
        return value.fail(expected)
    return host, port


def _size(value: Value) -> int | None:
    expected = "a size in bytes, like 65536, 512KiB or 1MiB"
    scalar = value.scalar()
    if scalar is INVALID:
        return None
    text = str(scalar) if isinstance(scalar, int | str) and not isinstance(scalar, bool) else ""
    match = _SIZE_RE.fullmatch(text.strip())
    if match is None:
        return value.fail(expected)
    size = int(match.group(1)) * _SIZE_FACTORS[match.group(2)]
    if not 0 < size <= _MAX_BODY_LIMIT:
        return value.fail(f"a size from 1 byte to {_MAX_BODY_LIMIT // 1024**2}MiB")
    return size


def _webhooks(value: Value, base_dir: Path, path_of: PathReader) -> dict[str, WebhookConfig]:
    fields = value.mapping()
    if fields is None:
        return {}
    hooks: dict[str, WebhookConfig] = {}
    for name, entry in fields:
        if not _HOOK_NAME_RE.fullmatch(name):
            fields.fail_key(name, "a webhook name (letters, digits, . _ -): it is in the URL")
            continue
        hook = entry.mapping(["kind", "secret_file"])
        if hook is None:
            continue
        kind = None
        if found := hook.require("kind", f"one of {', '.join(WEBHOOK_KINDS)}"):
            kind = _one_of(found, WEBHOOK_KINDS)
        secret_file, where = None, ""
        if found := hook.require("secret_file", "a file holding the webhook's secret"):
            secret_file, where = path_of(found, base_dir), _where(found)
        if kind is not None and secret_file is not None:
            hooks[name] = WebhookConfig(name, kind, secret_file, where)
    return hooks


def _notifications(
    value: Value | None, base_dir: Path, path_of: PathReader
) -> tuple[NotificationConfig, ...]:
    if value is None:
        return ()
    sinks = []
    for item in value.sequence() or ():
        sink = _sink(item, base_dir, path_of)
        if sink is not None:
            sinks.append(sink)
    return tuple(sinks)


def _sink(value: Value, base_dir: Path, path_of: PathReader) -> NotificationConfig | None:
    fields = value.mapping(["kind", "url", "url_file", "events", "timeout"])
    if fields is None:
        return None
    kind = None
    if found := fields.require("kind", f"one of {', '.join(SINK_KINDS)}"):
        kind = _one_of(found, SINK_KINDS)
    url = None
    if found := fields.get("url"):
        url = _apprise_url(found) if kind == "apprise" else _sink_url(found)
    url_file, where = None, _where(value)
    if found := fields.get("url_file"):
        url_file, where = path_of(found, base_dir), _where(found)
    if (fields.get("url") is None) == (fields.get("url_file") is None):
        got = "neither" if fields.get("url") is None else "both"
        value.fail("exactly one of url and url_file (url_file keeps the credential out)", got)
    events = frozenset(EVENT_KINDS)
    if found := fields.get("events"):
        chosen = [_one_of(item, EVENT_KINDS) for item in found.sequence(non_empty=True) or ()]
        events = frozenset(e for e in chosen if e is not None) or events
    timeout = DEFAULT_NOTIFY_TIMEOUT
    if found := fields.get("timeout"):
        timeout = found.duration() or timeout
    if kind is None or (url is None and url_file is None):
        return None
    return NotificationConfig(kind, url, url_file, events, timeout, where)


def _sink_url(value: Value) -> str | None:
    # The URL may be a credential: an error says what is wrong with it, never what it is.
    text = value.string("an http:// or https:// URL")
    if text is None:
        return None
    try:
        parts = urlsplit(text.strip())
        host = parts.hostname
        parts.port  # noqa: B018 - parsing the port is what validates it
    except ValueError:
        return value.fail("an http:// or https:// URL", "a URL that does not parse (not shown)")
    if parts.scheme not in ("http", "https") or not host:
        scheme = parts.scheme if parts.scheme.isalnum() else "?"
        got = f"a URL with scheme {scheme or 'none'!r} (not shown: it may be a credential)"
        return value.fail("an http:// or https:// URL with a host", got)
    return text.strip()


def _apprise_url(value: Value) -> str | None:
    # Whether apprise has a service for it is checked when the sink is made (at start).
    text = value.string("an apprise URL (msteams://, mailtos://, pagerduty://, ...)")
    if text is None:
        return None
    if not _APPRISE_URL_RE.match(text.strip()):
        return value.fail(
            "an apprise URL (msteams://, mailtos://, pagerduty://, ...)",
            "something else (not shown: it may be a credential)",
        )
    return text.strip()


def _daemon(value: Value | None) -> DaemonConfig:
    fields = value.mapping(["jitter", "stop_timeout", "backoff_max"]) if value else None
    if fields is None:
        return DaemonConfig()
    jitter = None
    if found := fields.get("jitter"):
        jitter = found.duration(positive=False)
    stop_timeout = DEFAULT_STOP_TIMEOUT
    if found := fields.get("stop_timeout"):
        stop_timeout = found.duration() or stop_timeout
    backoff_max = DEFAULT_BACKOFF_MAX
    if found := fields.get("backoff_max"):
        backoff_max = found.duration() or backoff_max
    return DaemonConfig(jitter, stop_timeout, backoff_max)


def _one_of(value: Value, choices: tuple[str, ...]) -> str | None:
    text = value.string(f"one of {', '.join(choices)}")
    if text is not None and text not in choices:
        return value.fail(f"one of {', '.join(choices)}")
    return text


def _where(value: Value) -> str:
    return f"{value.problems.filename}:{value.line}: {value.path}"


# --- reading the files the config points at ---------------------------------------------


def read_secret_file(path: Path, where: str, what: str) -> str:
    """The content of a file holding a secret (a webhook secret, a sink URL), without its
    trailing newline. Refused: a missing, empty or oversized file, or one that other users
    can read or anyone but its owner can write (`where` names the config key; the content
    is never in a message)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        raise ConfigError(
            f"{where}: cannot read {path}, which should hold {what}: {exc.strerror or exc}",
            hint="create it (mode 0600, owned by the agent's user) or fix the path",
        ) from None
    try:
        info = os.fstat(fd)
        mode = stat.S_IMODE(info.st_mode)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{where}: {path} is not a regular file")
        if mode & 0o027:
            raise ConfigError(
                f"{where}: {path} holds {what} but its mode is {mode:04o}: other users can"
                " read it, or its group can write it",
                hint=f"chmod 600 {path}",
            )
        data = os.read(fd, _MAX_SECRET_FILE + 1)
    finally:
        os.close(fd)
    if len(data) > _MAX_SECRET_FILE:
        raise ConfigError(f"{where}: {path} is larger than {_MAX_SECRET_FILE} bytes")
    try:
        text = data.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: {path} is not UTF-8 text") from None
    if not text.strip():
        raise ConfigError(f"{where}: {path} is empty; it should hold {what}")
    return text
