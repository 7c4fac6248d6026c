"""A copy of a unit's state from the host's `terraform.state_backend`, for a proposal plan.

The backend's credentials (the agent's AWS credentials, a PostgreSQL connection string)
could write every unit's state, so a proposal's Terraform never gets them. Instead the
trusted agent, outside the sandbox, pulls the unit's state first, and the proposal plans in
the sandbox against that copy with a local backend (the proposal's shadow gets the usual
`backend "local" { path = COPY }` override) and `-lock=false`:

    proposals/pull/UNIT/src/stack/main.tf   a stack of the agent's own: a comment, no code
                       workdir/stack/       its shadow, with the host's backend block
                       tfdata/            init of that backend (no provider is installed)
      -> terraform state pull (the agent's environment)  -> units/UNIT/terraform.tfstate

None of the proposal's files is read by this Terraform: the stack it runs is the agent's
own, empty but for the backend, so nothing a proposal wrote runs with the credentials.
`state pull` takes no lock (it reads the object as stored), so a main pass is never delayed;
nothing is ever pushed back.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from agent.core.fsutil import atomic_write, ensure_private_dir
from providers.terraform import TerraformRunner, UnitWorkspace
from providers.terraform.backend import StateBackend

_STACK = (
    "# gitops-agent: reads this unit's state from terraform.state_backend for a proposal plan\n"
)


class RemoteStatePuller:
    """Pulls units' states from `backend` with the trusted (unsandboxed) `runner`."""

    def __init__(
        self, runner: Callable[[], TerraformRunner], backend: StateBackend, root: Path
    ) -> None:
        """`root`: the proposals' work area (`proposals/`); pulls work under `root/pull`."""
        self._runner = runner
        self.backend = backend
        self.root = root

    def pull(self, unit: str, target: Path, deadline: float | None) -> None:
        """Write `unit`'s current state to `target` (0600); remove `target` when the backend
        has none yet (the plan then creates everything, as for a new unit). Raises
        TerraformCommandError naming the backend when it cannot be read."""
        work = ensure_private_dir(self.root / "pull" / unit)
        source = ensure_private_dir(work / "src")
        stack = ensure_private_dir(source / "stack")
        main = stack / "main.tf"
        if not main.exists():
            atomic_write(main, _STACK)
        ws = UnitWorkspace(
            stack_dir=stack,
            data_dir=work / "tfdata",
            state_file=work / "no-local-state.tfstate",  # never written: the backend is remote
            root=source,
            work_dir=work / "workdir",
            backend=self.backend,
            unit=unit,
        )
        state = self._runner().state_pull(ws, deadline)
        if not state.strip():
            target.unlink(missing_ok=True)
            return
        ensure_private_dir(target.parent)
        atomic_write(target, state)
