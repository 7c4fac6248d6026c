"""A Vault stand-in for tests: a real HTTP(S) server that follows Vault's documented HTTP API.

No Vault or OpenBao build installs on the test machines, so the tests talk to this instead,
over a real socket, with hvac unchanged. It implements exactly the endpoints the agent uses,
with the request and response shapes of developer.hashicorp.com/vault/api-docs:

    GET  /v1/sys/seal-status                     (no token; answers even when sealed)
    GET  /v1/sys/internal/ui/mounts/MOUNT        mount type and options.version
    POST /v1/auth/approle/login                  {role_id, secret_id} -> auth.client_token
    GET  /v1/auth/token/lookup-self              data.ttl, data.renewable, data.creation_ttl...
    POST /v1/auth/token/renew-self               auth.lease_duration
    GET  /v1/MOUNT/data/PATH[?version=N]         KV v2: data.data, data.metadata
    GET  /v1/MOUNT/PATH                          KV v1: data

Tokens are random, carry a TTL that runs out by the clock (`ttl=0`: never expires), a
renewable flag and a list of policies. A policy here is simply an API path prefix the token
may read (`kv/data/prod/`; `*` for everything). An unknown, expired or revoked token gets
403 `permission denied`, as in Vault. `X-Vault-Namespace` selects a namespace, each a
separate store of mounts, tokens and roles. Errors are `{"errors": [...]}`.

For tests it also has: sealed mode (503 `Vault is sealed` everywhere but seal-status), fault
injection (`fail_next`: the next N requests under a path answer a given status; `delay_next`:
they answer late), and a record of every request (method, path, namespace, token sent or not,
status) for asserting e.g. that a renewal happened.

    with VaultStandin(tls=True) as vault:
        vault.enable_kv("kv", version=2)
        vault.put("kv", "prod/db", {"password": "s3cret"})
        token = vault.create_token(["kv/data/prod/"], ttl=60)
        hvac.Client(url=vault.address, token=token, verify=str(vault.ca_bundle))
"""

from __future__ import annotations

import json
import secrets
import shutil
import ssl
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from tests.support.git_http import make_ca_and_cert
from tests.support.service import TestService

SOCKET_TIMEOUT = 10.0
VERSION = "1.15.0+standin"


def _rfc3339(moment: datetime | None) -> str | None:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ") if moment else None


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str  # without /v1/ and without the query, e.g. "kv/data/prod/db"
    query: str
    namespace: str
    token_sent: bool
    status: int


@dataclass
class _Token:
    id: str
    accessor: str
    policies: tuple[str, ...]
    creation_ttl: float  # 0: never expires
    renewable: bool
    max_ttl: float | None
    path: str
    created_mono: float = field(default_factory=time.monotonic)
    created_wall: datetime = field(default_factory=lambda: datetime.now(UTC))
    expires_mono: float | None = None

    def __post_init__(self) -> None:
        if self.creation_ttl > 0:
            self.expires_mono = self.created_mono + self.creation_ttl

    def alive(self) -> bool:
        return self.expires_mono is None or time.monotonic() < self.expires_mono

    def remaining(self) -> float:
        return 0.0 if self.expires_mono is None else max(0.0, self.expires_mono - time.monotonic())

    def expire_time(self) -> datetime | None:
        if self.expires_mono is None:
            return None
        return datetime.now(UTC) + timedelta(seconds=self.remaining())

    def may_read(self, api_path: str) -> bool:
        return any(p == "*" or api_path.startswith(p) for p in self.policies)

    def may_see_mount(self, mount: str) -> bool:
        prefix = f"{mount}/"
        return any(p == "*" or p.startswith(prefix) or prefix.startswith(p) for p in self.policies)


@dataclass
class _AppRole:
    secret_ids: set[str]
    policies: tuple[str, ...]
    token_ttl: float
    renewable: bool
    token_max_ttl: float | None


@dataclass
class _Version:
    data: dict[str, Any]
    created: datetime
    deleted: datetime | None = None
    destroyed: bool = False


@dataclass
class _Mount:
    version: int
    accessor: str = field(default_factory=lambda: f"kv_{secrets.token_hex(4)}")
    kv1: dict[str, dict[str, Any]] = field(default_factory=dict)
    kv2: dict[str, list[_Version]] = field(default_factory=dict)


@dataclass
class _Namespace:
    tokens: dict[str, _Token] = field(default_factory=dict)
    approles: dict[str, _AppRole] = field(default_factory=dict)
    mounts: dict[str, _Mount] = field(default_factory=dict)


@dataclass
class _Fault:
    prefix: str
    status: int | None  # None: a delay only
    remaining: int | None  # None: forever
    delay: float = 0.0
    message: str | None = None  # the error text to answer with, instead of the usual one


class _Reply(Exception):
    """Raised by a route to answer with `status` and `body`."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


def _error(status: int, *messages: str) -> _Reply:
    return _Reply(status, {"errors": list(messages)})


def _envelope(**parts: Any) -> dict[str, Any]:
    """The response envelope Vault wraps every answer in."""
    body: dict[str, Any] = {
        "request_id": secrets.token_hex(16),
        "lease_id": "",
        "renewable": False,
        "lease_duration": 0,
        "data": None,
        "wrap_info": None,
        "warnings": None,
        "auth": None,
    }
    body.update(parts)
    return body


class _State:
    """Everything the server knows; one lock around all of it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.namespaces: dict[str, _Namespace] = {}
        self.sealed = False
        self.faults: list[_Fault] = []
        self.requests: list[RecordedRequest] = []

    def ns(self, name: str) -> _Namespace:
        return self.namespaces.setdefault(name.strip("/"), _Namespace())


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"  # one request per connection: simple and enough for tests
    timeout = SOCKET_TIMEOUT

    def setup(self) -> None:
        if self.server.tls is not None:
            self.request = self.server.tls.wrap_socket(self.request, server_side=True)
        super().setup()

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def log_message(self, format: str, *args: object) -> None:
        pass  # requests are recorded in state.requests instead

    def _handle(self) -> None:
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw_body = self.rfile.read(length) if length else b""
        namespace = (self.headers.get("X-Vault-Namespace") or "").strip("/")
        token = self.headers.get("X-Vault-Token") or ""
        path = unquote(parts.path)
        api_path = path[len("/v1/") :] if path.startswith("/v1/") else path.lstrip("/")
        status, body, delay = 500, {"errors": ["internal error"]}, 0.0
        try:
            delay = self._fault(api_path)
            if path.startswith("/v1/"):
                status, body = self.server.app.route(
                    self.command, api_path, parse_qs(parts.query), raw_body, namespace, token
                )
            else:
                raise _error(404, "not found")
        except _Reply as reply:
            status, body = reply.status, reply.body
        except Exception as exc:  # a bug in the stand-in: answer 500 and keep serving
            body = {"errors": [f"stand-in error: {type(exc).__name__}: {exc}"]}
        with self.server.state.lock:
            self.server.state.requests.append(
                RecordedRequest(self.command, api_path, parts.query, namespace, bool(token), status)
            )
        if delay:
            time.sleep(delay)
        payload = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout test)

    def _fault(self, api_path: str) -> float:
        """Applies the first matching fault: raises its status, or returns its delay."""
        state = self.server.state
        with state.lock:
            for fault in state.faults:
                if not api_path.startswith(fault.prefix):
                    continue
                if fault.remaining is not None:
                    if fault.remaining <= 0:
                        continue
                    fault.remaining -= 1
                if fault.status is None:
                    return fault.delay
                message = fault.message or {
                    429: f'request path "{api_path}": rate limit quota exceeded',
                    503: "Vault is sealed",
                }.get(fault.status, "injected fault")
                raise _error(fault.status, message)
        return 0.0


class _App:
    """The routes: pure functions of (state, request) -> (status, body)."""

    def __init__(self, state: _State) -> None:
        self.state = state

    def route(
        self,
        method: str,
        path: str,
        query: dict[str, list[str]],
        raw_body: bytes,
        namespace: str,
        token_id: str,
    ) -> tuple[int, dict[str, Any]]:
        state = self.state
        with state.lock:
            if path == "sys/seal-status" and method == "GET":
                return 200, self._seal_status()
            if state.sealed:
                raise _error(503, "Vault is sealed")
            try:
                body = json.loads(raw_body) if raw_body else {}
            except ValueError:
                raise _error(400, "failed to parse JSON input") from None
            ns = state.ns(namespace)
            if path == "auth/approle/login" and method in ("POST", "PUT"):
                return 200, self._approle_login(ns, body)
            token = ns.tokens.get(token_id)
            if token is None or not token.alive():
                raise _error(403, "permission denied")
            if path == "auth/token/lookup-self" and method in ("GET", "POST"):
                return 200, _envelope(data=self._token_data(token))
            if path == "auth/token/renew-self" and method in ("POST", "PUT"):
                return 200, self._renew(token, body)
            mounts_prefix = "sys/internal/ui/mounts/"
            if path.startswith(mounts_prefix) and method == "GET":
                return 200, self._mount_info(ns, token, path.removeprefix(mounts_prefix))
            if method == "GET":
                return 200, self._kv_read(ns, token, path, query)
            raise _error(405, "unsupported operation")

    def _seal_status(self) -> dict[str, Any]:
        return {
            "type": "shamir",
            "initialized": True,
            "sealed": self.state.sealed,
            "t": 1,
            "n": 1,
            "progress": 0,
            "nonce": "",
            "version": VERSION,
            "build_date": "2024-01-01T00:00:00Z",
            "migration": False,
            "recovery_seal": False,
            "storage_type": "inmem",
        }

    @staticmethod
    def _auth_block(token: _Token, metadata: dict[str, str] | None = None) -> dict[str, Any]:
        return {
            "client_token": token.id,
            "accessor": token.accessor,
            "policies": ["default", *token.policies],
            "token_policies": ["default", *token.policies],
            "metadata": metadata,
            "lease_duration": round(token.remaining()),
            "renewable": token.renewable,
            "entity_id": "",
            "token_type": "service",
            "orphan": True,
            "mfa_requirement": None,
            "num_uses": 0,
        }

    def _approle_login(self, ns: _Namespace, body: dict[str, Any]) -> dict[str, Any]:
        role_id, secret_id = body.get("role_id"), body.get("secret_id")
        if not role_id:
            raise _error(400, "missing role_id")
        role = ns.approles.get(str(role_id))
        if role is None or secret_id not in role.secret_ids:
            raise _error(400, "invalid role or secret ID")
        token = _new_token(
            role.policies, role.token_ttl, role.renewable, role.token_max_ttl, "auth/approle/login"
        )
        ns.tokens[token.id] = token
        auth = self._auth_block(token, {"role_name": f"role-{role_id[:4]}"})
        return _envelope(auth=auth)

    @staticmethod
    def _token_data(token: _Token) -> dict[str, Any]:
        expire = token.expire_time()
        return {
            "accessor": token.accessor,
            "creation_time": int(token.created_wall.timestamp()),
            "creation_ttl": round(token.creation_ttl),
            "display_name": "token",
            "entity_id": "",
            "expire_time": _rfc3339(expire),
            "explicit_max_ttl": round(token.max_ttl or 0),
            "id": token.id,
            "issue_time": _rfc3339(token.created_wall),
            "meta": None,
            "num_uses": 0,
            "orphan": True,
            "path": token.path,
            "policies": ["default", *token.policies],
            "renewable": token.renewable,
            "ttl": round(token.remaining()),
            "type": "service",
        }

    def _renew(self, token: _Token, body: dict[str, Any]) -> dict[str, Any]:
        if not token.renewable or token.expires_mono is None:
            raise _error(400, "lease is not renewable")
        increment = float(body.get("increment") or token.creation_ttl)
        now = time.monotonic()
        new_expiry = now + increment
        if token.max_ttl is not None:
            new_expiry = min(new_expiry, token.created_mono + token.max_ttl)
        token.expires_mono = new_expiry
        return _envelope(auth=self._auth_block(token))

    @staticmethod
    def _mount_info(ns: _Namespace, token: _Token, rest: str) -> dict[str, Any]:
        name = rest.strip("/").split("/", 1)[0]
        mount = ns.mounts.get(name)
        # Vault answers 403 for a missing mount too, so that this path cannot be used to
        # list mounts.
        if mount is None or not token.may_see_mount(name):
            raise _error(403, "permission denied")
        return _envelope(
            data={
                "accessor": mount.accessor,
                "config": {"default_lease_ttl": 0, "max_lease_ttl": 0, "force_no_cache": False},
                "description": "",
                "external_entropy_access": False,
                "local": False,
                # A KV v1 mount made without options has none, as `vault secrets enable kv`.
                "options": {"version": "2"} if mount.version == 2 else None,
                "path": f"{name}/",
                "seal_wrap": False,
                "type": "kv",
                "uuid": mount.accessor,
            }
        )

    @staticmethod
    def _kv_read(
        ns: _Namespace, token: _Token, path: str, query: dict[str, list[str]]
    ) -> dict[str, Any]:
        if not token.may_read(path):
            raise _error(403, "1 error occurred:\n\t* permission denied\n\n")
        name, _, rest = path.partition("/")
        mount = ns.mounts.get(name)
        if mount is None:
            raise _error(404, f"no handler for route {path!r}. route entry not found.")
        if mount.version == 1:
            data = mount.kv1.get(rest)
            if data is None:
                raise _error(404)
            return _envelope(data=dict(data), lease_duration=2764800)
        if not rest.startswith("data/"):
            raise _error(405, "unsupported operation")
        versions = mount.kv2.get(rest.removeprefix("data/"))
        if not versions:
            raise _error(404)
        try:
            wanted = int((query.get("version") or ["0"])[0])
        except ValueError:
            raise _error(400, "version must be an integer") from None
        number = wanted or len(versions)
        if not 1 <= number <= len(versions):
            raise _error(404)
        version = versions[number - 1]
        metadata = {
            "created_time": _rfc3339(version.created),
            "custom_metadata": None,
            "deletion_time": _rfc3339(version.deleted) or "",
            "destroyed": version.destroyed,
            "version": number,
        }
        if version.deleted or version.destroyed:
            # Vault answers 404 for a deleted or destroyed version, with its metadata.
            raise _Reply(404, _envelope(data={"data": None, "metadata": metadata}))
        return _envelope(data={"data": dict(version.data), "metadata": metadata})


def _new_token(
    policies: tuple[str, ...] | list[str],
    ttl: float,
    renewable: bool,
    max_ttl: float | None,
    path: str,
) -> _Token:
    return _Token(
        id="hvs." + secrets.token_urlsafe(24),
        accessor=secrets.token_urlsafe(18),
        policies=tuple(policies),
        creation_ttl=ttl,
        renewable=renewable and ttl > 0,
        max_ttl=max_ttl,
        path=path,
    )


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, state: _State, tls: ssl.SSLContext | None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.state = state
        self.app = _App(state)
        self.tls = tls
        self.errors: list[str] = []

    def handle_error(self, request: object, client_address: tuple[str, int]) -> None:
        self.errors.append(repr(sys.exc_info()[1]))  # e.g. a client that rejected our cert


class VaultStandin(TestService):
    """The stand-in server plus the admin calls a test uses to set it up (in-process)."""

    def __init__(self, *, tls: bool = False) -> None:
        self.tls = tls
        self.ca_bundle: Path | None = None
        self.port = 0
        self._state = _State()
        self._dir: Path | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        context = None
        if self.tls:
            self._dir = Path(tempfile.mkdtemp(prefix="vault-standin-"))
            self.ca_bundle, cert, key = make_ca_and_cert(self._dir)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(cert, key)
        self._server = _Server(self._state, context)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"vault-standin-{self.port}",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    @property
    def address(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    # -- setup ---------------------------------------------------------------------------

    def enable_kv(self, mount: str, *, version: int = 2, namespace: str = "") -> None:
        with self._state.lock:
            self._state.ns(namespace).mounts[mount] = _Mount(version=version)

    def put(self, mount: str, path: str, data: dict[str, Any], *, namespace: str = "") -> int:
        """Writes a secret; for KV v2 adds a version and returns its number."""
        with self._state.lock:
            store = self._state.ns(namespace).mounts[mount]
            if store.version == 1:
                store.kv1[path] = dict(data)
                return 0
            versions = store.kv2.setdefault(path, [])
            versions.append(_Version(dict(data), datetime.now(UTC)))
            return len(versions)

    def delete_version(self, mount: str, path: str, version: int, *, namespace: str = "") -> None:
        with self._state.lock:
            entry = self._state.ns(namespace).mounts[mount].kv2[path][version - 1]
            entry.deleted = datetime.now(UTC)

    def destroy_version(self, mount: str, path: str, version: int, *, namespace: str = "") -> None:
        with self._state.lock:
            entry = self._state.ns(namespace).mounts[mount].kv2[path][version - 1]
            entry.destroyed = True
            entry.data = {}

    def create_token(
        self,
        policies: list[str] | tuple[str, ...],
        *,
        ttl: float = 3600,
        renewable: bool = True,
        max_ttl: float | None = None,
        namespace: str = "",
    ) -> str:
        """A token that may read under `policies` (API path prefixes); ttl=0: no expiry."""
        token = _new_token(policies, ttl, renewable, max_ttl, "auth/token/create")
        with self._state.lock:
            self._state.ns(namespace).tokens[token.id] = token
        return token.id

    def revoke_token(self, token: str, *, namespace: str = "") -> None:
        with self._state.lock:
            self._state.ns(namespace).tokens.pop(token, None)

    def add_approle(
        self,
        role_id: str,
        secret_id: str,
        policies: list[str] | tuple[str, ...],
        *,
        token_ttl: float = 3600,
        renewable: bool = True,
        token_max_ttl: float | None = None,
        namespace: str = "",
    ) -> None:
        with self._state.lock:
            roles = self._state.ns(namespace).approles
            role = roles.get(role_id)
            if role is None:
                roles[role_id] = _AppRole(
                    {secret_id}, tuple(policies), token_ttl, renewable, token_max_ttl
                )
            else:
                role.secret_ids.add(secret_id)

    def issued_tokens(self, *, namespace: str = "") -> list[str]:
        """Every token the stand-in knows in `namespace` (created or from logins), oldest first."""
        with self._state.lock:
            return list(self._state.ns(namespace).tokens)

    # -- faults --------------------------------------------------------------------------

    def seal(self) -> None:
        with self._state.lock:
            self._state.sealed = True

    def unseal(self) -> None:
        with self._state.lock:
            self._state.sealed = False

    def fail_next(
        self, path_prefix: str, status: int, count: int | None = 1, *, message: str | None = None
    ) -> None:
        """The next `count` requests whose API path starts with `path_prefix` get `status`.

        `count=None`: every such request, until `clear_faults()`. `message` replaces the
        error text (a leak test makes Vault's answer echo a secret).
        """
        with self._state.lock:
            self._state.faults.append(_Fault(path_prefix, status, count, message=message))

    def delay_next(self, path_prefix: str, seconds: float, count: int | None = 1) -> None:
        with self._state.lock:
            self._state.faults.append(_Fault(path_prefix, None, count, seconds))

    def clear_faults(self) -> None:
        with self._state.lock:
            self._state.faults.clear()

    # -- what happened -------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._state.lock:
            return list(self._state.requests)

    def requests_to(self, path: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == path]

    def clear_requests(self) -> None:
        with self._state.lock:
            self._state.requests.clear()

    @property
    def errors(self) -> list[str]:
        return list(self._server.errors) if self._server else []
