"""What the docs quote is what the product prints: error messages, log lines, /healthz.

Each test reads the block marked `<!-- output: ID -->` in the page (tests/support/
docblocks.py) and makes the product print it: the same input the page implies, the real
parser, notifier, formatter or daemon. A page that drifts from the product fails here,
naming the page and line. No mocks: real HTTP on 127.0.0.1, a real `agent run`.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import ConfigValidationError, ManifestLimits, parse_host_config, parse_manifest
from agent.core.redact import Redactor
from agent.service.logfmt import JournalFormatter
from agent.service.metrics import AgentMetrics
from agent.service.notify import Event, NotificationSink, Notifier
from providers.hosts import Resource, converge
from providers.transport import LocalTransport
from tests.support.docblocks import ROOT, Block, block
from tests.test_config_resources import manifest
from tests.test_daemon import AgentProcess, file_stack, wait_for
from tests.test_notify import Receiver


def lines(documented: Block) -> list[str]:
    return [line for line in documented.text.splitlines() if line.strip()]


def pattern(quoted: str, wildcards: dict[str, str]) -> str:
    """A regular expression for a quoted line: each key of `wildcards` (a volatile part of
    the example: a revision, a run id) becomes its regular expression, the rest literal."""
    parts = re.split("(" + "|".join(re.escape(k) for k in wildcards) + ")", quoted)
    return "".join(wildcards[p] if p in wildcards else re.escape(p) for p in parts)


RUN_ID = r"r-\d{8}T\d{6}-[0-9a-f]{4}"


def errors_of(parse: object, *args: object) -> list[str]:
    with pytest.raises(ConfigValidationError) as caught:
        parse(*args)  # type: ignore[operator]
    return caught.value.errors


def test_host_config_errors(tmp_path: Path) -> None:
    documented = block("output", "host-config-errors")
    text = (
        "policy:\n  destroy: never\nstate_dir: /var/lib/gitops-agent\n# the repository\n"
        "repo:\n  url: git@git.example.com:platform/infra.git\n  brnch: main\n"
    )
    found = errors_of(parse_host_config, text, "/etc/gitops-agent/agent.yaml", tmp_path)
    assert found == lines(documented), documented.where


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    for stack in ("network", "web", "base"):
        (tmp_path / "stacks" / stack).mkdir(parents=True)
        (tmp_path / "stacks" / stack / "main.tf").write_text("# a stack\n")
    return tmp_path


def test_manifest_errors(repo: Path) -> None:
    documented = block("output", "manifest-errors")
    text = (
        "version: 1\nunits:\n  - name: web\n    stack: stacks/web\n    depends_on: [db]\n"
        "    drift: sometimes\n  - name: Base\n    stack: ../base\n    timeout: forever\n"
    )
    limits = ManifestLimits(allowed_paths=("stacks",))
    assert errors_of(parse_manifest, text, "gitops.yaml", repo, limits) == lines(documented), (
        documented.where
    )


def test_manifest_cycle(repo: Path) -> None:
    documented = block("output", "manifest-cycle")
    text = "version: 1\nunits:\n" + "".join(
        f"  - name: {name}\n    stack: stacks/{name}\n    depends_on: [{after}]\n"
        for name, after in (("network", "web"), ("web", "base"), ("base", "network"))
    )
    found = errors_of(parse_manifest, text, "gitops.yaml", repo, ManifestLimits())
    assert found == lines(documented), documented.where


def test_a_misspelt_resource_kind(repo: Path) -> None:
    documented = block("output", "resource-kind-misspelt")
    found = errors_of(
        parse_manifest, manifest("- dirctory: /x\n"), "gitops.yaml", repo, ManifestLimits()
    )
    assert found == lines(documented), documented.where


def test_a_notification_given_up_is_logged_as_the_page_shows(
    caplog: pytest.LogCaptureFixture,
) -> None:
    documented = block("output", "notify-given-up")
    quoted = next(line for line in lines(documented) if "HTTP 404" in line).strip()
    receiver = Receiver(default=(404, {}, b"channel_not_found"))
    try:
        sink = NotificationSink(kind="slack", url=receiver.url(), events=frozenset({"drift"}))
        notifier = Notifier([sink], Redactor(), backoff_s=0.01)
        notifier.start()
        notifier.send(Event("drift", "web", "r-20260312T104502-77c1", "0" * 40, "drift found"))
        wait_for(lambda: notifier.stats()[0].failed == 1, what="the notification given up")
        notifier.stop(5)
    finally:
        receiver.close()
    [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
    printed = JournalFormatter(journal=True).format(record)  # what journalctl shows
    printed = re.sub(r"^<\d>", "", printed)
    expected = pattern(quoted, {"hooks.slack.com": r"127\.0\.0\.1:\d+", "in 0.2s": r"in \d+\.\ds"})
    assert re.fullmatch(expected, printed), f"{documented.where}: the agent logs\n{printed}"


def test_healthz_and_an_unknown_unit_under_intervals(tmp_path: Path) -> None:
    """/healthz as docs/webhooks.md shows it; the warning of docs/host-config.md at start."""
    health_doc = block("output", "healthz")
    warning_doc = block("output", "unknown-unit-warning")
    agent = AgentProcess(tmp_path, units="nosuchunit: {drift: 1h}")
    motd = tmp_path / "managed" / "motd.txt"
    agent.repo.write("stacks/app/main.tf", file_stack(motd, "hello"))
    agent.repo.write("gitops.yaml", "version: 1\nunits:\n  - {name: app, stack: stacks/app}\n")
    head = agent.repo.push("seed")
    try:
        agent.start()  # returns after the first pass succeeded
        status, health = agent.request("GET", "/healthz")
        log = agent.log_path.read_text()  # one start: the whole log
    finally:
        agent.kill()
    assert status == 200
    wildcards = {"6113728f27ae": head[:12], "r-20261123T091502-3f9a": RUN_ID, "2 units": "1 unit"}
    expected = [pattern(line, wildcards) for line in lines(health_doc)]
    got = health.splitlines()
    assert len(got) == len(expected) and all(map(re.fullmatch, expected, got)), (
        f"{health_doc.where}: /healthz answered\n{health}"
    )
    start_doc = block("output", "daemon-start")
    hexes = r"[0-9a-f]{12}"
    wildcards = {
        "/run/gitops-agent/control.sock": r"\S+",
        "0.0.0.0:9100": r"127\.0\.0\.1:\d+",
        "git@git.example.com:platform/infra.git": r"\S+",
        "gitops-agent 0.1.0": r"gitops-agent \S+",
        "every 60s": r"every \d+s",
        "every 600s": r"every \d+s",
        "r-20261123T091502-3f9a": RUN_ID,
        "(1.2s)": r"\(\d+\.\ds\)",
        "in 1.4s": r"in \d+\.\ds",
        "6113728f27ae": hexes,
        "network: no changes, app: applied": "app: applied",
    }
    for quoted in lines(start_doc)[1:]:  # after the `$ agent run` line
        assert re.search(r"(^|\s)" + pattern(quoted, wildcards) + "$", log, re.M), (
            f"{start_doc.where}: {quoted!r} is not in the agent's log:\n{log}"
        )
    [quoted] = lines(warning_doc)
    warning = pattern(quoted, {"network": "nosuchunit", "r-20261123T091502-3f9a": RUN_ID})
    assert re.search(warning, log), f"{warning_doc.where}: not in the agent's log:\n{log}"


def test_a_password_in_the_repo_url_is_refused_as_git_source_md_says(tmp_path: Path) -> None:
    page = (ROOT / "docs" / "git-source.md").read_text()
    quoted = re.search(r"\(`(expected a URL without a password[^`]*)`\)", page, re.S)
    assert quoted, "docs/git-source.md no longer quotes the refusal"
    text = "repo: {url: 'https://x-access-token:TOKEN@git.example.org/infra.git'}\n"
    [error] = errors_of(parse_host_config, text, "agent.yaml", tmp_path)
    assert error == "agent.yaml:1: repo.url: " + " ".join(quoted.group(1).split())


def test_the_readme_exit_codes(tmp_path: Path) -> None:
    """README.md's table of exit codes is the one `agent --help` ends with; the codes of a
    usage error, a bad host config, no such run."""
    from agent.cli.main import EXIT_CODES

    documented = block("output", "exit-codes")
    assert documented.text.strip("\n") == EXIT_CODES, documented.where
    codes = dict(re.findall(r"^  (\d+) +(.+)$", documented.text, re.M))
    assert codes["2"].startswith("usage error"), documented.where
    assert codes["3"].startswith("the host config is invalid"), documented.where
    assert codes["5"].startswith("the unit or run named does not exist"), documented.where

    good = tmp_path / "agent.yaml"
    good.write_text(f"repo: {{url: file:///nonexistent.git}}\nstate_dir: {tmp_path / 'state'}\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("repo: {url: 1}\n")

    def agent(*args: str) -> int:
        command = [sys.executable, "-m", "agent.cli", *args]
        return subprocess.run(command, capture_output=True, timeout=60, check=False).returncode

    assert agent("--config", str(good), "status", "--no-such-option") == 2
    assert agent("--config", str(bad), "status") == 3
    assert agent("--config", str(good), "approve", "r-20261123T091502-3f9a") == 5


def test_the_host_errors_resources_md_quotes(tmp_path: Path) -> None:
    """A file where a directory is, a non-empty directory to remove, a failing command:
    converged on this machine through the real LocalTransport, with tmp paths."""
    page = (ROOT / "docs" / "resources.md").read_text()
    quoted = {
        m.group(1): " ".join(m.group(0).strip("`").split())
        for m in re.finditer(r"`((?:file|directory|command):[^`:]+): [^`]+`", page)
    }
    motd, old = tmp_path / "motd", tmp_path / "old"
    motd.mkdir()
    (old / "data").mkdir(parents=True)
    resources = [
        Resource("file", str(motd), {"content": b"hi\n"}),
        Resource("directory", str(old), {"state": "absent"}),
        Resource(
            "command",
            "build app",
            {"command": "echo \"make: *** No rule to make target 'install'.  Stop.\"; exit 2"},
        ),
    ]
    report = converge(
        LocalTransport("docs"), resources, {}, apply=True, become=False, python=sys.executable
    )
    got = {o.resource_id: " ".join((o.error or "").split()) for o in report.outcomes}
    paths = {str(motd): "/etc/motd", str(old): "/srv/old"}
    assert len(got) == 3
    for resource_id, error in got.items():
        for real, documented in paths.items():
            resource_id, error = (
                resource_id.replace(real, documented),
                error.replace(real, documented),
            )
        assert quoted.get(resource_id) == error, (
            f"docs/resources.md quotes {quoted.get(resource_id)!r}"
        )


def test_every_metric_docs_metrics_md_names_exists_from_the_start() -> None:
    """The metrics the page's table and queries use exist before the first pass, with
    the series the alerts need at 0 (`increase()` sees the first failure)."""
    page = (ROOT / "docs" / "metrics.md").read_text()
    metrics = AgentMetrics()
    metrics.declare_units({"app": "stack"})  # what loading a manifest does
    text = metrics.render()[0].decode()
    names = set(re.findall(r"\bgitops_agent_[a-z_]+", page))
    # Scale-out mode's metrics exist from the start of an agent in a cluster (they need its
    # membership in a PostgreSQL store): tests/test_cluster.py checks them.
    names = {n for n in names if not n.startswith("gitops_agent_cluster_")}
    assert len(names) >= 10
    assert [n for n in sorted(names) if not re.search(rf"^(# TYPE )?{n}\b", text, re.M)] == []
    for series in (
        'gitops_agent_passes_total{outcome="failed",trigger="poll"} 0.0',
        'gitops_agent_unit_results_total{kind="stack",outcome="failed",unit="app"} 0.0',
        'gitops_agent_drift_found_total{unit="app"} 0.0',
        'gitops_agent_apply_failures_total{unit="app"} 0.0',
    ):
        assert series in text
