"""The host engine's pure diff, as a table: desired resource + facts in, changes out.

Each case is `tests/cases/hosts/<kind>/NAME.json`:

    {"doc": "what the case shows",
     "resource": {"name": ..., "attrs": {...}, "sensitive": false, "notify": []},
     "facts": {... exactly what the host program reports ...},
     "changes": ["the lines a person reads", ...],     # or
     "error": "the conflict message",
     "operation": {... the steps sent to the host ...},  # optional, exact
     "diff": "...", "diff_contains": [...], "diff_excludes": [...],  # optional
     "idempotent": true}

File `content` is text (UTF-8) or `content_b64`. `idempotent: true` checks that a host
already in the desired state (the case's facts, settled by `settled()` below) gives no
change; `false` marks resources that always change (a command without a guard).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from providers.errors import ResourceConflictError
from providers.hosts import diff as kinds
from providers.hosts import plan, remote, services
from providers.hosts.accounts import keys_content
from providers.hosts.common import norm_mode
from providers.hosts.model import Handler, Resource
from providers.hosts.textdiff import cap, content_diff

CASES_DIR = Path(__file__).parent / "cases" / "hosts"
MIN_CASES_PER_KIND = 5


def _cases() -> list[Path]:
    # records/ holds the per-host record's cases (tests/test_hosts_ledger.py)
    return sorted(p for p in CASES_DIR.glob("*/*.json") if p.parent.name in kinds.KINDS)


def _resource(kind: str, raw: dict[str, Any]) -> Resource:
    attrs = dict(raw.get("attrs", {}))
    if "content_b64" in attrs:
        attrs["content"] = base64.b64decode(attrs.pop("content_b64"))
    elif isinstance(attrs.get("content"), str):
        attrs["content"] = attrs["content"].encode("utf-8")
    return Resource(
        kind=kind,
        name=raw["name"],
        attrs=attrs,
        notify=tuple(raw.get("notify", ())),
        sensitive=bool(raw.get("sensitive", False)),
    )


def _id_fact(desired: Any, name: str, number: int) -> tuple[str, int]:
    """(name, id) on a settled host for an owner/group given by name or number."""
    if desired is None:
        return name, number
    text = str(desired)
    return (name, int(text)) if text.isdigit() else (text, number)


def settled(resource: Resource, facts: dict[str, Any]) -> dict[str, Any]:
    """The facts a host reports once `resource` is in its desired state."""
    attrs, state = resource.attrs, resource.attrs.get("state") or "present"
    kind = "file" if resource.kind == "template" else resource.kind
    out = copy.deepcopy(facts)
    if kind in ("file", "directory", "link", "user", "group") and state == "absent":
        return {"exists": False}
    if kind in ("file", "directory"):
        owner, uid = _id_fact(attrs.get("owner"), facts.get("owner", "root"), facts.get("uid", 0))
        group, gid = _id_fact(attrs.get("group"), facts.get("group", "root"), facts.get("gid", 0))
        mode = norm_mode(attrs.get("mode")) or facts.get("mode") or "0644"
        out.update(exists=True, mode=mode, owner=owner, uid=uid, group=group, gid=gid)
        if kind == "file":
            content = attrs.get("content")
            out.update(type="file", size=len(content), sha256=hashlib.sha256(content).hexdigest())
            out.pop("content_b64", None)
        else:
            out.update(type="dir", link=False, empty=True)
        return out
    if kind == "link":
        return {"exists": True, "type": "link", "target": attrs["target"]}
    if kind == "package":
        installed = state != "absent"
        version = attrs.get("version") or facts.get("version") or "1.0-1"
        return {**out, "installed": installed, "version": version if installed else None}
    if kind == "service":
        out["need_reload"] = False
        if attrs.get("enabled") is not None:
            out["unit_file"] = "enabled" if attrs["enabled"] else "disabled"
        if attrs.get("state") is not None:
            out["active"] = "active" if attrs["state"] == "running" else "inactive"
        return out
    if kind == "group":
        return {"exists": True, "gid": attrs.get("gid") or facts.get("gid") or 1000}
    if kind == "user":
        out.update(exists=True)
        for attr in ("uid", "shell", "home"):
            if attrs.get(attr) is not None:
                out[attr] = attrs[attr]
        out.setdefault("uid", 1000)
        if attrs.get("group") is not None:
            out["group"] = attrs["group"]
        if attrs.get("groups") is not None:  # the host lists supplementary groups only
            out["groups"] = sorted(set(attrs["groups"]) - {out.get("group")})
        if attrs.get("authorized_keys") is not None:
            content = keys_content(attrs["authorized_keys"])
            out["authorized_keys"] = {
                "exists": True,
                "type": "file",
                "mode": "0600",
                "uid": out["uid"],
                "owner": resource.name,
                "sha256": hashlib.sha256(content).hexdigest(),
            }
        return out
    if kind == "command":
        guarded = any(attrs.get(guard) for guard in ("creates", "unless", "onlyif"))
        return {"run": False, "reason": "guard satisfied"} if guarded else out
    raise AssertionError(f"no settled facts for {kind}")


def test_every_kind_has_enough_cases() -> None:
    counts = {kind: len(list((CASES_DIR / kind).glob("*.json"))) for kind in kinds.KINDS}
    assert all(count >= MIN_CASES_PER_KIND for count in counts.values()), counts


@pytest.mark.parametrize("path", _cases(), ids=lambda path: f"{path.parent.name}/{path.stem}")
def test_case(path: Path) -> None:
    case = json.loads(path.read_text())
    resource = _resource(path.parent.name, case["resource"])
    facts = case["facts"]
    if "error" in case:
        with pytest.raises(ResourceConflictError) as caught:
            kinds.diff(resource, facts)
        assert str(caught.value) == case["error"]
        return
    changes = kinds.diff(resource, facts)
    assert [change.text for change in changes] == case["changes"]
    shown = "".join(change.diff for change in changes)
    if "diff" in case:
        assert shown == case["diff"]
    for fragment in case.get("diff_contains", []):
        assert fragment in shown
    for fragment in case.get("diff_excludes", []):
        assert fragment not in shown
        assert all(fragment not in change.text for change in changes)
    if "operation" in case:
        assert kinds.operation(resource, facts, changes) == case["operation"]
    if case["idempotent"]:
        assert kinds.diff(resource, settled(resource, facts)) == []
    else:
        assert kinds.diff(resource, settled(resource, facts)) != []


def test_sensitive_cases_never_show_the_content() -> None:
    for path in _cases():
        case = json.loads(path.read_text())
        resource = _resource(path.parent.name, case["resource"])
        if not resource.sensitive or "error" in case:
            continue
        secret = resource.attrs.get("content") or b""
        changes = kinds.diff(resource, case["facts"])
        for change in changes:
            for line in secret.decode().splitlines():
                assert line not in change.text and line not in change.diff, path.name


def test_neighbouring_package_installs_become_one_call() -> None:
    facts = {"manager": "apt", "installed": False, "version": None}
    apt = [Resource("package", name, {}) for name in ("nginx", "curl")]
    a_file = Resource("file", "/etc/x", {"content": b"x\n"})
    gone = Resource("package", "telnet", {"state": "absent"})
    gone_facts = {"manager": "apt", "installed": True, "version": "0.17-44"}
    operations = [
        (0, kinds.operation(apt[0], facts, kinds.diff(apt[0], facts))),
        (1, kinds.operation(apt[1], facts, kinds.diff(apt[1], facts))),
        (2, kinds.operation(gone, gone_facts, kinds.diff(gone, gone_facts))),
        (3, kinds.operation(a_file, {"exists": False}, kinds.diff(a_file, {"exists": False}))),
        (4, kinds.operation(apt[0], facts, kinds.diff(apt[0], facts))),
    ]
    ops = plan.build_ops(operations)
    # installs 0+1 together; the removal is another command; the file keeps its place
    assert [op["ids"] for op in ops] == [[0, 1], [2], [3], [4]]
    assert ops[0]["items"] == [[0, "nginx"], [1, "curl"]]
    assert ops[0]["argv"][:2] == ["apt-get", "install"]
    assert ops[1]["argv"][:2] == ["apt-get", "remove"]
    assert ops[2]["steps"][0]["do"] == "write"


def test_handlers_follow_definition_order_and_their_notifiers() -> None:
    resources = [
        Resource("file", "/etc/a", {"content": b""}, notify=("reload web", "restart db")),
        Resource("file", "/etc/b", {"content": b""}, notify=("restart db", "nope")),
        Resource("file", "/etc/c", {"content": b""}, notify=("restart cache",)),
    ]
    handlers = {
        "restart db": Handler("restart db", "postgresql", "restart"),
        "reload web": Handler("reload web", "nginx", "reload"),
        "restart cache": Handler("restart cache", "redis", "restart"),
        "bad": Handler("bad", "x", "explode"),
    }
    ops, errors = plan.build_handlers(resources, [0, 1], handlers)
    assert [(op["name"], op["argv"], op["notified_by"]) for op in ops] == [
        ("restart db", ["systemctl", "restart", "postgresql.service"], [0, 1]),
        ("reload web", ["systemctl", "reload", "nginx.service"], [0]),
    ]
    assert errors == ["file:/etc/b: notifies 'nope', which is not a defined handler"]
    ops, errors = plan.build_handlers([Resource("file", "/x", {}, notify=("bad",))], [0], handlers)
    assert ops == [] and errors == ["handler 'bad': action 'explode' is not restart or reload"]


def test_a_long_diff_is_cut_with_a_note() -> None:
    new = "".join(f"line {n}\n" for n in range(5000)).encode()
    shown = content_diff("/etc/big", b"", new, old_sha="x", existed=True, sensitive=False)
    assert len(shown) <= 20_100
    assert shown.endswith("more lines\n") and "diff cut:" in shown
    assert cap("short\n") == "short\n"


def test_a_file_without_trailing_newline_says_so() -> None:
    shown = content_diff("/etc/x", b"a\n", b"a\nb", old_sha="x", existed=True, sensitive=False)
    assert shown.endswith("+b\n\\ No newline at end of file\n")


def test_a_service_is_asked_again_only_after_a_package_change() -> None:
    stopped = Resource("service", "testsvc", {"enabled": False, "state": "stopped"})
    package = Resource("package", "testsvc", {})
    a_file = Resource("file", "/etc/x", {"content": b"x\n"})
    assert kinds.recheck(stopped, {}, [a_file]) is None
    assert kinds.recheck(stopped, {}, []) is None
    assert kinds.recheck(stopped, {}, [a_file, package]) == {
        "steps": [
            {
                "do": "service",
                "unit": "testsvc.service",
                "enabled": False,
                "state": "stopped",
                "systemd": True,
            }
        ]
    }
    command = Resource("command", "migrate", {"command": "true", "onlyif": "test -f /etc/x"})
    assert kinds.recheck(command, {}, []) is None
    assert kinds.recheck(command, {}, [a_file])["steps"][0]["do"] == "command"  # type: ignore[index]
    assert kinds.recheck(a_file, {}, [package]) is None


def test_the_host_program_reads_service_states_as_the_diff_does() -> None:
    # remote.py cannot import services.py (it runs alone on the host): same sets, by hand.
    assert set(remote.SERVICE_ENABLED) == services.ENABLED
    assert set(remote.SERVICE_DISABLEABLE) == services.DISABLEABLE
    assert set(remote.SERVICE_RUNNING) == services.RUNNING
