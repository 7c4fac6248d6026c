"""The web page as the daemon runs it: built from the host config, fed the pass events.

agent/service/daemon.py builds it (`WebPage.from_host`: None unless `web:` is configured),
starts and stops it beside its HTTP listener, and hands it every event of a pass.
"""

from __future__ import annotations

from agent.config.host import HostConfig
from agent.config.service import read_secret_file
from agent.config.web import WebConfig
from agent.core.progress import Event
from agent.core.redact import Redactor
from agent.state.layout import StateLayout
from agent.state.store import RunStore
from agent.web.events import EventHub
from agent.web.server import WebApp, WebServer
from providers.git_source import GitSource

__all__ = ["WebPage"]


class WebPage:
    """The page's listener, its event hub and its own read-only connection to the store."""

    def __init__(self, host: HostConfig, config: WebConfig, redactor: Redactor) -> None:
        token = None
        if config.token_file is not None:
            token = read_secret_file(config.token_file, config.where, "the web page's token")
            redactor.register(token)  # never in a log line, a page or an event
        self.hub = EventHub(redactor.redact)
        self.layout = StateLayout(host.state_dir)
        # Its own connection: a page is read while a pass writes, and never writes.
        self.store = RunStore(host.state_dir, read_only=True)
        source = GitSource(host.repo.url, host.repo.branch, self.layout.checkout)
        app = WebApp(
            self.store,
            self.layout,
            redact=redactor.redact,
            hub=self.hub,
            commit=source.commit_info,
        )
        self.server = WebServer(app, config, token=token)

    @classmethod
    def from_host(cls, host: HostConfig, redactor: Redactor) -> WebPage | None:
        """The page the host config asks for, or None (`web:` absent: off)."""
        config = host.service.web
        return cls(host, config, redactor) if config is not None else None

    def __call__(self, event: Event) -> None:
        self.hub(event)

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()
        self.store.close()
