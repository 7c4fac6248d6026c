"""Issue 22 end to end: `agent run` (a real subprocess, the embedded Terraform, a real repo)
with a `forge:` section reports each main pass's outcome as a commit status to the forge
stand-in, over a real socket. The token is in no log line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.forge_standin import ForgeStandin
from tests.test_daemon import AgentProcess, data_stack, wait_for

TOKEN = "ghp_forgeDaemonCanary4242"
MANIFEST = "version: 1\nunits:\n  - {name: app, stack: stacks/app}\n"


@pytest.fixture
def forge() -> Iterator[ForgeStandin]:
    with ForgeStandin("github", token=TOKEN) as standin:
        yield standin


@pytest.fixture
def agent_factory(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    made: list[AgentProcess] = []

    def make(**kwargs: Any) -> AgentProcess:
        made.append(AgentProcess(tmp_path, **kwargs))
        return made[-1]

    yield make
    for agent in made:
        agent.kill()


def test_each_pass_sets_the_commit_status_of_its_revision(
    forge: ForgeStandin, agent_factory: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    token_file = tmp_path / "forge-token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    extra = (
        f"forge: {{kind: github, url: '{forge.api_url}', repo: acme/infra,"
        f" token_file: {token_file}, context: gitops-agent/test}}\n"
    )
    agent = agent_factory(extra=extra)
    agent.repo.write("stacks/app/main.tf", data_stack("one"))
    agent.repo.write("gitops.yaml", MANIFEST)
    first = agent.repo.push("seed")
    agent.start()

    posted = wait_for(lambda: forge.statuses(first), what="the first pass's status")
    assert posted[-1] == {
        "state": "success",
        "description": "applied +1 ~0 -0 (app)",
        "context": "gitops-agent/test",
    }

    # A change that cannot plan: the unit fails, and its commit says so.
    agent.repo.write("stacks/app/main.tf", 'resource "terraform_data" "v" {\n  input = \n}\n')
    second = agent.repo.push("break it")
    status, _ = agent.webhook()
    assert status == 202
    failed = wait_for(lambda: forge.statuses(second), what="the failed pass's status")
    assert failed[-1]["state"] == "failure"
    assert failed[-1]["description"] == "failed: app"

    # An invalid manifest: the head is refused (the revision in force stays) and says why.
    agent.repo.write("gitops.yaml", "version: 1\nunits: nope\n")
    third = agent.repo.push("invalid manifest")
    status, _ = agent.webhook()
    assert status == 202
    refused = wait_for(lambda: forge.statuses(third), what="the refused head's status")
    assert refused[-1]["state"] == "failure"
    assert refused[-1]["description"].startswith("not applied: gitops.yaml:2: units")

    assert agent.stop() == 0
    assert TOKEN not in agent.log_path.read_text()
    assert all(r.authorized for r in forge.requests)
