"""The host config's `web:` section: the read-only web page's listener and who may read it.

    web:
      listen: 127.0.0.1:9200          # loopback: may be open (no token, no proxy)
      token_file: /etc/gitops-agent/web-token     # Authorization: Bearer, or the login form
      trusted_proxies: [10.0.0.5]     # requests from these addresses are authenticated
      user_header: X-Forwarded-User   #   by this header, which the proxy sets

Off when the section is absent. Any listen address other than a loopback one needs a
token file or a trusted proxy: the page shows plans and outputs, so it is never open to a
network by accident. The token itself is read when the daemon starts (`read_secret_file`).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from agent.config.service import PathReader, _listen, _where
from agent.config.yamlnodes import Value

__all__ = ["DEFAULT_USER_HEADER", "WebConfig", "is_loopback", "read_web"]

DEFAULT_USER_HEADER = "X-Forwarded-User"
_HEADER_RE = re.compile(r"[A-Za-z0-9-]{1,64}")


@dataclass(frozen=True, slots=True)
class WebConfig:
    """The web page's listener. `trusted_proxies` are networks (a lone address is a /32)."""

    host: str
    port: int
    token_file: Path | None = None
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    user_header: str = DEFAULT_USER_HEADER
    where: str = ""  # "agent.yaml:30: web.token_file", for errors reading the token

    @property
    def open(self) -> bool:
        """Whether the page needs no authentication (loopback, nothing configured)."""
        return self.token_file is None and not self.trusted_proxies


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or `localhost`) only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_web(value: Value | None, base_dir: Path, path_of: PathReader) -> WebConfig | None:
    """Read `web:`; problems are recorded on the values (file, line, key)."""
    if value is None:
        return None
    fields = value.mapping(["listen", "token_file", "trusted_proxies", "user_header"])
    if fields is None:
        return None
    address = None
    if found := fields.require("listen", "HOST:PORT, like 127.0.0.1:9200"):
        address = _listen(found)
    token_file, where = None, _where(value)
    if found := fields.get("token_file"):
        token_file, where = path_of(found, base_dir), _where(found)
    proxies = []
    if found := fields.get("trusted_proxies"):
        for item in found.sequence(non_empty=True) or ():
            text = item.string("an address or network, like 10.0.0.5 or 10.0.0.0/24")
            try:
                proxies.append(ipaddress.ip_network(text or "", strict=False))
            except ValueError:
                item.fail("an address or network, like 10.0.0.5 or 10.0.0.0/24")
    user_header = DEFAULT_USER_HEADER
    if found := fields.get("user_header"):
        text = found.string("a header name, like X-Forwarded-User")
        if text is not None and not _HEADER_RE.fullmatch(text):
            found.fail("a header name (letters, digits and -)")
        elif text is not None:
            user_header = text
    if address is None:
        return None
    config = WebConfig(address[0], address[1], token_file, tuple(proxies), user_header, where)
    if config.open and not is_loopback(config.host):
        listen = fields.get("listen")
        assert listen is not None
        listen.fail(
            "a loopback address (127.0.0.1, [::1]), or token_file or trusted_proxies set:"
            " the page is never open to a network",
            f"{config.host}, open to anyone who can reach it",
        )
        return None
    return config
