"""Which units a changed-only pass plans, and which passes are changed-only, as tables
(tests/cases/changed_only.json): every doubt plans."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.units.changed import changed_only_pass, plan_reason
from agent.units.fingerprint import UNKNOWN, Fingerprint

CASES = json.loads((Path(__file__).parent / "cases" / "changed_only.json").read_text())


@pytest.mark.parametrize("case", CASES["plan_reason"], ids=lambda c: c["case"])
def test_plan_reason_table(case: dict) -> None:
    reason = plan_reason(
        changed=case["changed"],
        last_status=case["last_status"],
        planned_at=case["planned_at"],
        drift_interval=case["drift_interval"],
        now=case["now"],
    )
    assert reason == case["plans"]


@pytest.mark.parametrize("case", CASES["changed_only_pass"], ids=lambda c: c["case"])
def test_changed_only_pass_table(case: dict) -> None:
    got = changed_only_pass(
        case["triggers"], drift_timer=case["drift"], unit_drift_timers=case["unit_drifts"]
    )
    assert got is case["changed_only"]


def test_a_state_only_the_backend_can_read_always_counts_as_changed() -> None:
    recorded = Fingerprint({"stack": "s", "state": UNKNOWN})
    assert recorded.changed_from(recorded) == ("state",)
    assert recorded.moved_from(recorded) == ()


def test_the_state_and_parts_an_older_agent_did_not_take_plan_but_are_not_moves() -> None:
    old = Fingerprint({"stack": "s", "terraform": "t1"})
    new = Fingerprint({"stack": "s", "terraform": "t1", "backend": "b", "state": "x"})
    assert new.changed_from(old) == ("backend", "state")
    assert new.moved_from(old) == ()  # a plan they cause finds drift, not a change from Git
    assert new.moved_from(None) == ("backend", "stack", "terraform")
    assert Fingerprint({**new.parts, "stack": "s2"}).moved_from(new) == ("stack",)


def test_files_a_stack_reads_outside_its_directory_are_inputs(tmp_path: Path) -> None:
    from agent.units.fingerprint import stack_paths

    (tmp_path / "stacks/app").mkdir(parents=True)
    (tmp_path / "modules/net").mkdir(parents=True)
    (tmp_path / "stacks/app/main.tf").write_text(
        'module "net" { source = "../../modules/net" }\n'
        'locals {\n  a = file("${path.module}/../../shared/a.json")\n'
        '  b = templatefile("../../templates/${var.env}/b.tpl", {})\n'
        '  c = file("${path.module}/local.txt")\n'
        '  d = fileset("${path.module}/../${var.x}", "*")\n}\n'
    )
    (tmp_path / "modules/net/main.tf").write_text(
        'locals { n = file("${path.module}/../../shared/net.txt") }\n'
    )
    paths = stack_paths(tmp_path, "stacks/app")
    assert set(paths) == {
        "stacks/app",
        "modules/net",
        "shared/a.json",
        "templates",  # the static part of an interpolated path: the whole directory
        "stacks",  # a parent of the stack: hashed whole (doubt plans)
        "shared/net.txt",  # read by a module, relative to the module
    }
