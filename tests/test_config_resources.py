"""How a fleet's resource items are read: the first key is the kind, and errors that say
which key is wrong, missing or extra. A table of cases, through the real manifest parser.

No mocks: each case is a whole gitops.yaml parsed against a real repository directory.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from agent.config import ConfigValidationError, Manifest, ManifestLimits, parse_manifest

KINDS = "file, template, directory, link, package, service, user, group, command"


def manifest(items: str) -> str:
    """A gitops.yaml whose one role holds `items` (YAML list items, unindented)."""
    return (
        "version: 1\n"
        "units:\n"
        "  - name: web\n"
        "    fleet:\n"
        "      hosts: {static: [{name: web1, address: 10.0.0.5}]}\n"
        "      roles: [base]\n"
        "handlers:\n"
        "  restart app: {service: app, action: restart}\n"
        "roles:\n"
        "  base:\n" + textwrap.indent(textwrap.dedent(items), "    ")
    )  # the items start on line 11


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "app.env").write_text("A=1\n")
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "app.j2").write_text("{{ host.name }}\n")
    return tmp_path


def parse(text: str, repo: Path) -> Manifest:
    return parse_manifest(text, "gitops.yaml", repo, ManifestLimits())


# Each: items, then the (kind, name, attributes) read.
ACCEPTED = [
    (
        "- file: /etc/app/app.env\n  source: files/app.env\n  owner: root\n  group: app\n",
        ("file", "/etc/app/app.env", {"source": "files/app.env", "owner": "root", "group": "app"}),
    ),
    (
        "- template: /etc/app.conf\n  source: templates/app.j2\n  group: app\n",
        ("template", "/etc/app.conf", {"source": "templates/app.j2", "group": "app"}),
    ),
    (
        "- directory: /srv/app\n  mode: '0750'\n  owner: app\n  group: app\n",
        ("directory", "/srv/app", {"mode": "0750", "owner": "app", "group": "app"}),
    ),
    (
        "- user: deploy\n  group: deploy\n  groups: [sudo]\n",
        ("user", "deploy", {"group": "deploy", "groups": ("sudo",)}),
    ),
    ("- group: app\n  gid: 2000\n", ("group", "app", {"gid": 2000})),
    # A key named like a kind, but not first, is an attribute of the first.
    (
        "- file: /etc/motd\n  group: adm\n  content: hi\n",
        ("file", "/etc/motd", {"group": "adm", "content": "hi"}),
    ),
]


@pytest.mark.parametrize(("items", "expected"), ACCEPTED, ids=lambda v: str(v)[:30])
def test_the_first_key_is_the_kind(items: str, expected: tuple, repo: Path) -> None:
    found = parse(manifest(items), repo).roles["base"]
    kind, name, attrs = expected
    assert len(found) == 1
    assert (found[0].kind, found[0].name) == (kind, name)
    attributes = {key: value for key, value in found[0].attrs.items() if key != "state"}
    assert attributes == attrs


# Each: items, then the exact error lines.
REFUSED = [
    (
        "- dirctory: /x\n",
        f"gitops.yaml:11: roles.base[0]: expected a resource kind as the first key ({KINDS});"
        " got 'dirctory' (did you mean 'directory'?)",
    ),
    (
        "- pakage: nginx\n",
        f"gitops.yaml:11: roles.base[0]: expected a resource kind as the first key ({KINDS});"
        " got 'pakage' (did you mean 'package'?)",
    ),
    (
        "- nothing_like_it: x\n",
        f"gitops.yaml:11: roles.base[0]: expected a resource kind as the first key ({KINDS});"
        " got 'nothing_like_it'",
    ),
    (
        "- mode: '0644'\n  file: /etc/motd\n  content: hi\n",
        f"gitops.yaml:11: roles.base[0]: expected a resource kind as the first key ({KINDS});"
        " got 'mode'; move 'file' to the top of the item",
    ),
    (
        "- {}\n",
        f"gitops.yaml:11: roles.base[0]: expected a resource kind as the first key ({KINDS});"
        " got an empty mapping",
    ),
    (
        "- file: /etc/motd\n  content: hi\n  package: nginx\n",
        "gitops.yaml:13: roles.base[0].package: unknown key for a file (package is a kind:"
        " start a new list item); expected one of file, content, source, sensitive, mode,"
        " owner, group, on_drop, notify, state",
    ),
    # "got a mapping" said nothing: each names the key missing or extra.
    (
        "- file: /etc/motd\n  content: hi\n  source: files/app.env\n",
        "gitops.yaml:11: roles.base[0]: expected a file with exactly one of content or source;"
        " got both content and source",
    ),
    (
        "- file: /etc/motd\n  mode: '0644'\n",
        "gitops.yaml:11: roles.base[0]: expected a file with exactly one of content or source;"
        " got neither",
    ),
    (
        "- template: /etc/app.conf\n",
        "gitops.yaml:11: roles.base[0]: expected a template with a source (a Jinja2 file in"
        " the repository); got no source key",
    ),
    (
        "- command: build\n  creates: /x\n",
        "gitops.yaml:11: roles.base[0]: expected a command with run: (the shell command, run"
        " with /bin/sh -c); got no run key",
    ),
    (
        "- link: /srv/current\n",
        "gitops.yaml:11: roles.base[0]: expected a link with a target; got no target key",
    ),
]


@pytest.mark.parametrize(("items", "expected"), REFUSED, ids=lambda v: str(v)[:30])
def test_a_wrong_resource_says_which_key(items: str, expected: str, repo: Path) -> None:
    with pytest.raises(ConfigValidationError) as caught:
        parse(manifest(items), repo)
    assert caught.value.errors == [expected]


def test_hosts_with_both_static_and_from_stack_says_both(repo: Path) -> None:
    text = manifest("- group: app\n").replace(
        "hosts: {static: [{name: web1, address: 10.0.0.5}]}",
        "hosts: {static: [{name: web1, address: 10.0.0.5}], from_stack: {unit: a, output: b}}",
    )
    with pytest.raises(ConfigValidationError) as caught:
        parse(text, repo)
    assert (
        "gitops.yaml:5: units[0].fleet.hosts: expected exactly one of static, from_stack or ec2;"
        " got static and from_stack" in caught.value.errors
    )
