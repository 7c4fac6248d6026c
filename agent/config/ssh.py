"""The `hosts:` section of the host config: how the agent reaches the machines of fleets.

The SSH identity, the known_hosts file and whether unknown keys may be trusted on first
use belong to the operator, never to the repository. A fleet host whose address is
`local` is the agent's own machine; only `allow_local: true` permits that.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.config.yamlnodes import Value
from providers.hosts.ec2 import Ec2Settings

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_COMMAND_TIMEOUT = 600.0
DEFAULT_PARALLELISM = 10
DEFAULT_HANDSHAKES = 8

PathReader = Callable[[Value, Path], Path | None]


@dataclass(frozen=True, slots=True)
class JumpHost:
    address: str
    port: int = 22
    user: str = "root"


@dataclass(frozen=True, slots=True)
class HostsConfig:
    """How fleets are reached. `key_file`/`known_hosts` None: no SSH hosts can be used."""

    key_file: Path | None = None
    known_hosts: Path | None = None
    trust_on_first_use: bool = False
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    command_timeout: float = DEFAULT_COMMAND_TIMEOUT
    parallelism: int = DEFAULT_PARALLELISM
    handshakes: int = DEFAULT_HANDSHAKES
    jump: JumpHost | None = None
    allow_local: bool = False
    python: str = "python3"
    #: EC2 inventory for `hosts: {ec2: ...}` fleets; None: the repository cannot use it.
    aws: Ec2Settings | None = None


def read_hosts(value: Value | None, base_dir: Path, read_path: PathReader) -> HostsConfig:
    """Read `hosts:`; problems are recorded on the values (file, line, key)."""
    if value is None:
        return HostsConfig()
    fields = value.mapping(
        [
            "key_file",
            "known_hosts",
            "trust_on_first_use",
            "connect_timeout",
            "command_timeout",
            "parallelism",
            "handshakes",
            "jump",
            "allow_local",
            "python",
            "aws",
        ]
    )
    if fields is None:
        return HostsConfig()
    key_file = read_path(found, base_dir) if (found := fields.get("key_file")) else None
    known = read_path(found, base_dir) if (found := fields.get("known_hosts")) else None
    if (fields.get("key_file") is None) != (fields.get("known_hosts") is None):
        missing = "known_hosts" if fields.get("known_hosts") is None else "key_file"
        value.fail("key_file and known_hosts together (SSH needs both)", f"no {missing}")
    tofu = fields.get("trust_on_first_use")
    local = fields.get("allow_local")
    connect = fields.get("connect_timeout")
    command = fields.get("command_timeout")
    parallelism = fields.get("parallelism")
    handshakes = fields.get("handshakes")
    python = fields.get("python")
    jump = _jump(fields.get("jump"))
    return HostsConfig(
        key_file=key_file,
        known_hosts=known,
        trust_on_first_use=bool(tofu.boolean()) if tofu else False,
        connect_timeout=(connect.duration() if connect else None) or DEFAULT_CONNECT_TIMEOUT,
        command_timeout=(command.duration() if command else None) or DEFAULT_COMMAND_TIMEOUT,
        parallelism=(parallelism.integer(minimum=1) if parallelism else None)
        or DEFAULT_PARALLELISM,
        handshakes=(handshakes.integer(minimum=1) if handshakes else None) or DEFAULT_HANDSHAKES,
        jump=jump,
        allow_local=bool(local.boolean()) if local else False,
        python=(python.string("an interpreter name or path") if python else None) or "python3",
        aws=_aws(fields.get("aws")),
    )


def _aws(value: Value | None) -> Ec2Settings | None:
    """`hosts.aws: {region, endpoint_url, role_arn, host_key_tag}`; `{}` uses boto3's
    default chain."""
    if value is None:
        return None
    fields = value.mapping(["region", "endpoint_url", "role_arn", "host_key_tag"])
    if fields is None:
        return None
    texts: dict[str, str | None] = {}
    for key, what in (
        ("region", "an AWS region name"),
        ("endpoint_url", "an http(s) URL"),
        ("role_arn", "an IAM role ARN"),
        ("host_key_tag", "a tag key"),
    ):
        found = fields.get(key)
        texts[key] = found.string(what) if found else None
    url = texts["endpoint_url"]
    if url is not None and not url.startswith(("https://", "http://")):
        fields.entries["endpoint_url"].fail("an http(s) URL", repr(url))
    arn = texts["role_arn"]
    if arn is not None and not arn.startswith("arn:"):
        fields.entries["role_arn"].fail("an IAM role ARN (arn:aws:iam::ACCOUNT:role/NAME)")
    return Ec2Settings(
        region=texts["region"], endpoint_url=url, role_arn=arn, host_key_tag=texts["host_key_tag"]
    )


def _jump(value: Value | None) -> JumpHost | None:
    if value is None:
        return None
    fields = value.mapping(["address", "port", "user"])
    if fields is None:
        return None
    address_value = fields.require("address", "the jump host's address")
    address = address_value.string("an address") if address_value else None
    port = found.integer(minimum=1) if (found := fields.get("port")) else None
    user = found.string("a user name") if (found := fields.get("user")) else None
    if address is None:
        return None
    return JumpHost(address=address, port=port or 22, user=user or "root")
