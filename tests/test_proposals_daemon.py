"""Proposals in the running agent (`agent run` as a subprocess): its poll finds a pushed
pull request ref and plans it on the proposals' own thread; the main pass is unaffected."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable
from pathlib import Path

from agent.state.proposals import ProposalRecords, ProposalRow
from agent.state.store import RunStore
from tests.support.forge_standin import ForgeStandin
from tests.support.infra import git
from tests.test_daemon import SECRET, WAIT, AgentProcess, agent_factory, data_stack, wait_for

__all__ = ["agent_factory"]  # the fixture, used by name

PROPOSALS = 'proposals: {refs: ["refs/pull/*/head"], authors: ["*@example.invalid"]}\n'


def proposal(agent: AgentProcess, ref: str) -> ProposalRow | None:
    store = RunStore(agent.state)
    try:
        row = ProposalRecords(store).get(ref)
    finally:
        store.close()
    return row if row is not None and row.status != "planning" else None


def test_the_poll_plans_a_new_pull_request_head(
    agent_factory: Callable[..., AgentProcess],
) -> None:
    agent = agent_factory(poll="1s", extra=PROPOSALS)
    agent.repo.write("stacks/app/main.tf", data_stack("one"))
    agent.repo.write("gitops.yaml", "version: 1\nunits:\n  - {name: app, stack: stacks/app}\n")
    agent.repo.push("seed")
    agent.start()

    git(agent.repo.work, "checkout", "-q", "-b", "pr")
    agent.repo.write("stacks/app/main.tf", data_stack("two"))
    git(agent.repo.work, "commit", "-qam", "two")
    git(agent.repo.work, "push", "-q", "origin", "HEAD:refs/pull/1/head")
    head = agent.repo.head()

    row = wait_for(lambda: proposal(agent, "refs/pull/1/head"), timeout=4 * WAIT, what="a plan")
    assert (row.head, row.status, row.summary) == (head, "planned", "+0 ~1 -0")
    listed = agent.cli("proposals")
    assert f"refs/pull/1/head  {head[:12]}  planned  +0 ~1 -0" in listed.stdout
    # The proposal changed nothing: no pass ran for it, main stays at its revision.
    assert all(r.trigger in ("start", "poll") for r in agent.runs())
    assert agent.stop() == 0


TOKEN = "ghp_proposalCanary7788"


def pull_request_hook(agent: AgentProcess, number: int, head: str, action: str) -> int:
    payload = {
        "action": action,
        "number": number,
        "pull_request": {
            "number": number,
            "state": "open",
            "merged": False,
            "user": {"login": "alice"},
            "head": {"ref": "change", "sha": head, "repo": {"full_name": "acme/infra"}},
            "base": {"ref": "main", "sha": "1" * 40, "repo": {"full_name": "acme/infra"}},
        },
        "sender": {"login": "alice"},
    }
    body = json.dumps(payload).encode()
    signature = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    status, _ = agent.request(
        "POST",
        "/hooks/github",
        body,
        {
            "Content-Type": "application/json",
            "X-GitHub-Event": "pull_request",
            "X-GitHub-Delivery": f"pr-{number}-{head[:8]}",
            "X-Hub-Signature-256": f"sha256={signature}",
        },
    )
    return status


def test_a_push_then_a_webhook_gives_a_status_and_one_comment_updated_in_place(
    agent_factory: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    with ForgeStandin("github", token=TOKEN) as forge:
        token_file = tmp_path / "forge-token"
        token_file.write_text(TOKEN + "\n")
        token_file.chmod(0o600)
        extra = PROPOSALS + (
            f"forge: {{kind: github, url: '{forge.api_url}', repo: acme/infra,"
            f" token_file: {token_file}, context: gitops-agent/test}}\n"
        )
        agent = agent_factory(extra=extra)  # polls every hour: only the webhook triggers
        agent.repo.write("stacks/app/main.tf", data_stack("one"))
        agent.repo.write("gitops.yaml", "version: 1\nunits:\n  - {name: app, stack: stacks/app}\n")
        agent.repo.push("seed")
        agent.start()

        heads = []
        for value in ("two", "three"):
            git(agent.repo.work, "checkout", "-q", "-B", "pr", "main")
            agent.repo.write("stacks/app/main.tf", data_stack(value))
            git(agent.repo.work, "commit", "-qam", value)
            git(agent.repo.work, "push", "-q", "--force", "origin", "HEAD:refs/pull/5/head")
            heads.append(agent.repo.head())
            started = time.monotonic()
            assert pull_request_hook(agent, 5, heads[-1], "synchronize") == 202
            final = wait_for(
                lambda h=heads[-1]: [s for s in forge.statuses(h) if s["state"] != "pending"],
                timeout=4 * WAIT,
                what="the plan's status",
            )
            seconds = time.monotonic() - started
            assert final[-1] == {
                "state": "success",
                "description": "plan +0 ~1 -0",
                "context": "gitops-agent/test/proposal",
            }
            assert forge.statuses(heads[-1])[0]["state"] == "pending"
            # The status goes first, then the comment: wait for the one about this head.
            (comment,) = wait_for(
                lambda h=heads[-1]: [
                    c for c in forge.comments(5) if f"plan of `{h[:12]}`" in c.body
                ],
                what="the comment about this head",
            )
            assert f'"{value}"' in comment.body and "| app | changes +0 ~1 -0 |" in comment.body
        print(f"webhook -> status of the second head: {seconds:.2f} s")
        assert len(forge.comments(5)) == 1  # updated in place, never a second one
        assert agent.stop() == 0
        assert TOKEN not in agent.log_path.read_text()
