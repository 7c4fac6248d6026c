"""The policy keys of the host config (`policy.apply`, `policy.rules`, `policy.repo_rules`,
`windows`) and the repository's own rules file; the logic lives in agent/policy."""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from agent.config.yamlnodes import Problems, Value, compose, decode, quote
from agent.errors import ConfigError
from agent.policy.rules import MAX_RULES, Effect, Rule, RuleSyntaxError, compile_rule
from agent.policy.windows import (
    WEEKDAYS,
    FreezeDrift,
    Span,
    Windows,
    parse_days,
    parse_hours,
    valid_cron,
    valid_timezone,
)
from providers.errors import RepoFileError
from providers.repofiles import read_repo_file

RULE_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
RULE_KEYS = ("name", "expression", "message", "effect")
MAX_RULES_FILE_BYTES = 256 * 1024
_REPO_HINT = "see docs/policy.md for the rules file"


def read_rules(
    value: Value | None, source_name: str, taken: frozenset[str] = frozenset()
) -> tuple[Rule, ...]:
    """A list of rules; `source_name` names the file in each rule's `source`; a name in
    `taken` (the host's rules, for the repository's) is an error."""
    if value is None:
        return ()
    items = value.sequence()
    if items is None:
        return ()
    if len(items) > MAX_RULES:
        value.fail(f"at most {MAX_RULES} rules", f"{len(items)}")
        return ()
    rules: list[Rule] = []
    seen: dict[str, int] = {}
    for item in items:
        fields = item.mapping(RULE_KEYS)
        if fields is None:
            continue
        found = {key: fields.require(key, what) for key, what in _RULE_FIELDS.items()}
        name = found["name"].string("a rule name") if found["name"] else None
        if name is not None and found["name"] is not None:
            if not RULE_NAME_RE.fullmatch(name):
                found["name"].fail("a rule name of a-z, 0-9, _ and - (up to 63)")
                name = None
            elif name in taken:
                found["name"].fail("a name no host config rule has (host rules cannot be replaced)")
                name = None
            elif name in seen:
                found["name"].fail(
                    "each rule name once", f"{quote(name)} again (first on line {seen[name]})"
                )
                name = None
            else:
                seen[name] = found["name"].line
        expression = found["expression"].string("a CEL expression") if found["expression"] else None
        message = found["message"].string("a message") if found["message"] else None
        effect = found["effect"].choice(Effect) if found["effect"] else None
        if name is None or expression is None or message is None or effect is None:
            continue
        try:
            rules.append(
                compile_rule(name, expression, message, effect, f"{source_name}:{item.line}")
            )
        except RuleSyntaxError as exc:
            where = (
                f" at line {exc.line}, column {exc.column} of the expression" if exc.line else ""
            )
            assert found["expression"] is not None
            found["expression"].fail("a CEL expression", f"a syntax error{where}: {exc}")
    return tuple(rules)


_RULE_FIELDS = {
    "name": "a rule name",
    "expression": "a CEL expression (true: the rule matches)",
    "message": "a message shown when the rule matches",
    "effect": "deny, hold or warn",
}


def read_repo_rules_path(value: Value | None) -> str | None:
    """`policy.repo_rules`: a file of the repository holding more rules."""
    if value is None:
        return None
    text = value.string("a repository-relative file")
    if text is None:
        return None
    normal = posixpath.normpath(text)
    if text.startswith("/") or normal in (".", "..") or normal.startswith("../") or "\x00" in text:
        return value.fail("a relative file inside the repository (no leading / or ..)")
    return normal


def load_repo_rules(repo_dir: Path, path: str, host_rules: tuple[Rule, ...]) -> tuple[Rule, ...]:
    """The repository's rules file at `path` (confined to the checkout). A missing file means
    no repository rules; an invalid one is a ConfigValidationError naming file:line:key."""
    try:
        data = read_repo_file(repo_dir, path, limit=MAX_RULES_FILE_BYTES)
    except RepoFileError as exc:
        if exc.kind == "missing":
            return ()
        raise ConfigError(f"{path}:1: (file): {exc.reason}", hint=_REPO_HINT) from None
    problems = Problems(path)
    root = Value.root(compose(decode(data, path), path), problems)
    rules: tuple[Rule, ...] = ()
    if root is not None and (fields := root.mapping(["rules"])) is not None:
        taken = frozenset(rule.name for rule in host_rules)
        rules = read_rules(fields.require("rules", "a list of rules"), path, taken)
    problems.raise_if_any(_REPO_HINT)
    return rules


def read_windows(value: Value | None) -> Windows | None:
    """`windows:` of the host config, or None (applies are allowed at any time)."""
    fields = value.mapping(["timezone", "allow", "deny", "drift"]) if value else None
    if value is None or fields is None:
        return None
    timezone = "UTC"
    if found := fields.get("timezone"):
        text = found.string("a time zone name like Europe/Paris")
        if text is not None and not valid_timezone(text):
            found.fail("a time zone name like Europe/Paris (IANA)")
        elif text is not None:
            timezone = text
    drift = FreezeDrift.HOLD
    if found := fields.get("drift"):
        drift = found.choice(FreezeDrift) or drift
    allow = _spans(fields.get("allow"))
    deny = _spans(fields.get("deny"))
    if fields.get("allow") is None and fields.get("deny") is None:
        value.fail("windows with allow, deny or both", "neither")
    return Windows(timezone=timezone, allow=allow, deny=deny, drift=drift)


def _spans(value: Value | None) -> tuple[Span, ...]:
    if value is None:
        return ()
    spans: list[Span] = []
    for item in value.sequence(non_empty=True) or ():
        fields = item.mapping(["days", "hours", "cron"])
        if fields is None:
            continue
        cron = fields.get("cron")
        if cron is not None:
            if fields.get("days") is not None or fields.get("hours") is not None:
                item.fail("either cron, or days and hours", "both")
                continue
            text = cron.string("a five-field cron expression")
            if text is not None and not valid_cron(text):
                cron.fail("a five-field cron expression like '* 9-16 * * 1-5'")
            elif text is not None:
                spans.append(Span(cron=text))
            continue
        span = _day_span(item, fields.get("days"), fields.get("hours"))
        if span is not None:
            spans.append(span)
    return tuple(spans)


def _day_span(item: Value, days_value: Value | None, hours_value: Value | None) -> Span | None:
    if days_value is None and hours_value is None:
        return item.fail("a window with days, hours or cron")
    days = frozenset(range(7))
    if days_value is not None:
        found: set[int] = set()
        expected = f"a weekday ({', '.join(WEEKDAYS)}) or a range like mon-fri"
        for day in days_value.sequence(non_empty=True) or ():
            name = day.string(expected)
            parsed = parse_days([name]) if name is not None else None
            if parsed is None:
                return day.fail(expected) if name is not None else None
            found |= parsed
        if not found:
            return None
        days = frozenset(found)
    start, end = 0, 24 * 60
    if hours_value is not None:
        text = hours_value.string("a time range like 09:00-17:00")
        hours = parse_hours(text) if text is not None else None
        if hours is None:
            return hours_value.fail("a time range like 09:00-17:00 (24-hour HH:MM-HH:MM)")
        start, end = hours
    return Span(days=days, start=start, end=end)
