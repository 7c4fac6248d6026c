"""How long policy rules take on big plans (docs/policy.md, "Bounds").

Evaluates the shipped example rules (examples/policy/rules.yaml) with cel-python on
synthetic plans of N resource changes (updates with a small before/after each), the way a
stack's plan is evaluated: `plan_input` then `evaluate`. No Terraform: the cost is CEL's.

    .venv/bin/python bench/policy_rules.py [--sizes 100,1000,5000]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from agent.config.policy import load_repo_rules
from agent.policy.rules import evaluate, plan_input

ROOT = Path(__file__).resolve().parent.parent


def synthetic_plan(count: int) -> dict:
    return {
        "resource_changes": [
            {
                "address": f"aws_instance.r{i}",
                "type": "aws_instance",
                "name": f"r{i}",
                "change": {
                    "actions": ["update"],
                    "before": {"tags": {"team": "a"}},
                    "after": {"tags": {"team": "b"}},
                },
            }
            for i in range(count)
        ]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000,5000")
    args = parser.parse_args()
    rules = load_repo_rules(ROOT / "examples", "policy/rules.yaml", ())
    for size in (int(s) for s in args.sizes.split(",")):
        data = plan_input(synthetic_plan(size), "bench")
        started = time.perf_counter()
        results = evaluate(rules, data, timeout=600)
        seconds = time.perf_counter() - started
        effects = ", ".join(f"{r.rule.name}={r.effect or 'pass'}" for r in results)
        print(f"{size:>6} changes, {len(rules)} rules: {seconds:6.2f} s  ({effects})")


if __name__ == "__main__":
    main()
