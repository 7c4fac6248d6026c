"""Who may read the page: a pure decision from the request's facts and the config.

- A listener with neither a token nor a trusted proxy (only allowed on loopback, see
  agent.config.web) is open.
- `Authorization: Bearer <token>` with the token from `token_file`, or the session cookie
  the login form sets after the same token was typed in (a browser cannot send a bearer
  header when it follows a link). The cookie holds a keyed hash of the token, never the
  token, and is HttpOnly and SameSite=Strict.
- A request from a trusted proxy's address that carries the user header (the proxy
  authenticated the user and says who). The header from any other address is ignored:
  anyone can send a header.

Tokens are compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from agent.config.web import WebConfig

__all__ = ["COOKIE", "Verdict", "check", "session_value"]

COOKIE = "gitops_agent_web"


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    who: str  # "open", "token", "proxy:<user>", or why not


def session_value(token: str) -> str:
    """The cookie's value for `token`: stands for it without revealing it."""
    return hmac.new(token.encode(), b"gitops-agent web session", hashlib.sha256).hexdigest()


def _cookie(header: str) -> str | None:
    for part in header.split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE:
            return value
    return None


def _from_proxy(config: WebConfig, remote: str) -> bool:
    try:
        address = ipaddress.ip_address(remote)
    except ValueError:
        return False
    return any(address in network for network in config.trusted_proxies)


def check(config: WebConfig, token: str | None, remote: str, headers: Mapping[str, str]) -> Verdict:
    """Whether a request from `remote` with `headers` may read the page."""
    if config.open:
        return Verdict(True, "open")
    if config.trusted_proxies and _from_proxy(config, remote):
        user = headers.get(config.user_header, "").strip()
        if user:
            return Verdict(True, f"proxy:{user[:64]}")
    if token:
        scheme, _, given = headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), token.encode()
        ):
            return Verdict(True, "token")
        session = _cookie(headers.get("Cookie", ""))
        if session and hmac.compare_digest(session.encode(), session_value(token).encode()):
            return Verdict(True, "token")
    return Verdict(False, "no valid token or trusted proxy header")
