"""The host config's `terraform.state_backend`: one remote backend for every stack that
declares none of its own (docs/terraform.md, "Remote state").

    terraform:
      state_backend:
        s3: {bucket: infra-state, region: eu-west-1, key_prefix: gitops-agent/}
        # or
        pg: {conn_str_file: /etc/gitops-agent/state-db.conn, schema_prefix: gitops_agent_}
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.config.secrets import PathReader
from agent.config.service import read_secret_file
from agent.config.yamlnodes import Value
from providers.terraform.backend import StateBackend, pg_backend, s3_backend

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_PREFIX = re.compile(r"^[A-Za-z0-9_./-]*$")
_SCHEMA_PREFIX = re.compile(r"^[a-z_][a-z0-9_]*$")


@dataclass(frozen=True, slots=True)
class StateBackendConfig:
    """`terraform.state_backend` as written; `open()` makes the provider's backend."""

    kind: str  # "s3" | "pg"
    prefix: str
    bucket: str = ""
    region: str = ""
    endpoint: str | None = None
    conn_str_file: Path | None = None
    where: str = ""  # "agent.yaml:12: terraform.state_backend.pg.conn_str_file"

    def open(self, register: Callable[[str], None]) -> StateBackend:
        """The backend, reading the connection string file now (`register` hands it to
        the redactor before anything could print it)."""
        if self.kind == "s3":
            return s3_backend(
                bucket=self.bucket, region=self.region, prefix=self.prefix, endpoint=self.endpoint
            )
        assert self.conn_str_file is not None
        conn_str = read_secret_file(self.conn_str_file, self.where, "a PostgreSQL connection")
        register(conn_str)
        return pg_backend(conn_str=conn_str, prefix=self.prefix)


def read_state_backend(
    value: Value | None, base_dir: Path, path_of: PathReader
) -> StateBackendConfig | None:
    """`terraform.state_backend`, or None; problems go to the value's problem list."""
    fields = value.mapping(["s3", "pg"]) if value else None
    if fields is None:
        return None
    kinds = [key for key, _ in fields]
    if len(kinds) != 1:
        assert value is not None
        value.fail("exactly one of s3 or pg")
        return None
    if found := fields.get("s3"):
        return _s3(found)
    if found := fields.get("pg"):
        return _pg(found, base_dir, path_of)
    return None


def _s3(value: Value) -> StateBackendConfig | None:
    fields = value.mapping(["bucket", "region", "key_prefix", "endpoint"])
    if fields is None:
        return None
    bucket = region = None
    if found := fields.require("bucket", "an S3 bucket name"):
        bucket = found.string("an S3 bucket name")
        if bucket is not None and not _BUCKET.match(bucket):
            bucket = found.fail("an S3 bucket name (3-63 of a-z, 0-9, '.', '-')")
    if found := fields.require("region", "an AWS region"):
        region = found.string("an AWS region")
    prefix = "gitops-agent/"
    if found := fields.get("key_prefix"):
        prefix = found.string("a key prefix", non_empty=False) or ""
        if not _PREFIX.match(prefix) or ".." in prefix or prefix.startswith("/"):
            found.fail("a key prefix of letters, digits and _ . / - (no leading / or ..)")
    endpoint = None
    if found := fields.get("endpoint"):
        endpoint = found.string("an http:// or https:// URL")
        if endpoint is not None and not re.match(r"https?://[^/\s]+", endpoint):
            endpoint = found.fail("an http:// or https:// URL")
    if bucket is None or region is None:
        return None
    return StateBackendConfig("s3", prefix, bucket=bucket, region=region, endpoint=endpoint)


def _pg(value: Value, base_dir: Path, path_of: PathReader) -> StateBackendConfig | None:
    fields = value.mapping(["conn_str_file", "schema_prefix"])
    if fields is None:
        return None
    conn_file, where = None, ""
    if found := fields.require("conn_str_file", "a file holding the connection string"):
        conn_file = path_of(found, base_dir)
        where = f"{found.problems.filename}:{found.line}: {found.path}"
    prefix = "gitops_agent_"
    if found := fields.get("schema_prefix"):
        prefix = found.string("a schema name prefix") or prefix
        if not _SCHEMA_PREFIX.match(prefix):
            found.fail("a schema name prefix of a-z, 0-9 and _ (not starting with a digit)")
    if conn_file is None:
        return None
    return StateBackendConfig("pg", prefix, conn_str_file=conn_file, where=where)
