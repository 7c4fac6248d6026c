"""Policy rules: CEL expressions over a plan, each with an effect (docs/policy.md).

A rule *matches* when its expression is true; its effect then applies: `deny` (the
unit fails, nothing applied), `hold` (the plan waits for `agent approve`) or `warn`
(recorded and shown). Rules read a small, redacted view of the plan (`plan_input`):
values Terraform marks sensitive are masked, and the caller passes the plan JSON only
after the redactor has scrubbed every secret value it knows.

Evaluation is bounded: the input has at most MAX_CHANGES resource changes and
MAX_INPUT_BYTES of JSON, an expression at most MAX_EXPRESSION_CHARS, and all the rules
of one plan run in a worker thread given `timeout` seconds. A rule that cannot be
evaluated (an error, a non-boolean result, the time or size limit) fails closed: it
counts as a match with the effect `deny`, and says why.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import celpy
from celpy import celtypes

from providers.terraform.sensitive import mask_value

MAX_RULES = 200
MAX_EXPRESSION_CHARS = 4000
MAX_CHANGES = 5000
MAX_INPUT_BYTES = 8 * 1024 * 1024
DEFAULT_TIMEOUT = 30.0  # cel-python needs ~1 ms per change per rule: 5000 changes x 4 rules ~ 10 s
SENSITIVE = "(sensitive)"
# The CEL variables a rule can read (`plan_input` builds them).
VARIABLES = ("resource_changes", "changes", "unit")

# cel-python logs every evaluation step at DEBUG, plan values included: keep it quiet.
logging.getLogger("celpy").setLevel(logging.WARNING)
logging.getLogger("Evaluator").setLevel(logging.WARNING)

_ENV = celpy.Environment()
_COMPILE_LOCK = threading.Lock()  # lark's parser is not documented as thread-safe


class Effect(StrEnum):
    DENY = "deny"
    HOLD = "hold"
    WARN = "warn"


@dataclass(frozen=True, slots=True)
class Rule:
    """One validated rule; `source` is where it was written (`agent.yaml:14`)."""

    name: str
    expression: str
    message: str
    effect: Effect
    source: str
    program: Any = field(compare=False, repr=False, default=None)


class RuleSyntaxError(ValueError):
    """A CEL expression that does not compile; `line`/`column` are within the expression."""

    def __init__(self, text: str, line: int | None, column: int | None) -> None:
        super().__init__(text)
        self.line, self.column = line, column


def compile_rule(name: str, expression: str, message: str, effect: Effect, source: str) -> Rule:
    """A rule with its expression compiled; raises RuleSyntaxError."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise RuleSyntaxError(
            f"an expression of at most {MAX_EXPRESSION_CHARS} characters", None, None
        )
    try:
        with _COMPILE_LOCK:
            program = _ENV.program(_ENV.compile(expression))
    except celpy.CELParseError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "syntax error"
        line, column = getattr(exc, "line", None), getattr(exc, "column", None)
        raise RuleSyntaxError(first, line, column) from None
    except Exception as exc:
        raise RuleSyntaxError(type(exc).__name__, None, None) from None
    return Rule(name, expression, message, effect, source, program)


@dataclass(frozen=True, slots=True)
class RuleResult:
    rule: Rule
    matched: bool
    error: str | None = None  # why it could not be evaluated (then it fails closed)

    @property
    def effect(self) -> Effect | None:
        """What the result does to the plan: None when the rule passed."""
        if self.error is not None:
            return Effect.DENY
        return self.rule.effect if self.matched else None

    def reason(self) -> str:
        """One line for the unit's outcome."""
        rule = self.rule
        if self.error is not None:
            return (
                f"policy rule {rule.name} ({rule.source}) could not be evaluated, so it denies"
                f" (fails closed): {self.error}"
            )
        return f"policy rule {rule.name} ({rule.source}): {rule.message}"


def plan_input(plan_json: Mapping[str, Any], unit: str) -> dict[str, Any]:
    """What rules see of a plan: its resource changes, flattened, sensitive values masked.

    `resource_changes` lists every change Terraform reports (no-op and read included);
    `changes` only those that create, update, delete or replace something.
    """
    changes: list[dict[str, Any]] = []
    for item in plan_json.get("resource_changes") or ():
        if not isinstance(item, Mapping):
            continue
        change = item.get("change") if isinstance(item.get("change"), Mapping) else {}
        changes.append(
            {
                "address": str(item.get("address", "")),
                "module_address": str(item.get("module_address", "")),
                "mode": str(item.get("mode", "")),
                "type": str(item.get("type", "")),
                "name": str(item.get("name", "")),
                "provider_name": str(item.get("provider_name", "")),
                "actions": [str(a) for a in change.get("actions") or ()],
                "before": _mask(change.get("before"), change.get("before_sensitive")),
                "after": _mask(change.get("after"), change.get("after_sensitive")),
            }
        )
    acting = [c for c in changes if set(c["actions"]) - {"no-op", "read"}]
    return {"resource_changes": changes, "changes": acting, "unit": unit}


def _mask(value: Any, sensitive: Any) -> Any:
    """`value` with every part Terraform marks sensitive replaced by SENSITIVE."""
    return mask_value(value, sensitive, SENSITIVE)


def evaluate(
    rules: Sequence[Rule], data: Mapping[str, Any], *, timeout: float = DEFAULT_TIMEOUT
) -> tuple[RuleResult, ...]:
    """Evaluate every rule on `data` (from `plan_input`), within the size and time limits."""
    if not rules:
        return ()
    too_big = _too_big(data)
    if too_big:
        return tuple(RuleResult(rule, True, too_big) for rule in rules)
    results: list[RuleResult | None] = [None] * len(rules)

    def work() -> None:
        activation = {name: celpy.json_to_cel(data[name]) for name in VARIABLES}
        for index, rule in enumerate(rules):
            results[index] = _evaluate_one(rule, activation)

    # A daemon thread: CEL has no loops, so a slow rule ends by itself; the plan's
    # decision does not wait for it past `timeout`.
    worker = threading.Thread(target=work, name="policy-rules", daemon=True)
    worker.start()
    worker.join(timeout)
    late = f"not evaluated within {timeout:g} s (the time limit for a plan's rules)"
    return tuple(
        result if result is not None else RuleResult(rule, True, late)
        for rule, result in zip(rules, list(results), strict=True)
    )


def _too_big(data: Mapping[str, Any]) -> str | None:
    count = len(data.get("resource_changes") or ())
    if count > MAX_CHANGES:
        return f"the plan has {count} resource changes (the limit for rules is {MAX_CHANGES})"
    size = len(json.dumps(data, default=str))
    if size > MAX_INPUT_BYTES:
        return f"the plan is {size} bytes as JSON (the limit for rules is {MAX_INPUT_BYTES})"
    return None


def _evaluate_one(rule: Rule, activation: Mapping[str, Any]) -> RuleResult:
    try:
        value = rule.program.evaluate(dict(activation))
    except Exception as exc:
        return RuleResult(rule, True, _error_text(exc))
    if isinstance(value, celtypes.BoolType):
        return RuleResult(rule, bool(value))
    if isinstance(value, Exception):
        return RuleResult(rule, True, _error_text(value))
    return RuleResult(rule, True, f"expected true or false; got a {type(value).__name__}")


def _error_text(exc: BaseException) -> str:
    # CELEvalError's args are (message, the Python exception's type, that exception's args).
    args = getattr(exc, "args", ())
    text = str(args[0]) if args else type(exc).__name__
    if len(args) > 2 and isinstance(args[2], tuple) and args[2]:
        detail = str(args[2][0])
        text = f"{text}: {detail}" if detail and detail not in text else text
    lines = text.splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def render(results: Sequence[RuleResult]) -> str:
    """The section `agent logs` shows after the plan (policy.txt)."""
    if not results:
        return ""
    lines = [f"policy rules: {len(results)} evaluated on the redacted plan"]
    for result in results:
        effect = result.effect
        word = "error" if result.error else (str(effect) if effect else "pass")
        where = f"{result.rule.name} ({result.rule.source})"
        detail = ""
        if result.error:
            detail = f": fails closed (deny): {result.error}"
        elif effect is not None:
            detail = f": {result.rule.message}"
        lines.append(f"  {word:<5} {where}{detail}")
    return "\n".join(lines) + "\n"
