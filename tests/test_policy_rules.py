"""Policy rules: compiled from the host config and the repository (errors name file:line:
key), evaluated with cel-python on real plans of the embedded Terraform, failing closed
when they cannot be evaluated. The shipped examples (examples/policy/rules.yaml) are the
rules under test. No mocks."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest

from agent.config import parse_host_config
from agent.config.policy import load_repo_rules
from agent.config.yamlnodes import ConfigValidationError
from agent.errors import ConfigError
from agent.policy.rules import (
    MAX_CHANGES,
    SENSITIVE,
    Effect,
    compile_rule,
    evaluate,
    plan_input,
    render,
)
from tests.support.infra import embedded_terraform

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _plan_json(tmp_path: Path, before: str | None, after: str) -> dict:
    """The `show -json` of a real plan: apply `before` (if any), then plan `after`."""
    stack = tmp_path / "stack"
    stack.mkdir(parents=True, exist_ok=True)
    env = {"TF_IN_AUTOMATION": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    tf = embedded_terraform()

    def run(*args: str) -> str:
        done = subprocess.run(
            [tf, *args], cwd=stack, env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode in (0, 2), done.stderr
        return done.stdout

    if before is not None:
        (stack / "main.tf").write_text(before)
        run("init", "-input=false")
        run("apply", "-auto-approve", "-input=false")
    (stack / "main.tf").write_text(after)
    if before is None:
        run("init", "-input=false")
    run("plan", "-out=tfplan", "-input=false")
    return json.loads(run("show", "-json", "tfplan"))


def _data(names: list[str], value: str = "v") -> str:
    # A new `triggers_replace` replaces the resource (delete and create).
    return "".join(
        f'resource "terraform_data" "{n}" {{\n  triggers_replace = "{value}"\n}}\n' for n in names
    )


@pytest.fixture(scope="module")
def examples() -> dict[str, object]:
    rules = load_repo_rules(EXAMPLES, "policy/rules.yaml", ())
    return {rule.name: rule for rule in rules}


def _effects(results: tuple) -> dict[str, str | None]:
    return {r.rule.name: (str(r.effect) if r.effect else None) for r in results}


def test_the_shipped_examples_on_real_plans(tmp_path: Path, examples: dict) -> None:
    rules = list(examples.values())
    # Destroying protected_db (and replacing keep): the deny rule and the warning match.
    plan = _plan_json(
        tmp_path, _data(["protected_db", "web", "keep"]), _data(["web"]) + _data(["keep"], "w2")
    )
    results = evaluate(rules, plan_input(plan, "files"))
    effects = _effects(results)
    assert effects["keep-protected"] == "deny"
    assert effects["at-most-10-changes"] is None
    assert effects["no-iam-users"] is None
    # terraform_data with a new input is replaced: delete and create.
    assert effects["note-replacements"] == "warn"
    text = render(results)
    assert "deny  keep-protected (policy/rules.yaml:" in text
    assert "pass  no-iam-users" in text


def test_at_most_n_changes_holds_a_big_plan(tmp_path: Path, examples: dict) -> None:
    plan = _plan_json(tmp_path, None, _data([f"r{i}" for i in range(11)]))
    results = evaluate([examples["at-most-10-changes"]], plan_input(plan, "big"))
    assert _effects(results) == {"at-most-10-changes": "hold"}
    small = _plan_json(tmp_path / "small", None, _data([f"r{i}" for i in range(10)]))
    assert _effects(evaluate([examples["at-most-10-changes"]], plan_input(small, "s"))) == {
        "at-most-10-changes": None
    }


def test_a_type_never_created(tmp_path: Path, examples: dict) -> None:
    plan = _plan_json(tmp_path, None, _data(["user"]))
    rule = examples["no-iam-users"]
    assert _effects(evaluate([rule], plan_input(plan, "u"))) == {"no-iam-users": None}
    # The same real plan, its resource given the type the rule forbids.
    for change in plan["resource_changes"]:
        change["type"] = "aws_iam_user"
    assert _effects(evaluate([rule], plan_input(plan, "u"))) == {"no-iam-users": "deny"}


def test_sensitive_values_are_masked_before_rules_see_them() -> None:
    plan = {
        "resource_changes": [
            {
                "address": "x.y",
                "type": "x",
                "change": {
                    "actions": ["create"],
                    "before": None,
                    "after": {"password": "s3cret", "tags": ["a", "s3cret"], "name": "n"},
                    "after_sensitive": {"password": True, "tags": [False, True]},
                },
            }
        ]
    }
    data = plan_input(plan, "u")
    after = data["changes"][0]["after"]
    assert after == {"password": SENSITIVE, "tags": ["a", SENSITIVE], "name": "n"}
    assert "s3cret" not in json.dumps(data)


@pytest.mark.parametrize(
    ("expression", "error"),
    [
        ("changes[99].address == 'x'", "list index out of range"),
        ("size(changes)", "expected true or false; got a IntType"),
        ("no_such_variable == 1", "no_such_variable"),
    ],
)
def test_a_rule_that_cannot_be_evaluated_denies(expression: str, error: str) -> None:
    rule = compile_rule("broken", expression, "m", Effect.WARN, "agent.yaml:9")
    (result,) = evaluate([rule], plan_input({"resource_changes": []}, "u"))
    assert result.effect is Effect.DENY
    assert error in (result.error or "")
    assert result.reason().startswith(
        "policy rule broken (agent.yaml:9) could not be evaluated, so it denies (fails closed): "
    )


def test_evaluation_is_bounded_in_time_and_size() -> None:
    many = {
        "resource_changes": [
            {"address": f"t.r{i}", "type": "t", "change": {"actions": ["create"]}}
            for i in range(150)
        ]
    }
    slow = compile_rule(
        "slow", "changes.all(a, changes.all(b, changes.all(c, true)))", "m", Effect.WARN, "h:1"
    )
    fast = compile_rule("fast", "size(changes) > 0", "m", Effect.WARN, "h:2")
    results = evaluate([fast, slow], plan_input(many, "u"), timeout=0.3)
    assert results[0].effect is Effect.WARN and results[0].error is None
    assert results[1].effect is Effect.DENY
    assert "not evaluated within 0.3 s" in (results[1].error or "")

    huge = {"resource_changes": [{"address": "t.r", "type": "t"} for _ in range(MAX_CHANGES + 1)]}
    (result,) = evaluate([fast], plan_input(huge, "u"))
    assert result.effect is Effect.DENY
    assert f"the plan has {MAX_CHANGES + 1} resource changes" in (result.error or "")


def _host_rules(tmp_path: Path, rules: str) -> str:
    return f"repo: {{url: {tmp_path}}}\npolicy:\n  rules:\n" + textwrap.indent(
        textwrap.dedent(rules), "    "
    )


@pytest.mark.parametrize(
    ("rules", "error"),
    [
        (
            "- {name: a, expression: 'changes.exists(c, ', message: m, effect: deny}\n",
            "agent.yaml:4: policy.rules[0].expression: expected a CEL expression; got a syntax"
            " error at line 1, column",
        ),
        (
            "- {name: a, expression: 'true', message: m, effect: block}\n",
            "agent.yaml:4: policy.rules[0].effect: expected one of deny, hold, warn; got 'block'",
        ),
        (
            "- {name: a, expression: 'true', effect: deny}\n",
            "agent.yaml:4: policy.rules[0].message: expected a message shown when the rule"
            " matches (required); got nothing",
        ),
        (
            "- {name: a, expression: 'true', message: m, effect: deny}\n"
            "- {name: a, expression: 'false', message: m, effect: warn}\n",
            "agent.yaml:5: policy.rules[1].name: expected each rule name once; got 'a' again"
            " (first on line 4)",
        ),
        (
            "- {name: A b, expression: 'true', message: m, effect: deny}\n",
            "agent.yaml:4: policy.rules[0].name: expected a rule name of a-z, 0-9, _ and -"
            " (up to 63); got 'A b'",
        ),
    ],
)
def test_bad_host_rules_name_file_line_and_key(tmp_path: Path, rules: str, error: str) -> None:
    with pytest.raises(ConfigValidationError) as caught:
        parse_host_config(_host_rules(tmp_path, rules), "agent.yaml", tmp_path)
    assert any(line.startswith(error) for line in caught.value.errors), caught.value.errors


def test_repo_rules_cannot_replace_a_host_rule(tmp_path: Path) -> None:
    host = parse_host_config(
        _host_rules(
            tmp_path, "- {name: keep-protected, expression: 'false', message: m, effect: warn}\n"
        ),
        "agent.yaml",
        tmp_path,
    )
    with pytest.raises(ConfigValidationError) as caught:
        load_repo_rules(EXAMPLES, "policy/rules.yaml", host.policy.rules)
    assert caught.value.errors[0].startswith(
        "policy/rules.yaml:7: rules[0].name: expected a name no host config rule has"
    )


def test_repo_rules_stay_in_the_repository(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (tmp_path / "outside.yaml").write_text("rules: []\n")
    (repo / "rules.yaml").symlink_to(tmp_path / "outside.yaml")
    with pytest.raises(ConfigError) as caught:
        load_repo_rules(repo, "rules.yaml", ())
    assert caught.value.message.startswith("rules.yaml:1: (file):")
    assert load_repo_rules(repo, "missing.yaml", ()) == ()


def test_the_fail_closed_line_docs_policy_md_quotes() -> None:
    from tests.support.docblocks import block

    documented = block("output", "policy-fail-closed").text.strip()
    rule = compile_rule("broken", "changes[99].address == 'x'", "m", Effect.DENY, "agent.yaml:9")
    from agent.policy.gate import Gate

    gate = Gate(rules=evaluate([rule], plan_input({"resource_changes": []}, "u")))
    assert gate.denial() == documented


def test_the_ceiling_error_docs_policy_md_quotes(tmp_path: Path) -> None:
    from agent.config import ManifestLimits, parse_manifest
    from tests.support.docblocks import block

    documented = block("output", "policy-apply-ceiling").text.strip()
    (tmp_path / "stacks" / "web").mkdir(parents=True)
    (tmp_path / "stacks" / "web" / "main.tf").write_text("")
    text = "version: 1\nunits:\n  - {name: web, stack: stacks/web, apply: auto}\n"
    with pytest.raises(ConfigValidationError) as caught:
        parse_manifest(text, "gitops.yaml", tmp_path, ManifestLimits())
    assert caught.value.errors == [documented]


def test_agent_validate_compiles_the_repository_rules(tmp_path: Path) -> None:
    from agent.engine.validate import validate_repo

    repo = tmp_path / "repo"
    (repo / "stacks" / "web").mkdir(parents=True)
    (repo / "stacks" / "web" / "main.tf").write_text("")
    (repo / "gitops.yaml").write_text("version: 1\nunits:\n  - {name: web, stack: stacks/web}\n")
    (repo / "rules.yaml").write_text(
        "rules:\n  - {name: bad, expression: 'size(changes) >', message: m, effect: hold}\n"
    )
    config = tmp_path / "agent.yaml"
    config.write_text(f"repo: {{url: {repo}}}\npolicy: {{repo_rules: rules.yaml}}\n")

    report = validate_repo(repo, config_path=str(config))

    assert not report.ok
    assert report.errors[0].startswith(
        "rules.yaml:2: rules[0].expression: expected a CEL expression; got a syntax error"
    )
