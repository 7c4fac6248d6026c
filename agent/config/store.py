"""The host config's `store`: where the run store is. Absent: the SQLite file in
`state_dir`. With `url_file`, a PostgreSQL database (docs/store.md):

    store:
      url_file: /etc/gitops-agent/credentials/store-url   # postgresql://agent:...@db/agent
      retry_for: 60s     # how long the agent waits for the database to come back
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent.config.secrets import PathReader
from agent.config.service import read_secret_file
from agent.config.yamlnodes import Value
from agent.errors import ConfigError

_SCHEMES = ("postgresql://", "postgres://")
DEFAULT_RETRY_FOR = 60.0
MAX_RETRY_FOR = 3600.0


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """A PostgreSQL run store; the URL (a credential) is read from `url_file` when opened."""

    url_file: Path
    where: str  # "agent.yaml:12: store.url_file", for errors at run time
    # How long a statement waits for a database that went away (a restart) before it fails.
    retry_for: float = DEFAULT_RETRY_FOR

    def url(self) -> str:
        """The database URL from its file (mode 0600 or stricter)."""
        url = read_secret_file(self.url_file, self.where, "the run store's PostgreSQL URL")
        if not url.startswith(_SCHEMES):
            raise ConfigError(
                f"{self.where}: {self.url_file} should hold a postgresql:// URL",
                hint="postgresql://USER:PASSWORD@HOST:5432/DATABASE",
            )
        return url


def read_store(value: Value | None, base_dir: Path, path_of: PathReader) -> StoreConfig | None:
    """`store`, or None for the default SQLite store; problems go to the problem list."""
    fields = value.mapping(["url_file", "retry_for"]) if value else None
    if fields is None:
        return None
    found = fields.require("url_file", "a file holding a postgresql:// URL")
    path = path_of(found, base_dir) if found else None
    wait = fields.get("retry_for")
    retry_for = wait.duration(maximum=MAX_RETRY_FOR) if wait else DEFAULT_RETRY_FOR
    if found is None or path is None or retry_for is None:
        return None
    where = f"{found.problems.filename}:{found.line}: {found.path}"
    return StoreConfig(path, where, retry_for)
