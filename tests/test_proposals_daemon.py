"""Proposals in the running agent (`agent run` as a subprocess): its poll finds a pushed
pull request ref and plans it on the proposals' own thread; the main pass is unaffected."""

from __future__ import annotations

from collections.abc import Callable

from agent.state.proposals import ProposalRecords, ProposalRow
from agent.state.store import RunStore
from tests.support.infra import git
from tests.test_daemon import WAIT, AgentProcess, agent_factory, data_stack, wait_for

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
