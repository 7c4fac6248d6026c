"""The repo manifest as a team writes it: units, order, vars, and the host's limits."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import MappingProxyType

import pytest

from agent.config import (
    ConfigValidationError,
    DriftPolicy,
    ManifestCache,
    ManifestLimits,
    StackOutputRef,
    Unit,
    find_cycles,
    load_manifest,
    parse_host_config,
    parse_manifest,
    topological_order,
)
from agent.errors import ConfigError

STACKS = ("stacks/base", "stacks/network", "stacks/web", "stacks/db")
LIMITS = ManifestLimits(allowed_paths=("stacks",), max_unit_timeout=7200.0)


# The variables the tests' stacks declare (a var a stack does not declare is an error).
STACK_VARIABLES = (
    "region",
    "enabled",
    "host",
    "nothing",
    "ratio",
    "replicas",
    "subnet",
    "tags",
    "zones",
)


def make_repo(root: Path, manifest: str | None = None, stacks: tuple[str, ...] = STACKS) -> Path:
    """A checkout with a `main.tf` in each stack directory and, optionally, gitops.yaml."""
    repo = root / "repo"
    for stack in stacks:
        (repo / stack).mkdir(parents=True)
        (repo / stack / "main.tf").write_text(
            "".join(f'variable "{name}" {{}}\n' for name in STACK_VARIABLES)
        )
    if manifest is not None:
        (repo / "gitops.yaml").write_text(manifest)
    return repo


def errors_of(text: str, repo: Path, limits: ManifestLimits = LIMITS) -> list[str]:
    with pytest.raises(ConfigValidationError) as caught:
        parse_manifest(text, "gitops.yaml", repo, limits)
    return caught.value.errors


FULL = """\
version: 1
defaults:
  drift: report
  timeout: 20m
units:
  - name: web
    stack: stacks/web
    depends_on: [base]
    timeout: 10m
    vars:
      region: eu-west-1
      replicas: 3
      ratio: 0.5
      enabled: true
      nothing: null
      zones: [a, b]
      tags: {owner: platform, cost: {center: 42}}
      subnet: {from_stack: {unit: network, output: subnet_id}}
    labels: {team: infra}
  - name: base
    stack: ./stacks/base/
    drift: revert
  - name: network
    stack: stacks/network
"""


def test_a_full_manifest_reads_into_frozen_units(tmp_path: Path) -> None:
    repo = make_repo(tmp_path, FULL)

    manifest = load_manifest(repo, LIMITS)

    assert manifest.path == repo / "gitops.yaml"
    assert manifest.version == 1
    assert manifest.units[0] == Unit(
        name="web",
        stack="stacks/web",
        depends_on=("base", "network"),
        drift=DriftPolicy.REPORT,
        timeout=600.0,
        vars={
            "region": "eu-west-1",
            "replicas": 3,
            "ratio": 0.5,
            "enabled": True,
            "nothing": None,
            "zones": ("a", "b"),
            "tags": {"owner": "platform", "cost": {"center": 42}},
            "subnet": StackOutputRef(unit="network", output="subnet_id"),
        },
        labels={"team": "infra"},
        line=6,
    )
    assert manifest.units[1] == Unit(
        name="base",
        stack="stacks/base",
        depends_on=(),
        drift=DriftPolicy.REVERT,
        timeout=1200.0,
        vars={},
        labels={},
        line=20,
    )
    assert manifest.get_unit("network") == manifest.units[2]
    assert manifest.get_unit("nope") is None


def test_units_vars_and_labels_cannot_be_changed(tmp_path: Path) -> None:
    unit = load_manifest(make_repo(tmp_path, FULL), LIMITS).units[0]

    assert isinstance(unit.vars, MappingProxyType)
    assert isinstance(unit.vars["tags"], MappingProxyType)
    assert isinstance(unit.vars["zones"], tuple)
    assert isinstance(unit.labels, MappingProxyType)
    with pytest.raises(TypeError):
        unit.vars["region"] = "us-east-1"  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        unit.name = "other"  # type: ignore[misc]
    assert hash(unit)  # units can be set members and dict keys


def test_timeouts_default_to_the_host_default(tmp_path: Path) -> None:
    text = "version: 1\nunits:\n  - {name: base, stack: stacks/base}\n"
    limits = ManifestLimits(default_timeout=900.0)

    manifest = parse_manifest(text, "gitops.yaml", make_repo(tmp_path), limits)

    assert manifest.units[0].timeout == 900.0
    assert manifest.units[0].drift is DriftPolicy.REVERT


def test_order_puts_dependencies_first_and_otherwise_keeps_file_order(tmp_path: Path) -> None:
    text = """\
version: 1
units:
  - {name: web, stack: stacks/web, depends_on: [db, network]}
  - {name: db, stack: stacks/db, depends_on: [network]}
  - {name: base, stack: stacks/base}
  - {name: network, stack: stacks/network, depends_on: [base]}
"""
    manifest = parse_manifest(text, "gitops.yaml", make_repo(tmp_path), LIMITS)

    assert manifest.order() == ("base", "network", "db", "web")
    assert manifest.dependents("base") == frozenset({"network", "db", "web"})
    assert manifest.dependents("db") == frozenset({"web"})
    assert manifest.dependents("web") == frozenset()


def test_a_stack_output_var_is_an_implicit_dependency(tmp_path: Path) -> None:
    manifest = load_manifest(make_repo(tmp_path, FULL), LIMITS)

    assert manifest.get_unit("web").depends_on == ("base", "network")  # type: ignore[union-attr]
    assert manifest.order() == ("base", "network", "web")
    assert manifest.dependents("network") == frozenset({"web"})


def test_every_cycle_is_reported_once_at_its_first_unit(tmp_path: Path) -> None:
    text = """\
version: 1
units:
  - {name: web, stack: stacks/web, depends_on: [db]}
  - name: db
    stack: stacks/db
    vars: {host: {from_stack: {unit: web, output: ip}}}
  - {name: base, stack: stacks/base, depends_on: [network]}
  - {name: network, stack: stacks/network, depends_on: [base]}
"""
    assert errors_of(text, make_repo(tmp_path)) == [
        "gitops.yaml:3: units[0]: expected units without a dependency cycle; got web -> db -> web",
        "gitops.yaml:7: units[2]: expected units without a dependency cycle;"
        " got base -> network -> base",
    ]


def test_a_stack_path_is_normalized_and_symlinks_inside_are_resolved(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    (repo / "stacks" / "current").symlink_to("web")
    text = "version: 1\nunits:\n  - {name: web, stack: stacks/./current/}\n"

    manifest = parse_manifest(text, "gitops.yaml", repo, LIMITS)

    assert manifest.units[0].stack == "stacks/web"


def test_a_stack_of_only_tf_json_files_is_a_stack(tmp_path: Path) -> None:
    repo = make_repo(tmp_path, stacks=())
    (repo / "generated").mkdir(parents=True)
    (repo / "generated" / "main.tf.json").write_text("{}")
    text = "version: 1\nunits:\n  - {name: gen, stack: generated}\n"

    manifest = parse_manifest(text, "gitops.yaml", repo, ManifestLimits())

    assert manifest.units[0].stack == "generated"


def test_with_the_whole_repo_allowed_the_error_says_inside_the_repository(tmp_path: Path) -> None:
    text = "version: 1\nunits:\n  - {name: base, stack: ../../etc}\n"

    assert errors_of(text, make_repo(tmp_path), ManifestLimits()) == [
        "gitops.yaml:3: units[0].stack: expected a relative path inside the repository;"
        " got '../../etc'",
    ]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("policy", "{destroy: allow}"),
        ("terraform", "{binary: /bin/sh}"),
        ("state_dir", "/tmp"),
        ("allowed_paths", "[.]"),
        ("repo", "{url: file:///elsewhere}"),
    ],
)
def test_the_manifest_cannot_set_host_settings(key: str, value: str, tmp_path: Path) -> None:
    text = f"version: 1\n{key}: {value}\nunits:\n  - {{name: base, stack: stacks/base}}\n"

    assert errors_of(text, make_repo(tmp_path)) == [
        f"gitops.yaml:2: {key}: unknown key;"
        " expected one of version, defaults, units, roles, handlers",
    ]


def test_the_host_policy_caps_unit_timeouts_and_stack_paths(tmp_path: Path) -> None:
    host = parse_host_config(
        "repo: {url: file:///srv/infra.git}\nallowed_paths: [stacks/web]\n"
        "policy: {max_unit_timeout: 30m}\n",
        "agent.yaml",
        tmp_path,
    )
    text = """\
version: 1
defaults: {timeout: 1h}
units:
  - name: web
    stack: stacks/web
    timeout: 31m
  - {name: base, stack: stacks/base}
"""
    limits = ManifestLimits.from_host(host)

    assert errors_of(text, make_repo(tmp_path), limits) == [
        "gitops.yaml:2: defaults.timeout: expected a duration of at most 30m (host policy);"
        " got '1h'",
        "gitops.yaml:6: units[0].timeout: expected a duration of at most 30m (host policy);"
        " got '31m'",
        "gitops.yaml:7: units[1].stack: expected a path under one of: stacks/web/;"
        " got 'stacks/base'",
    ]


def test_a_missing_manifest_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_manifest(make_repo(tmp_path), LIMITS)

    assert str(caught.value) == (
        "gitops.yaml: expected a manifest at the repository root; got no such file"
    )


def test_a_revision_is_validated_once_and_anything_else_validates_again(tmp_path: Path) -> None:
    repo = make_repo(tmp_path, FULL)
    cache = ManifestCache()
    first = cache.load(repo, LIMITS, "a" * 40)
    assert cache.load(repo, LIMITS, "a" * 40) is first  # the same revision: reused
    assert cache.load(repo, LIMITS, "b" * 40) is not first  # another revision
    assert cache.load(repo, ManifestLimits(), "a" * 40) is not first  # other limits
    (repo / "gitops.yaml").write_text(FULL.replace("drift: report", "drift: revert"))
    changed = cache.load(repo, LIMITS, "a" * 40)  # other bytes, even under the same name
    assert changed.units[0].drift is DriftPolicy.REVERT
    (repo / "gitops.yaml").write_text(FULL.replace("timeout: 10m", "timeout: soon"))
    for _ in range(2):  # an invalid manifest is not kept: it fails every time
        with pytest.raises(ConfigValidationError, match=r"gitops.yaml:9: units\[0\].timeout"):
            cache.load(repo, LIMITS, "c" * 40)


def test_graph_helpers_directly() -> None:
    nodes = ["a", "b", "c", "d"]

    assert topological_order(nodes, {"a": ["c"], "c": ["d"]}) == ("b", "d", "c", "a")
    assert find_cycles(nodes, {"a": ["b"], "b": ["c", "a"], "c": ["a"], "d": ["d"]}) == [
        ("a", "b", "a"),
        ("d", "d"),
    ]
    with pytest.raises(ValueError, match="a -> b -> a"):
        topological_order(nodes, {"a": ["b"], "b": ["a"]})
