"""A proposal's plan on its forge: a commit status on the head (pending while it plans, then
success or failure with "+2 ~1 -0") and one comment per pull/merge request, updated in place
on each new head, with each unit's plan (redacted, size-capped; the rest behind `agent logs`).

The client is `providers.forge`'s (`set_status`, `upsert_comment`); this module only says
what to send. Nothing here decides what is planned: a webhook only wakes the planner.
"""

from __future__ import annotations

import re
from pathlib import Path

from agent.core.redact import Redactor
from agent.state.proposals import ProposalRow, ProposalStatus, ProposalUnitStatus
from providers.forge import CommitState, ForgeClient

MARKER = "proposal-plan"
MAX_UNIT_CHARS = 6000  # of one unit's plan in the comment; `agent logs` has the whole
_CHANGE = re.compile(r"^refs/(?:pull|merge-requests)/(\d+)/head$")


def change_number(ref: str) -> int | None:
    """The pull/merge request a forge ref belongs to (`refs/pull/7/head`: 7), else None."""
    match = _CHANGE.match(ref)
    return int(match.group(1)) if match else None


def status_of(row: ProposalRow) -> tuple[CommitState, str]:
    """(state, description) of the commit status for a finished proposal plan."""
    status = ProposalStatus(row.status)
    if status is ProposalStatus.PLANNED:
        failed = [u.unit for u in row.units if u.status == ProposalUnitStatus.FAILED]
        if failed:
            return "failure", f"plan failed: {', '.join(failed)}; {row.summary}"
        if not row.units:
            return "success", "no unit affected"
        return "success", f"plan {row.summary}"
    if status is ProposalStatus.INCOMPLETE:
        return "pending", "a main pass holds a unit's state; planned again at the next poll"
    first = (row.detail or status.value).splitlines()[0]
    return "failure", f"not planned: {first}" if status is ProposalStatus.REFUSED else first


def comment_of(row: ProposalRow, proposals_dir: Path) -> str:
    """The comment's markdown: a table of units, then each unit's plan output."""
    lines = [
        f"#### gitops-agent: plan of `{row.head[:12]}`"
        + (f" against `{row.base[:12]}`, the revision in force" if row.base else ""),
        "",
        f"**{row.status}** {row.summary}" + (f": {row.detail}" if row.detail else ""),
        "",
    ]
    if row.units:
        lines += ["| unit | plan |", "|---|---|"]
        for unit in row.units:
            detail = f" {unit.counts}" if unit.counts else ""
            detail += f" ({unit.detail})" if unit.detail else ""
            lines.append(f"| {unit.unit} | {unit.status}{_cell(detail)} |")
        lines.append("")
    for unit in row.units:
        plan = proposals_dir / "runs" / unit.plan_id / unit.unit / "plan.txt"
        if not plan.is_file():
            continue
        text = plan.read_text(errors="replace")
        if len(text) > MAX_UNIT_CHARS:
            text = text[:MAX_UNIT_CHARS] + f"\n... ({len(text) - MAX_UNIT_CHARS} more characters)"
        fence = "`" * max(3, _longest_backticks(text) + 1)
        lines += [
            f"<details><summary>{unit.unit}: {unit.status} {unit.counts}</summary>",
            "",
            f"{fence}text",
            text.rstrip("\n"),
            fence,
            "</details>",
            "",
        ]
    lines.append(f"The whole output: `agent logs UNIT --proposal {row.ref}` on the bastion.")
    return "\n".join(lines)


class ProposalForgeReport:
    """Sends a proposal plan's status and comment to the forge (the planner's hooks)."""

    def __init__(
        self, forge: ForgeClient, context: str, proposals_dir: Path, redactor: Redactor
    ) -> None:
        self.forge = forge
        self.context = f"{context}/proposal"
        self.proposals_dir = proposals_dir
        self.redactor = redactor

    def started(self, ref: str, head: str) -> None:
        """The plan of `head` begins (its author and signature were allowed)."""
        self.forge.set_status(head, "pending", "planning", self.context)

    def finished(self, row: ProposalRow) -> None:
        state, description = status_of(row)
        self.forge.set_status(row.head, state, self.redactor.redact(description), self.context)
        change = change_number(row.ref)
        if change is None or row.status == ProposalStatus.REFUSED:
            return  # a branch has no conversation; a refused author gets no plan shown
        body = self.redactor.redact(comment_of(row, self.proposals_dir))
        self.forge.upsert_comment(change, MARKER, body)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _longest_backticks(text: str) -> int:
    runs = re.findall(r"`+", text)
    return max((len(r) for r in runs), default=0)
