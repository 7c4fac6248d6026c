"""Notifications through apprise: Microsoft Teams, email over SMTP, PagerDuty, Opsgenie,
Matrix, ntfy and the 100+ other services apprise speaks, from one URL per sink
(`msteams://...`, `mailtos://...`, `pagerduty://...`, `opsgenie://...`).

`agent.service.notify` keeps the queue, retries, repeat suppression and redaction for every sink;
this module is only the delivery: one apprise notification with a title and a plain-text
body that were redacted before they got here. apprise's own log lines are kept away
from the agent's log (they can name recipients or hosts) and the last warning of a failed
delivery is returned as its reason, for the caller to scrub and log.

apprise reports success or failure, not why: a failure is retried like a 5xx, within the
sink's retry window.
"""

from __future__ import annotations

import logging
import re

import apprise

__all__ = ["AppriseSender", "apprise_scheme_ok"]

# apprise's own records stay out of the agent's log (they can name recipients and hosts);
# a failed delivery's warnings come back on its result instead (`AppriseResult.logs()`).
_LOGGER = logging.getLogger("apprise")
_LOGGER.propagate = False
_SCHEME_RE = re.compile(r"([a-z][a-z0-9+]{1,31})://")


def apprise_scheme_ok(url: str) -> bool:
    """Whether apprise has a service for `url` and can read it (nothing is sent)."""
    return apprise.Apprise.instantiate(url, suppress_exceptions=True) is not None


class AppriseSender:
    """Sends to one apprise URL. The URL is a credential: it is never in a message."""

    def __init__(self, url: str) -> None:
        # Sequential: each sink has its own worker thread already.
        asset = apprise.AppriseAsset(async_mode=False)
        service = apprise.Apprise.instantiate(url, asset=asset, suppress_exceptions=True)
        if service is None:
            match = _SCHEME_RE.match(url)
            scheme = match.group(1) if match else "none"
            raise ValueError(
                f"apprise has no service for a URL with scheme {scheme!r}, or cannot read it"
            )
        self._apprise = apprise.Apprise(asset=asset)
        self._apprise.add(service)
        self.scheme = _SCHEME_RE.match(url).group(1)  # type: ignore[union-attr]

    def __repr__(self) -> str:
        return f"AppriseSender({self.scheme}://…)"

    def send(self, title: str, body: str, *, failure: bool = False) -> str | None:
        """Deliver one notification; None when delivered, else apprise's last warning (or a
        generic reason). `failure` marks it as such where the service can show it.

        No overall timeout is given to apprise: one that expires leaves the delivery going
        on in apprise's thread, and the retry would then send it twice. Each service's own
        socket timeouts bound it (4 s to connect, 4 s to read; `cto=`/`rto=` in the URL),
        plus apprise's pause between two messages to one service (5.5 s for most)."""
        kind = apprise.NotifyType.FAILURE if failure else apprise.NotifyType.INFO
        try:
            result = self._apprise.notify(
                body=body, title=title, notify_type=kind, log_level=logging.WARNING
            )
        except Exception as exc:  # a plugin's bug must not stop the sink's worker
            return f"apprise failed ({type(exc).__name__})"
        if result:
            return None
        warnings = [e.message for e in result.logs() if e.level in ("WARNING", "ERROR")]
        return warnings[-1] if warnings else f"{self.scheme}: not delivered"
