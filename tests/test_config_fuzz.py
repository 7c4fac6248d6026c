"""Fuzzing both configs with hypothesis: whatever the repository or the operator writes,
the only thing that escapes is a ConfigError naming file:line (issue 10, "keep the
batteries"), never a traceback.

Inputs are mutations of real, valid files (the quickstart's manifest and host config, the
YAML examples of docs/, the table cases of tests/cases/config), at the text level (bytes
inserted, deleted, lines duplicated or dropped) and at the tree level (a value anywhere
replaced by a random YAML value, a key removed), plus random YAML documents built from the
keys both configs know. Sizes are bounded (a few KiB per document) and the number of
examples is fixed, so the module runs in well under 30 s.
"""

from __future__ import annotations

import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.cli.quickstart import HOST_CONFIG, PLACEHOLDER
from agent.config import ManifestLimits, parse_host_config, parse_manifest
from agent.config.fleet import FLEET_KEYS, HOST_KEYS
from agent.config.fleetresources import KIND_ATTRS, KINDS
from agent.config.manifest import UNIT_KEYS
from agent.errors import ConfigError
from tests.test_config_cases import build_case_repo

ROOT = Path(__file__).resolve().parent.parent
CASES = ROOT / "tests" / "cases" / "config"
HOST_BASE_DIR = Path("/etc/gitops-agent")
LIMITS = (
    ManifestLimits(allowed_paths=("stacks",)),
    ManifestLimits(
        allowed_paths=(".",),
        secret_prefixes=("vault:kv/prod/", "file:/etc/gitops-agent/", "aws-ssm:/prod/"),
        secret_backends=frozenset({"vault", "file", "aws-ssm", "aws-sm"}),
    ),
)
_FUZZ = settings(
    max_examples=120,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
_LOCATED = re.compile(r"^(gitops\.yaml|agent\.yaml):\d+: ")


def _yaml_blocks(*pages: str) -> list[str]:
    blocks = []
    for page in pages:
        text = (ROOT / "docs" / page).read_text()
        blocks += re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    return blocks


def _as_manifest(block: str) -> str | None:
    """A docs example as a whole manifest: resource snippets go into a role of a fleet."""
    try:
        data = yaml.safe_load(block)
    except yaml.YAMLError:
        return None
    if isinstance(data, dict) and "units" in data:
        return block
    if isinstance(data, dict) and any(kind in data for kind in KINDS):
        data = [data]
    if not isinstance(data, list):
        return None
    fleet = {"hosts": {"static": [{"name": "web1", "address": "10.0.0.5"}]}, "roles": ["r"]}
    return yaml.safe_dump(
        {"version": 1, "units": [{"name": "web", "fleet": fleet}], "roles": {"r": data}}
    )


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The case repository plus the quickstart's stacks and templates."""
    repo = build_case_repo(tmp_path_factory.mktemp("fuzz"))
    quickstart = ROOT / "examples" / "quickstart"
    shutil.copytree(quickstart / "stacks" / "app", repo / "stacks" / "app")
    shutil.copytree(quickstart / "templates", repo / "templates")
    (repo / "templates" / "nginx.conf.j2").write_text("worker_processes {{ workers }};\n")
    return repo


def _manifest_seeds(repo: Path) -> list[str]:
    quickstart = (ROOT / "examples" / "quickstart" / "gitops.yaml").read_text()
    seeds = [quickstart.replace(PLACEHOLDER, str(repo.parent))]
    seeds += [p.read_text() for p in sorted((CASES / "manifest").glob("*.yaml"))]
    seeds += [m for b in _yaml_blocks("manifest.md", "resources.md") if (m := _as_manifest(b))]
    return seeds


def _as_host_config(block: str) -> str:
    """A docs example as a whole host config: a part of one is added to the quickstart's."""
    try:
        data = yaml.safe_load(block)
    except yaml.YAMLError:
        return block
    if not isinstance(data, dict) or "repo" in data:
        return block
    return yaml.safe_dump({**yaml.safe_load(_QUICKSTART_HOST), **data})


_QUICKSTART_HOST = HOST_CONFIG.format(root="/srv/qs", python=sys.executable)
_HOST_PAGES = ("host-config.md", "git-source.md", "metrics.md", "notifications.md")
_HOST_PAGES += ("secrets.md", "signed-commits.md", "transports.md", "webhooks.md")
HOST_SEEDS = [
    _QUICKSTART_HOST,
    *(p.read_text() for p in sorted((CASES / "host").glob("*.yaml"))),
    *(_as_host_config(block) for block in _yaml_blocks(*_HOST_PAGES)),
]

_KEYS = sorted(
    {
        *UNIT_KEYS,
        *FLEET_KEYS,
        *HOST_KEYS,
        *KINDS,
        *(key for attrs in KIND_ATTRS.values() for key in attrs),
        *("version", "defaults", "units", "roles", "handlers", "static", "from_stack"),
        *("repo", "url", "branch", "state_dir", "intervals", "terraform", "policy", "hosts"),
        *("secrets", "allowed", "vault", "aws", "http", "notifications", "daemon", "signing"),
        *("notify", "state", "service", "action", "output", "unit", "address", "poll"),
    }
)
_WORDS = ["1", "stacks/base", "stacks/escape", "../etc", "/etc/passwd", "5m", "0s", "-1s"]
_WORDS += ["templates/app.conf.j2", "revert", "base", "app", "web1", "local", "0644", "9999"]
_WORDS += ["vault:kv/prod/db#password", "file:/etc/gitops-agent/x", "{{ secrets.x }}", "{{"]
_WORDS += ["{% include 'x' %}", "ssh://h/x", "git@h:x", "file:///x", "-x", "\x00", "*"]
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),
    st.sampled_from(_WORDS),
    st.text(max_size=12),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=5), children, max_size=5),
    ),
    max_leaves=20,
)


def _check(parse: Callable[[str], object], text: str) -> None:
    """Parsing may succeed, or fail with a ConfigError whose every line names file:line."""
    try:
        parse(text)
    except ConfigError as exc:
        for line in str(exc).splitlines():
            assert _LOCATED.match(line), line


def _parsers(repo: Path, limits: ManifestLimits) -> dict[str, Callable[[str], object]]:
    return {
        "manifest": lambda text: parse_manifest(text, "gitops.yaml", repo, limits),
        "host": lambda text: parse_host_config(text, "agent.yaml", HOST_BASE_DIR),
    }


# --- text mutations ---------------------------------------------------------------------------

_EDIT = st.tuples(
    st.sampled_from(["insert", "delete", "duplicate-line", "drop-line", "truncate", "indent"]),
    st.integers(min_value=0, max_value=10**6),
    st.integers(min_value=0, max_value=40),
    st.text(alphabet=st.sampled_from(list("ab:-[]{},&*!|>'\"#\n\t .1%@?{}$\\")), max_size=8),
)


def _mutate_text(text: str, edits: list[tuple[str, int, int, str]]) -> str:
    for op, position, length, junk in edits:
        at = position % (len(text) + 1)
        lines = text.splitlines(keepends=True) or [""]
        row = position % len(lines)
        if op == "insert":
            text = text[:at] + junk + text[at:]
        elif op == "delete":
            text = text[:at] + text[at + length :]
        elif op == "duplicate-line":
            text = "".join([*lines[: row + 1], lines[row], *lines[row + 1 :]])
        elif op == "drop-line":
            text = "".join(lines[:row] + lines[row + 1 :])
        elif op == "truncate":
            text = text[:at]
        else:
            text = "".join([*lines[:row], "  " + lines[row], *lines[row + 1 :]])
    return text


@_FUZZ
@given(
    kind=st.sampled_from(["manifest", "host"]),
    seed=st.integers(min_value=0),
    strict=st.booleans(),
    edits=st.lists(_EDIT, min_size=1, max_size=4),
)
def test_text_mutations_of_valid_files(
    repo: Path, kind: str, seed: int, strict: bool, edits: list[tuple[str, int, int, str]]
) -> None:
    seeds = _manifest_seeds(repo) if kind == "manifest" else HOST_SEEDS
    text = _mutate_text(seeds[seed % len(seeds)], edits)
    _check(_parsers(repo, LIMITS[strict])[kind], text)


# --- tree mutations ---------------------------------------------------------------------------


def _mutate_tree(node: Any, path: list[int], replacement: Any, delete: bool) -> Any:
    """Replace (or delete) the value reached by following `path` (indexes mod each size)."""
    if not path or not isinstance(node, dict | list) or not node:
        return replacement
    step, rest = path[0], path[1:]
    if isinstance(node, list):
        index = step % len(node)
        copy = list(node)
        if delete and not rest:
            del copy[index]
        else:
            copy[index] = _mutate_tree(node[index], rest, replacement, delete)
        return copy
    key = list(node)[step % len(node)]
    copy = dict(node)
    if delete and not rest:
        del copy[key]
    else:
        copy[key] = _mutate_tree(node[key], rest, replacement, delete)
    return copy


@_FUZZ
@given(
    kind=st.sampled_from(["manifest", "host"]),
    seed=st.integers(min_value=0),
    strict=st.booleans(),
    path=st.lists(st.integers(min_value=0, max_value=50), max_size=7),
    replacement=_VALUES,
    delete=st.booleans(),
)
def test_tree_mutations_of_valid_files(
    repo: Path,
    kind: str,
    seed: int,
    strict: bool,
    path: list[int],
    replacement: Any,
    delete: bool,
) -> None:
    seeds = _manifest_seeds(repo) if kind == "manifest" else HOST_SEEDS
    try:
        tree = yaml.safe_load(seeds[seed % len(seeds)])
    except yaml.YAMLError:
        tree = None
    text = yaml.safe_dump(_mutate_tree(tree, path, replacement, delete), allow_unicode=True)
    _check(_parsers(repo, LIMITS[strict])[kind], text)


# --- random YAML ------------------------------------------------------------------------------


@_FUZZ
@given(document=_VALUES, strict=st.booleans())
def test_random_yaml_documents(repo: Path, document: Any, strict: bool) -> None:
    parsers = _parsers(repo, LIMITS[strict])
    for text in (
        yaml.safe_dump(document),
        yaml.safe_dump({"version": 1, "units": [document], "roles": {"r": [document]}}),
        yaml.safe_dump(
            {"version": 1, "units": [{"name": "w", "fleet": document}], "handlers": document}
        ),
    ):
        _check(parsers["manifest"], text)
    for text in (yaml.safe_dump(document), yaml.safe_dump({"repo": document, "hosts": document})):
        _check(parsers["host"], text)
