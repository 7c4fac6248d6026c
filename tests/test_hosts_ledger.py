"""The per-host record of what the agent manages, as a table (providers/hosts/ledger.py).

Each case is `tests/cases/hosts/records/NAME.json`:

    {"doc": "what the case shows",
     "unit": "web",                                  # optional, the unit converging
     "record": {KEY: {kind, name, unit, created, on_drop, error}},  # what the host had
     "pending": ["handler", ...],                    # optional, the unit's due handlers
     "desired": [{"kind", "name", "attrs"}],         # the unit's resources now
     "elsewhere": [KEY, ...],                        # optional, owned by other units
     "removals": [[kind, name], ...],                # the implied removals, in order
     "released": [KEY, ...],                         # the keys let go
     "outcomes": {resource id: {status, existed, error}},  # optional: then "after" is
     "applied": true, "handlers_run": [], "handlers_failed": [],  # the record updated
     "due": [...],                                   # optional, the handlers still owed
     "after": {"objects": {...}, "handlers": {...}}}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from providers.hosts import ledger
from providers.hosts.model import Resource, ResourceOutcome

CASES = sorted((Path(__file__).parent / "cases" / "hosts" / "records").glob("*.json"))


def _resource(raw: dict[str, Any]) -> Resource:
    return Resource(kind=raw["kind"], name=raw["name"], attrs=dict(raw.get("attrs", {})))


@pytest.mark.parametrize("path", CASES, ids=lambda path: path.stem)
def test_case(path: Path) -> None:
    case = json.loads(path.read_text())
    unit = case.get("unit", "web")
    pending = case.get("pending")
    record = {"objects": case["record"], "handlers": {unit: pending} if pending else {}}
    desired = [_resource(raw) for raw in case["desired"]]

    removals, released = ledger.implied_removals(
        record, unit, desired, set(case.get("elsewhere", ()))
    )

    assert [[r.kind, r.name] for r in removals] == case["removals"], case["doc"]
    assert all(r.attrs == {"state": "absent"} for r in removals)
    assert sorted(released) == sorted(case["released"]), case["doc"]
    if "outcomes" not in case:
        return
    outcomes = {
        rid: ResourceOutcome(rid, o["status"], error=o.get("error"), existed=o.get("existed"))
        for rid, o in case["outcomes"].items()
    }
    after = ledger.updated(
        record,
        unit,
        desired,
        removals,
        released,
        outcomes,
        applied=case["applied"],
        handlers_run=case.get("handlers_run", ()),
        handlers_failed=case.get("handlers_failed", ()),
        due=case.get("due"),
    )
    assert after == case["after"], case["doc"]


def test_every_removable_kind_has_one_key_per_object() -> None:
    assert ledger.object_key("file", "/etc/x") == ledger.object_key("link", "/etc/x/")
    assert ledger.object_key("template", "/etc//x") == ledger.object_key("directory", "/etc/x")
    assert ledger.object_key("user", "app") != ledger.object_key("group", "app")
    assert ledger.object_key("service", "nginx") is None
    assert ledger.object_key("command", "seed") is None
