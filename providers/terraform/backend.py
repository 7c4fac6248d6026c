"""A remote state backend the agent gives every stack that declares none of its own.

Several agents (or an agent and a person at a terminal) must never apply one stack at
once: with the state in S3 (`use_lockfile`, a conditional write of `KEY.tflock`) or in
PostgreSQL (advisory locks), Terraform's own lock is the guard, whichever machine runs it.

The backend block is written into the unit's shadow (workdir.py), never into the
checkout; a stack with a backend of its own keeps it. Credentials never go in that file:
S3 takes the AWS credentials of the agent's environment (instance profile, `AWS_*`), and
the PostgreSQL connection string goes to Terraform as `PG_CONN_STR`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

KINDS = ("s3", "pg")
# A unit's name as part of an S3 key or a PostgreSQL schema name.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class StateBackend:
    """Where every stack without a backend of its own keeps its state.

    `settings` are the backend's HCL attributes shared by every unit; `prefix` makes the
    per-unit part (`key` for s3, `schema_name` for pg); `env` goes to Terraform's
    environment only (a connection string is a credential).
    """

    kind: str
    settings: Mapping[str, object]
    prefix: str
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def where(self, unit: str) -> str:
        """Where `unit`'s state is, for messages (no credentials)."""
        if self.kind == "s3":
            return f"s3://{self.settings['bucket']}/{self.unit_key(unit)}"
        return f"the PostgreSQL schema {self.unit_key(unit)!r}"

    def unit_key(self, unit: str) -> str:
        if not _SAFE_NAME.match(unit):
            raise ValueError(f"unit name {unit!r} cannot name remote state")
        if self.kind == "s3":
            return f"{self.prefix}{unit}.tfstate"
        return f"{self.prefix}{unit}"

    def block(self, unit: str) -> str:
        """The `terraform { backend ... }` file for `unit`."""
        attributes = dict(self.settings)
        attributes["key" if self.kind == "s3" else "schema_name"] = self.unit_key(unit)
        lines = [f"    {name} = {_hcl(value)}" for name, value in attributes.items()]
        return (
            "# Written by gitops-agent: this unit's state, in the backend the host config names.\n"
            f'terraform {{\n  backend "{self.kind}" {{\n' + "\n".join(lines) + "\n  }\n}\n"
        )


def s3_backend(
    *, bucket: str, region: str, prefix: str = "gitops-agent/", endpoint: str | None = None
) -> StateBackend:
    """S3 with Terraform's own lock file (`use_lockfile`, Terraform >= 1.10).

    `endpoint` is for S3-compatible stores (MinIO, moto): path-style addressing, and none
    of the checks that only AWS itself answers (account id, metadata API, region list).
    """
    settings: dict[str, object] = {
        "bucket": bucket,
        "region": region,
        "use_lockfile": True,
        "encrypt": True,
    }
    if endpoint:
        settings.update(
            endpoints={"s3": endpoint},
            use_path_style=True,
            skip_credentials_validation=True,
            skip_requesting_account_id=True,
            skip_metadata_api_check=True,
            skip_region_validation=True,
        )
    return StateBackend("s3", MappingProxyType(settings), prefix)


def pg_backend(*, conn_str: str, prefix: str = "gitops_agent_") -> StateBackend:
    """PostgreSQL (`pg` backend): a schema per unit, locked with advisory locks."""
    return StateBackend(
        "pg", MappingProxyType({}), prefix, MappingProxyType({"PG_CONN_STR": conn_str})
    )


def _hcl(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        inner = ", ".join(f"{key} = {_hcl(item)}" for key, item in value.items())
        return "{ " + inner + " }"
    # An HCL string is a JSON string in which `${` and `%{` start templates.
    return json.dumps(str(value)).replace("${", "$${").replace("%{", "%%{")
