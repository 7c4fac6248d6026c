"""Change windows as a table (tests/cases/windows.json), read through the host config
reader; and the config errors a bad `windows:` gives (file:line:key)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from agent.config import parse_host_config
from agent.config.yamlnodes import ConfigValidationError
from agent.policy.windows import override_record

CASES = json.loads((Path(__file__).parent / "cases" / "windows.json").read_text())


def _host(tmp_path: Path, windows: object) -> str:
    return json.dumps({"repo": {"url": str(tmp_path)}, "windows": windows})


@pytest.mark.parametrize("case", CASES, ids=[c["case"] for c in CASES])
def test_window_table(case: dict, tmp_path: Path) -> None:
    host = parse_host_config(_host(tmp_path, case["windows"]), "agent.yaml", tmp_path)
    assert host.windows is not None
    now = dt.datetime.fromisoformat(case["now"])
    assert host.windows.closed_reason(now) == case["reason"]
    assert host.windows.is_open(now) is (case["reason"] is None)


@pytest.mark.parametrize(
    ("windows", "error"),
    [
        (
            "{timezone: Mars/Olympus, allow: [{hours: '09:00-17:00'}]}",
            "windows.timezone: expected a time zone name like Europe/Paris (IANA);"
            " got 'Mars/Olympus'",
        ),
        (
            "{allow: [{hours: '9-17'}]}",
            "windows.allow[0].hours: expected a time range like 09:00-17:00"
            " (24-hour HH:MM-HH:MM); got '9-17'",
        ),
        (
            "{allow: [{days: [mon, funday]}]}",
            "windows.allow[0].days[1]: expected a weekday (mon, tue, wed, thu, fri, sat, sun)"
            " or a range like mon-fri; got 'funday'",
        ),
        (
            "{deny: [{cron: '* * *'}]}",
            "windows.deny[0].cron: expected a five-field cron expression like"
            " '* 9-16 * * 1-5'; got '* * *'",
        ),
        (
            "{allow: [{cron: '* 9 * * *', days: [mon]}]}",
            "windows.allow[0]: expected either cron, or days and hours; got both",
        ),
        (
            "{drift: always, allow: [{days: [mon]}]}",
            "windows.drift: expected one of hold, revert; got 'always'",
        ),
        ("{timezone: UTC}", "windows: expected windows with allow, deny or both; got neither"),
    ],
)
def test_bad_windows_name_file_line_and_key(tmp_path: Path, windows: str, error: str) -> None:
    text = f"repo: {{url: {tmp_path}}}\n\nwindows: {windows}\n"
    with pytest.raises(ConfigValidationError) as caught:
        parse_host_config(text, "agent.yaml", tmp_path)
    assert f"agent.yaml:3: {error}" in caught.value.errors


def test_an_override_needs_a_reason_and_names_who_asked() -> None:
    assert override_record("alice", None) is None
    assert override_record("alice", " hotfix INC-42 ") == "by alice: hotfix INC-42"
    for bad in ("", "  ", "two\nlines", 42):
        with pytest.raises(ValueError, match="--reason"):
            override_record("alice", bad)


@pytest.mark.parametrize(
    "expression",
    [
        "* 9-16 * * 1-5",
        "*/15 * * * sun,sat",
        "0 0 1,15 * 5",
        "30 2 * 2 *",
        "* * L * *",
        "0 0 * * 5#2",
    ],
)
def test_the_fast_cron_match_agrees_with_croniter(expression: str) -> None:
    from croniter import croniter

    from agent.policy.windows import Span

    span = Span(cron=expression)
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    for minutes in range(0, 400 * 24 * 60, 23 * 60 + 7):  # a year and more, odd steps
        moment = start + dt.timedelta(minutes=minutes)
        assert span.contains(moment) is bool(croniter.match(expression, moment)), moment
