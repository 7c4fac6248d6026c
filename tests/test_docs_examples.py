"""Every YAML example of README.md, docs/ and examples/ is valid for the product.

Each ```yaml block carries a marker comment (tests/support/docblocks.py says which); the
block is validated with the product's own parsers in a sandbox: a repository directory
in tmp_path holding the stacks (with the variables the example sets) and the template and
file sources it names. A host-config fragment is merged into a minimal host config. A
manifest is checked against the limits of docs/host-config.md's complete example, so the
pages also agree with each other (a fleet's template under `allowed_paths`).

No mocks: `parse_manifest` and `parse_host_config` are what `agent validate` and the
daemon run.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.config import ManifestLimits, parse_host_config, parse_manifest
from tests.support.docblocks import ROOT, Block, all_blocks, blocks

VALIDATED = [b for b in all_blocks() if b.marker == "validate"]
BASE_HOST_CONFIG: dict[str, Any] = {"repo": {"url": "file:///srv/git/infra.git"}}
# What the nested fragments need around them (a Vault backend to hang `auth` on).
CONTEXT = {
    "secrets.vault": {
        "secrets": {"allowed": ["vault:kv/prod/"], "vault": {"address": "https://vault:8200"}}
    },
}


def _ids(blocks: list[Block]) -> list[str]:
    return [f"{b.where} {b.argument}" for b in blocks]


def test_every_yaml_block_says_whether_it_is_validated() -> None:
    unmarked = [
        b.where
        for b in all_blocks()
        if b.info.startswith("yaml") and b.marker not in ("validate", "not validated")
    ]
    assert not unmarked, (
        "add <!-- validate: ... --> or <!-- not validated: REASON --> on the line before: "
        + ", ".join(unmarked)
    )


def test_the_pages_have_examples_of_each_kind() -> None:
    kinds = {b.argument.split(" in ")[0] for b in VALIDATED}
    assert kinds == {"manifest", "host-config", "host-config fragment", "resources"}
    assert len(VALIDATED) >= 25


@pytest.mark.parametrize("example", VALIDATED, ids=_ids(VALIDATED))
def test_the_example_is_valid(example: Block, tmp_path: Path) -> None:
    kind, _, at = example.argument.partition(" in ")
    if kind == "host-config":
        validate_host_config(example.text, example.where, tmp_path)
    elif kind == "host-config fragment":
        document = _nested(yaml.safe_load(example.text), at)
        context = next((c for path, c in CONTEXT.items() if at.startswith(path)), {}) if at else {}
        merged = _merge(copy.deepcopy({**BASE_HOST_CONFIG, **context}), document)
        validate_host_config(yaml.safe_dump(merged), example.where, tmp_path)
    elif kind == "manifest":
        validate_manifest(yaml.safe_load(example.text), example.where, tmp_path)
    elif kind == "resources":
        validate_manifest(_fleet_around(yaml.safe_load(example.text)), example.where, tmp_path)
    else:
        pytest.fail(f"{example.where}: unknown marker argument {example.argument!r}")


def test_the_quickstart_manifest_is_valid(tmp_path: Path) -> None:
    quickstart = ROOT / "examples" / "quickstart"
    # The quickstart writes its own directory in place of the placeholder.
    text = (quickstart / "gitops.yaml").read_text().replace("@QUICKSTART_DIR@", str(tmp_path))
    parse_manifest(text, "examples/quickstart/gitops.yaml", quickstart, ManifestLimits())


# --- the sandbox ----------------------------------------------------------------------------


def validate_host_config(text: str, where: str, tmp_path: Path) -> None:
    parse_host_config(text, f"{where} (agent.yaml)", tmp_path)


def host_limits() -> ManifestLimits:
    """The limits docs/host-config.md's complete example sets, with a Vault backend."""
    page = ROOT / "docs" / "host-config.md"
    example = next(b for b in blocks(page) if b.argument == "host-config")
    config = parse_host_config(example.text, example.where, Path("/etc/gitops-agent"))
    return ManifestLimits(
        allowed_paths=config.allowed_paths,
        max_unit_timeout=config.policy.max_unit_timeout,
        default_timeout=config.terraform.timeout,
        secret_prefixes=("vault:kv/prod/",),
        secret_backends=frozenset({"vault"}),
    )


def validate_manifest(document: dict[str, Any], where: str, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    for unit in document.get("units") or []:
        if isinstance(unit, dict) and isinstance(unit.get("stack"), str):
            names = [*(unit.get("vars") or {}), *(unit.get("secrets") or {})]
            stack = repo / unit["stack"]
            stack.mkdir(parents=True, exist_ok=True)
            variables = "".join(f'variable "{name}" {{}}\n' for name in names)
            (stack / "main.tf").write_text(variables or "# a stack\n")
    for source in _sources(document):
        (repo / source).parent.mkdir(parents=True, exist_ok=True)
        (repo / source).write_text("{{ host.name }}\n")
    repo.mkdir(exist_ok=True)
    parse_manifest(
        yaml.safe_dump(document, sort_keys=False), f"{where} (gitops.yaml)", repo, host_limits()
    )


def _fleet_around(fragment: Any) -> dict[str, Any]:
    """A manifest whose fleet has the resources (a list) or the roles/handlers (a mapping)."""
    roles = {"docs": fragment} if isinstance(fragment, list) else dict(fragment.get("roles") or {})
    handlers = {} if isinstance(fragment, list) else dict(fragment.get("handlers") or {})
    for items in roles.values():
        for item in items:
            for name in item.get("notify") or []:
                handlers.setdefault(name, {"service": "app", "action": "restart"})
    fleet: dict[str, Any] = {"hosts": {"static": [{"name": "web1", "address": "10.0.0.5"}]}}
    fleet["roles" if roles else "resources"] = list(roles) or []
    document: dict[str, Any] = {"version": 1, "units": [{"name": "web", "fleet": fleet}]}
    if roles:
        document["roles"] = roles
    if handlers:
        document["handlers"] = handlers
    return document


def _sources(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["source"]] if isinstance(node.get("source"), str) else []
        return found + [s for value in node.values() for s in _sources(value)]
    if isinstance(node, list):
        return [s for value in node for s in _sources(value)]
    return []


def _nested(document: Any, at: str) -> Any:
    for key in reversed(at.split(".")) if at else ():
        document = {key: document}
    return document


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base
