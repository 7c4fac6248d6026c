"""Planning one stack unit of a proposed change: never apply, never write state, never hold
the state lock for more than a copy.

    copy the unit's state (under a shared lock held for the copy only)
      -> init (own TF_DATA_DIR) -> plan -lock=false against the copy -> show -json
      -> plan.txt / plan.json (redacted) -> the saved plan and the copy are removed

Why a copy and not `-lock=false` on the real file: Terraform's local backend writes the
state file in place (truncate + write), so a plan that reads it while a main pass applies
could read half a file; the copy is taken under a shared `fcntl` lock, which Terraform's own
exclusive lock on that file excludes, so it is whole. A refresh during the plan only updates
Terraform's in-memory state; a plan with `-out` persists nothing, and what it could persist
would land in the copy. A unit whose state is in the host's `terraform.state_backend` is
copied by the trusted agent (`terraform state pull`, agent.units.remote_state_pull) and
planned against that copy the same way, with no backend credential in the sandbox. A stack
with a backend of its own (S3, pg) is planned with `-lock=false` against it, with no
credential from the agent: a plan never writes remote state either.

Terraform runs with an environment of its own (`proposal_environment`): PATH, locale,
proxies and a private HOME, never the agent's credentials (AWS_*, VAULT_*, ~/.aws).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config import Manifest, StackOutputRef, Unit
from agent.config.manifest import plain_value
from agent.core.fsutil import StreamedFile, atomic_write, ensure_private_dir
from agent.core.redact import LineRedactor, Redactor, Secret
from agent.errors import AgentError
from agent.state.proposals import ProposalUnitStatus
from agent.units.remote_state_pull import RemoteStatePuller
from agent.units.secrets import terraform_variables
from providers.errors import ProviderError
from providers.terraform import TerraformRunner, UnitWorkspace, summarize_plan
from providers.terraform.workdir import keeps_agent_state

STATE_COPY_WAIT = 30.0  # seconds to wait for a main pass's Terraform to let go of a state
_KEPT_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "SSL_CERT_FILE", "SSL_CERT_DIR")
_PROXY_ENV = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")


def proposal_environment(home: Path, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a proposal's Terraform runs in: no inherited credential of any kind
    (cloud SDKs read AWS_*, GOOGLE_*, ARM_*, VAULT_TOKEN, ~/.aws ...), a HOME of its own."""
    source = os.environ if environ is None else environ
    env = {key: source[key] for key in (*_KEPT_ENV, *_PROXY_ENV) if key in source}
    ensure_private_dir(home)
    env["HOME"] = str(home)
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    return env


@dataclass(frozen=True, slots=True)
class UnitPlan:
    """How one unit's proposal plan ended."""

    status: ProposalUnitStatus
    counts: tuple[int, int, int] | None = None
    detail: str | None = None


def copy_state(source: Path, target: Path, wait: float = STATE_COPY_WAIT) -> bool:
    """Copy a local state file whole: under a shared lock (Terraform's exclusive lock on it
    keeps the copy out while it writes), held for the read only. False when a main pass's
    Terraform held it for `wait` seconds; the copy is removed when there is no state."""
    if not source.exists():
        target.unlink(missing_ok=True)
        return True
    deadline = time.monotonic() + wait
    with source.open("rb") as handle:
        while True:
            try:
                fcntl.lockf(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.2)
        try:
            data = handle.read()
        finally:
            fcntl.lockf(handle, fcntl.LOCK_UN)
    json.loads(data or b"{}")  # whole, or ValueError
    ensure_private_dir(target.parent)
    atomic_write(target, data)
    return True


class ProposalUnitPlanner:
    """Plans stack units of proposals in `root` (the proposals' work area)."""

    def __init__(
        self,
        runner: Callable[[], TerraformRunner],
        root: Path,
        unit_state: Callable[[str], Path],
        redactor: Redactor,
        *,
        timeout: float,
        remote_state: RemoteStatePuller | None = None,
    ) -> None:
        """`remote_state`: pulls the states of units kept in the host config's
        `terraform.state_backend` (None: the host config names none)."""
        self._runner = runner
        self.remote_state = remote_state
        self.root = root
        self._unit_state = unit_state
        self.redactor = redactor
        self.timeout = timeout

    def plan(
        self,
        tree: Path,
        manifest: Manifest,
        unit: Unit,
        run_dir: Path,
        secrets: Mapping[str, Secret] | None,
    ) -> UnitPlan:
        """Plan `unit` of the proposal checked out at `tree`; logs go to `run_dir`.
        `secrets` None: the unit gets none (it is skipped if it needs any)."""
        if unit.fleet is not None:  # agent.units.proposal_fleet plans those
            return UnitPlan(ProposalUnitStatus.SKIPPED, detail="skipped: not a stack unit")
        if unit.secrets and secrets is None:
            names = ", ".join(sorted(unit.secrets))
            return UnitPlan(
                ProposalUnitStatus.SKIPPED,
                detail=f"skipped: needs secrets ({names}); proposals.secrets_for does not list it",
            )
        work = self.root / "units" / unit.name
        copy = work / "terraform.tfstate"
        deadline = time.monotonic() + min(self.timeout, unit.timeout)
        try:
            variables = self._variables(manifest, unit, secrets, tree, deadline)
            if self._remote(tree, unit):
                # Its state is in the host's backend, whose credentials may write every
                # unit's state: the agent pulls a copy, the sandbox never sees them.
                self._pull(unit.name, copy, deadline)
            elif not copy_state(self._unit_state(unit.name), copy):
                return UnitPlan(
                    ProposalUnitStatus.SKIPPED,
                    detail="skipped: a main pass holds its state; planned again at the next poll",
                )
            return self._terraform(tree, unit, work, copy, run_dir, variables, deadline)
        except NeedsSecrets as exc:
            return UnitPlan(ProposalUnitStatus.SKIPPED, detail=f"skipped: needs secrets ({exc})")
        except (AgentError, ProviderError, ValueError, OSError) as exc:
            message = exc.message if isinstance(exc, AgentError) else str(exc)
            return UnitPlan(ProposalUnitStatus.FAILED, detail=self.redactor.redact(message))
        finally:
            copy.unlink(missing_ok=True)
            (work / "tfplan").unlink(missing_ok=True)  # it holds the variables' values

    def _terraform(
        self,
        tree: Path,
        unit: Unit,
        work: Path,
        copy: Path,
        run_dir: Path,
        variables: dict[str, str],
        deadline: float,
    ) -> UnitPlan:
        runner = self._runner()
        ws = UnitWorkspace(
            stack_dir=tree / unit.stack,
            data_dir=work / "tfdata",
            state_file=copy,
            root=tree,
            work_dir=work / "workdir",
        )
        ensure_private_dir(run_dir)
        with _Log(run_dir / "init.txt", self.redactor) as init_log:
            runner.init_if_needed(ws, init_log, deadline)
        plan_file = work / "tfplan"  # in the work area: the only place the sandbox can write
        with _Log(run_dir / "plan.txt", self.redactor) as plan_log:
            outcome = runner.plan(ws, plan_file, variables, plan_log, deadline, lock=False)
        plan_json: dict[str, Any] = {}
        if outcome.has_changes:
            plan_json = runner.show_json(ws, plan_file, deadline)
            redacted = self.redactor.redact_obj(plan_json)
            atomic_write(run_dir / "plan.json", json.dumps(redacted, indent=1))
        summary = summarize_plan(plan_json)
        counts = (summary.add, summary.change, summary.destroy)
        status = (
            ProposalUnitStatus.CHANGES if summary.has_changes else ProposalUnitStatus.NO_CHANGES
        )
        return UnitPlan(status, counts)

    def _remote(self, tree: Path, unit: Unit) -> bool:
        """True when `unit`'s state is in the host's `terraform.state_backend`."""
        return (
            self.remote_state is not None
            and unit.stack is not None
            and keeps_agent_state(tree / unit.stack)
        )

    def _pull(self, unit: str, target: Path, deadline: float) -> None:
        assert self.remote_state is not None
        try:
            self.remote_state.pull(unit, target, deadline)
        except ProviderError as exc:
            where = self.remote_state.backend.where(unit)
            raise AgentError(f"reading its state from {where} failed: {exc}") from exc

    def _variables(
        self,
        manifest: Manifest,
        unit: Unit,
        secrets: Mapping[str, Secret] | None,
        tree: Path,
        deadline: float,
    ) -> dict[str, str]:
        """Literal vars, outputs of other stacks read from their current state, secrets."""
        variables: dict[str, str] = {}
        for name, value in unit.vars.items():
            if isinstance(value, StackOutputRef):
                upstream = manifest.get_unit(value.unit)
                value = self._output(
                    unit, name, value, secrets is not None, upstream, tree, deadline
                )
            if value is None:
                continue
            text = value if isinstance(value, str) else json.dumps(plain_value(value))
            variables[f"TF_VAR_{name}"] = text
        variables.update(terraform_variables(secrets or {}))
        return variables

    def current_outputs(
        self, tree: Path, requester: str, name: str, upstream: Unit | None, deadline: float
    ) -> dict[str, Any]:
        """The `outputs` of stack unit `name` (`upstream`: its definition in the proposal)
        as applied now: pulled from the host's `terraform.state_backend` when it keeps its
        state there, else its local state file. {} when there is no state yet."""
        if upstream is None or not self._remote(tree, upstream):
            return _state_outputs(self._unit_state(name))
        # Pulled like the unit's own state; gone before any proposal code runs.
        scratch = self.root / "units" / requester / f"upstream-{name}.tfstate"
        try:
            self._pull(name, scratch, deadline)
            return _state_outputs(scratch)
        finally:
            scratch.unlink(missing_ok=True)

    def _output(
        self,
        unit: Unit,
        var: str,
        ref: StackOutputRef,
        trusted: bool,
        upstream: Unit | None,
        tree: Path,
        deadline: float,
    ) -> Any:
        """An upstream output as applied now (the proposal's own upstream changes are not
        applied, so its plan sees today's values). A sensitive one counts as a secret."""
        outputs = self.current_outputs(tree, unit.name, ref.unit, upstream, deadline)
        entry = outputs.get(ref.output)
        if entry is None:
            raise AgentError(
                f"unit {unit.name}: vars.{var} reads output {ref.output!r} of {ref.unit!r},"
                " which has no such output applied yet"
            )
        if entry.get("sensitive") and not trusted:
            raise NeedsSecrets(f"vars.{var} is the sensitive output {ref.output} of {ref.unit}")
        if entry.get("sensitive"):
            value = entry.get("value")
            for text in [value] if isinstance(value, str) else [json.dumps(value)]:
                self.redactor.register(text)
        return entry.get("value")


def _state_outputs(path: Path) -> dict[str, Any]:
    """The `outputs` of a state file ({} when there is none, or it is not JSON)."""
    try:
        return json.loads(path.read_bytes()).get("outputs", {}) if path.exists() else {}
    except ValueError:
        return {}


class AppliedOutputs(dict[str, Any]):
    """A stack's outputs as applied now; reading a sensitive one that the proposal was not
    trusted with raises NeedsSecrets (listing the names is fine)."""

    def __init__(self, values: Mapping[str, Any], withheld: set[str], upstream: str) -> None:
        super().__init__(values)
        self.withheld = withheld
        self.upstream = upstream

    def __getitem__(self, name: str) -> Any:
        if name in self.withheld:
            raise NeedsSecrets(f"the sensitive output {name} of {self.upstream}")
        return super().__getitem__(name)


def applied_outputs(
    outputs: Mapping[str, Any], upstream: str, redactor: Redactor, trusted: bool
) -> AppliedOutputs:
    """The `outputs` of stack unit `upstream`'s state as applied now (the main passes'
    state: a proposal's own upstream changes are not applied). Sensitive values are
    registered with the redactor when `trusted`, else withheld."""
    values: dict[str, Any] = {}
    withheld: set[str] = set()
    for name, entry in outputs.items():
        if entry.get("sensitive") and not trusted:
            withheld.add(name)
            values[name] = None
            continue
        if entry.get("sensitive"):
            value = entry.get("value")
            for text in [value] if isinstance(value, str) else [json.dumps(value)]:
                redactor.register(text)
        values[name] = entry.get("value")
    return AppliedOutputs(values, withheld, upstream)


class NeedsSecrets(Exception):
    """A unit's plan would need a secret that proposals do not get."""


class _Log:
    """Terraform's lines, redacted, into a log file (`.partial` until complete)."""

    def __init__(self, path: Path, redactor: Redactor) -> None:
        self._file = StreamedFile(path)
        self._lines = LineRedactor(redactor, self._file.write_line)

    def __call__(self, line: str) -> None:
        self._lines(line)

    def __enter__(self) -> _Log:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._lines.flush()
        finally:
            self._file.close()
            with contextlib.suppress(OSError):
                if not self._file.path.stat().st_size:
                    self._file.path.unlink()
