"""Running the Terraform CLI for one stack: init (only when needed), plan, show, apply, output.

Every command is a subprocess started from an argv list (never a shell) with an environment
the runner builds: a copy of the agent's environment without inherited `TF_*` settings, plus
TF_DATA_DIR (per unit, outside the checkout), TF_PLUGIN_CACHE_DIR, TF_CLI_CONFIG_FILE,
CHECKPOINT_DISABLE, TF_IN_AUTOMATION, TF_INPUT=0 and the caller's TF_VAR_* values. Secrets
reach Terraform only through that environment, which is never logged.

Stopping: Terraform runs in its own session, so a Ctrl-C on the agent's terminal does not
reach it; the runner sends exactly one SIGINT (Terraform's graceful stop: it finishes or
cancels the current operations, writes state and releases the state lock). A second SIGINT
would make Terraform quit at once and leave the lock behind, so it is never sent; if
Terraform does not exit within the grace period it is killed (SIGKILL to its process group).
When Terraform has exited, whatever it started and left running (a local-exec command's
child) is killed too.

Tied to the agent (see providers.proctrack): Terraform gets SIGTERM from the kernel when the
agent dies (its graceful stop), every process it starts carries a marker in its environment,
and each run is recorded under the tracker's directory until it is done, so the next pass
ends what a killed agent left. `clear_dead_lock` removes the lock-info file of a local state
whose holder is gone.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import IO, Any

from providers.atomic import atomic_write
from providers.errors import TerraformCommandError
from providers.proctrack import ChildTracker, tie_to_parent
from providers.terraform.backend import StateBackend
from providers.terraform.locate import TerraformBinary
from providers.terraform.workdir import keeps_agent_state, shadow_dir, sync_shadow

FINGERPRINT_FILE = ".gitops-init-fingerprint"
LOCK_FILE = ".terraform.lock.hcl"
TAIL_LINES = 50

LineSink = Callable[[str], None]

# Inherited TF_* variables are dropped (TF_CLI_ARGS could add flags, TF_WORKSPACE move the
# state, a stray TF_VAR_x set a variable); these few are kept: logging for debugging, and
# credentials and tuning for private registries.
_KEPT_TF_PREFIXES = ("TF_LOG", "TF_TOKEN_", "TF_REGISTRY_")
_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class UnitWorkspace:
    """Where one unit's stack is, and where Terraform keeps its files for it.

    `data_dir` and `state_file` live in the agent's state directory, never in the checkout.
    Terraform runs in a shadow of the stack (providers/terraform/workdir.py) under
    `work_dir` (default: `workdir` beside `data_dir`), laid out from `root`, the checkout
    the stack is in (default: the stack's parent directory).
    """

    stack_dir: Path
    data_dir: Path
    state_file: Path
    root: Path | None = None
    work_dir: Path | None = None
    # The remote backend the host config names (backend.py); None: `state_file`.
    backend: StateBackend | None = None
    unit: str = ""
    # Variables to mark `sensitive = true` in the shadow (the values of sensitive outputs of
    # other stacks); None leaves the marks of the last plan (an approved plan is applied
    # with them, and reading outputs needs none).
    sensitive_vars: frozenset[str] | None = None

    @property
    def run_dir(self) -> Path:
        """The directory Terraform runs in (`-chdir`)."""
        return shadow_dir(self._root, self.stack_dir, self._work_dir)

    def sync(self) -> Path:
        """Bring the shadow up to date with the checkout; the directory to run in."""
        block = self.backend.block(self.unit) if self.backend is not None else None
        return sync_shadow(
            self._root, self.stack_dir, self._work_dir, self.state_file, block, self.sensitive_vars
        )

    @property
    def _root(self) -> Path:
        return self.root if self.root is not None else self.stack_dir.parent

    @property
    def _work_dir(self) -> Path:
        return self.work_dir if self.work_dir is not None else self.data_dir.parent / "workdir"


class PlanOutcome(Enum):
    NO_CHANGES = 0
    CHANGES = 2

    @property
    def has_changes(self) -> bool:
        return self is PlanOutcome.CHANGES


# A concurrent `CREATE ... IF NOT EXISTS` lost to another creator (see `_run`), as the
# backend's PostgreSQL driver (lib/pq) reports it: a duplicate key of PostgreSQL's own
# catalogs (only they have indexes named pg_*), or the object created meanwhile.
_CATALOG_RACES = ('duplicate key value violates unique constraint "pg_', "already exists")
_CATALOG_RACE_ATTEMPTS = 3


def _lost_catalog_race(line: str) -> bool:
    return "pq: " in line and any(race in line for race in _CATALOG_RACES)


@dataclass
class _Result:
    exit_code: int
    stdout: str  # only when captured
    tail: list[str]  # last lines of stderr (or of stdout when stderr said nothing)
    interrupted: bool
    timed_out: bool
    killed: bool
    elapsed: float


class TerraformRunner:
    def __init__(
        self,
        binary: TerraformBinary,
        *,
        cli_config: Path,
        plugin_cache_dir: Path,
        lock_timeout: float = 300.0,
        base_env: Mapping[str, str] | None = None,
        grace_period: float = 60.0,
        children: ChildTracker | None = None,
        wrap: Callable[[UnitWorkspace, list[str]], list[str]] | None = None,
    ) -> None:
        """`wrap(ws, argv)`: the command line that runs `argv` for `ws` (a sandbox)."""
        self.binary = binary
        self._wrap = wrap
        self.cli_config = Path(cli_config)
        self.plugin_cache_dir = Path(plugin_cache_dir)
        self.lock_timeout = lock_timeout
        self.grace_period = grace_period
        self._base_env = dict(os.environ if base_env is None else base_env)
        self._lock = threading.Lock()
        self._running: dict[subprocess.Popen[bytes], bool] = {}  # process -> SIGINT sent
        self.children = children or ChildTracker(None)
        self.plugin_cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    # --- commands ---------------------------------------------------------------------

    def init_if_needed(self, ws: UnitWorkspace, on_line: LineSink, deadline: float | None) -> bool:
        """Run `init` unless the fingerprint of what init depends on is unchanged.

        Returns True if init ran. The fingerprint (see `init_fingerprint`) is written only
        after a successful init, and removed before one starts.
        """
        self.state_dir_ready(ws)
        fingerprint = self.init_fingerprint(ws.sync())
        marker = ws.data_dir / FINGERPRINT_FILE
        with contextlib.suppress(OSError):
            if marker.read_text() == fingerprint:
                return False
        ws.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            marker.unlink()
        refuse_stranded_state(ws)
        result = self._run(ws, ["init", "-no-color", "-input=false"], {}, on_line, deadline)
        self._check("init", result)
        # Taken again after init: init may have written the lock file it depends on.
        atomic_write(marker, self.init_fingerprint(ws.run_dir))
        return True

    def plan(
        self,
        ws: UnitWorkspace,
        plan_file: Path,
        variables: Mapping[str, str],
        on_line: LineSink,
        deadline: float | None,
        *,
        refresh_only: bool = False,
        lock: bool = True,
        destroy: bool = False,
    ) -> PlanOutcome:
        """`plan -out=PLAN_FILE -detailed-exitcode`; the caller runs `init_if_needed` first.

        `lock=False` (`-lock=false`): the state is not locked, for a plan of a private copy of
        the state (a proposed change), which nothing else reads or writes. `destroy`
        (`-destroy`): a plan that destroys everything in the state (a removed unit)."""
        plan_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        args = [
            "plan",
            "-no-color",
            "-input=false",
            "-detailed-exitcode",
            f"-lock-timeout={self._lock_timeout_arg()}" if lock else "-lock=false",
            f"-out={plan_file}",
        ]
        if refresh_only:
            args.append("-refresh-only")
        if destroy:
            args.append("-destroy")
        result = self._run(ws, args, variables, on_line, deadline)
        if result.exit_code in (0, 2) and not (result.interrupted or result.timed_out):
            return PlanOutcome(result.exit_code)
        if any("terraform init" in line for line in result.tail):
            # Terraform says the working directory needs init although the fingerprint
            # did not change: forget the fingerprint so that the next attempt runs init.
            with contextlib.suppress(FileNotFoundError):
                (ws.data_dir / FINGERPRINT_FILE).unlink()
        self._check("plan", result)
        raise AssertionError("unreachable")  # _check raised

    def show_json(self, ws: UnitWorkspace, plan_file: Path, deadline: float | None) -> dict:
        """The saved plan as JSON (`show -json PLAN_FILE`)."""
        args = ["show", "-no-color", "-json", str(plan_file)]
        result = self._run(ws, args, {}, None, deadline)
        self._check("show", result)
        return _parse_json("show", result.stdout)

    def apply(
        self,
        ws: UnitWorkspace,
        plan_file: Path,
        variables: Mapping[str, str],
        on_line: LineSink,
        deadline: float | None,
    ) -> None:
        """`apply PLAN_FILE`: only ever a saved plan, which needs no approval flag."""
        self.state_dir_ready(ws)
        ws.sync()  # an approval applies a plan saved by an earlier pass: no init before it
        args = [
            "apply",
            "-no-color",
            "-input=false",
            f"-lock-timeout={self._lock_timeout_arg()}",
            str(plan_file),
        ]
        self._check("apply", self._run(ws, args, variables, on_line, deadline))

    def outputs(self, ws: UnitWorkspace, deadline: float | None) -> dict[str, Any]:
        """The stack's root outputs from its state: {name: value} (`output -json`)."""
        return {name: value for name, (value, _) in self.output_entries(ws, deadline).items()}

    def output_entries(
        self, ws: UnitWorkspace, deadline: float | None
    ) -> dict[str, tuple[Any, bool]]:
        """The stack's root outputs: {name: (value, declared sensitive)}."""
        self.init_if_needed(ws, lambda line: None, deadline)
        args = ["output", "-no-color", "-json"]
        result = self._run(ws, args, {}, None, deadline)
        self._check("output", result)
        raw = _parse_json("output", result.stdout)
        return {
            name: (entry.get("value"), bool(entry.get("sensitive"))) for name, entry in raw.items()
        }

    def state_pull(self, ws: UnitWorkspace, deadline: float | None) -> str:
        """The state as its backend stores it (`state pull`; "" when there is none yet).
        Reads only: Terraform takes no lock for it, so a running apply is not delayed."""
        self.init_if_needed(ws, lambda line: None, deadline)
        result = self._run(ws, ["state", "pull"], {}, None, deadline)
        self._check("state", result)
        return result.stdout

    def interrupt(self) -> None:
        """Send one SIGINT to every running Terraform process of this runner.

        A process already signalled is not signalled again (a second SIGINT makes Terraform
        abandon its state lock). Never force-unlocks anything.
        """
        with self._lock:
            for proc, signalled in self._running.items():
                if not signalled:
                    self._sigint(proc)

    # --- what the commands are built from --------------------------------------------

    def command_argv(self, ws: UnitWorkspace, args: Iterable[str]) -> list[str]:
        """The full command line: no variable values, ever (they go in the environment)."""
        argv = [*self.binary.argv, f"-chdir={ws.run_dir}", *args]
        return self._wrap(ws, argv) if self._wrap is not None else argv

    def command_env(self, ws: UnitWorkspace, variables: Mapping[str, str]) -> dict[str, str]:
        env = {
            key: value
            for key, value in self._base_env.items()
            if not key.startswith("TF_") or key.startswith(_KEPT_TF_PREFIXES)
        }
        env.update(
            TF_DATA_DIR=str(ws.data_dir),
            TF_PLUGIN_CACHE_DIR=str(self.plugin_cache_dir),
            TF_CLI_CONFIG_FILE=str(self.cli_config),
            CHECKPOINT_DISABLE="1",
            TF_IN_AUTOMATION="1",
            TF_INPUT="0",
        )
        if ws.backend is not None:
            env.update(ws.backend.env)
        for name, value in variables.items():
            short = name.removeprefix("TF_VAR_")
            if not _VAR_NAME.match(short):
                raise ValueError(f"not a valid Terraform variable name: {short!r}")
            env[f"TF_VAR_{short}"] = value
        return env

    def init_fingerprint(self, stack_dir: Path) -> str:
        """sha256 over everything a change of which needs `init` (see `init_inputs`)."""
        digest = hashlib.sha256()
        digest.update(f"{self.binary.kind} {self.binary.version}\0".encode())
        try:
            digest.update(self.cli_config.read_bytes())
        except FileNotFoundError:
            digest.update(b"<no cli config>")
        digest.update(b"\0")
        for chunk in init_inputs(stack_dir):
            digest.update(chunk.encode())
            digest.update(b"\0")
        return digest.hexdigest()

    @staticmethod
    def state_dir_ready(ws: UnitWorkspace) -> None:
        """The directory of the unit's state file exists (private) before Terraform writes."""
        ws.state_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _lock_timeout_arg(self) -> str:
        return f"{max(0, round(self.lock_timeout))}s"

    # --- running a process -------------------------------------------------------------

    def _run(
        self,
        ws: UnitWorkspace,
        args: list[str],
        variables: Mapping[str, str],
        on_line: LineSink | None,
        deadline: float | None,
    ) -> _Result:
        """Run one command; stream lines to `on_line`, or capture stdout when it is None.

        The `pg` backend creates its schema, table and one sequence shared by every schema
        with `CREATE ... IF NOT EXISTS`, which PostgreSQL does not make safe against a
        concurrent creator: two units' first `init` at once can fail on a duplicate key of
        a system catalog (`pg_class_relname_nsp_index`) or with `relation
        "global_states_id_seq" already exists`. Nothing was created for the loser,
        so such a command is run again (up to `_CATALOG_RACE_ATTEMPTS` times)."""
        for attempt in range(1, _CATALOG_RACE_ATTEMPTS + 1):
            result = self._run_once(ws, args, variables, on_line, deadline)
            raced = result.exit_code != 0 and not (result.interrupted or result.timed_out)
            if not raced or not any(_lost_catalog_race(line) for line in result.tail):
                return result
            if attempt < _CATALOG_RACE_ATTEMPTS:
                if on_line is not None:
                    on_line(f"(another unit created the same state tables: {args[0]} again)")
                time.sleep(random.uniform(0.1, 0.5))
        return result

    def _run_once(
        self,
        ws: UnitWorkspace,
        args: list[str],
        variables: Mapping[str, str],
        on_line: LineSink | None,
        deadline: float | None,
    ) -> _Result:
        """One try of `_run`."""
        argv = self.command_argv(ws, args)
        env = self.command_env(ws, variables)
        what = f"{self._name(args[0])} in {ws.stack_dir}"
        token, marker = self.children.begin(what)
        env.update(marker)
        started = time.monotonic()
        try:
            # The kernel's SIGTERM reaches Terraform when this thread ends: it is the thread
            # that waits for the process below, so it lives exactly as long as it must.
            proc = subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,  # terminal signals are not forwarded: we send ours
                preexec_fn=tie_to_parent(signal.SIGTERM),
            )
        except OSError as exc:
            self.children.done(token)
            raise TerraformCommandError(
                f"cannot start {self._name(args[0])}: {exc}", command=args[0]
            ) from exc
        self.children.started(token, proc.pid, what)
        with self._lock:
            self._running[proc] = False

        emit_lock = threading.Lock()
        failures: list[BaseException] = []
        stdout_parts: list[str] = []
        stderr_tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        stdout_tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)

        def emit(line: str) -> None:
            if on_line is None or failures:
                return
            with emit_lock:
                try:
                    on_line(line)
                except BaseException as exc:  # reported after the process is done
                    failures.append(exc)

        def pump(stream: IO[bytes], tail: collections.deque[str], keep: bool) -> None:
            for raw in iter(stream.readline, b""):
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                tail.append(line)
                if keep:
                    stdout_parts.append(line)
                else:
                    emit(line)
            stream.close()

        assert proc.stdout is not None and proc.stderr is not None
        readers = [
            threading.Thread(
                target=pump, args=(proc.stdout, stdout_tail, on_line is None), daemon=True
            ),
            threading.Thread(target=pump, args=(proc.stderr, stderr_tail, False), daemon=True),
        ]
        for reader in readers:
            reader.start()

        timed_out = killed = False
        try:
            killed, timed_out = self._wait(proc, deadline)
        finally:
            if proc.poll() is None:  # we are being torn down (KeyboardInterrupt...)
                self._kill(proc)
                proc.wait()
            # Before the readers: a grandchild left running would hold the pipes open.
            self.children.done(token)
            for reader in readers:
                reader.join(timeout=10)
            with self._lock:
                interrupted = self._running.pop(proc, False)
        if failures:
            raise failures[0]
        return _Result(
            exit_code=proc.returncode,
            stdout="\n".join(stdout_parts),
            tail=_trim(list(stderr_tail) or list(stdout_tail)),
            interrupted=interrupted and not timed_out,
            timed_out=timed_out,
            killed=killed,
            elapsed=time.monotonic() - started,
        )

    def _wait(self, proc: subprocess.Popen[bytes], deadline: float | None) -> tuple[bool, bool]:
        """Wait; at the deadline send SIGINT, later SIGKILL. Returns (killed, timed_out)."""
        if deadline is None:
            proc.wait()
            return False, False
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            return False, False
        except subprocess.TimeoutExpired:
            pass
        with self._lock:
            if not self._running.get(proc, True):
                self._sigint(proc)
        try:
            proc.wait(timeout=self.grace_period)
            return False, True
        except subprocess.TimeoutExpired:
            self._kill(proc)
            proc.wait()
            return True, True

    def _sigint(self, proc: subprocess.Popen[bytes]) -> None:
        """Caller holds self._lock."""
        self._running[proc] = True
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes]) -> None:
        # The whole session: Terraform, its provider plugins and provisioner commands.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    def _check(self, command: str, result: _Result) -> None:
        name = self._name(command)
        message = "\n".join(result.tail)
        if result.timed_out:
            how = (
                f"did not stop within {self.grace_period:.0f} s of SIGINT and was killed"
                if result.killed
                else "was interrupted and stopped"
            )
            raise TerraformCommandError(
                f"{name} timed out after {result.elapsed:.0f} s ({how})"
                + (f":\n{message}" if message else ""),
                command=command,
                exit_code=result.exit_code,
            )
        if result.interrupted:
            raise TerraformCommandError(
                f"{name} was interrupted" + (f":\n{message}" if message else ""),
                command=command,
                exit_code=result.exit_code,
            )
        if result.exit_code != 0:
            raise TerraformCommandError(
                f"{name} failed (exit code {result.exit_code})"
                + (f":\n{message}" if message else ""),
                command=command,
                exit_code=result.exit_code,
            )

    def _name(self, command: str) -> str:
        return f"{'tofu' if self.binary.kind == 'tofu' else 'terraform'} {command}"


# --- a lock left by a dead Terraform ------------------------------------------------------------


def lock_info_file(state_file: Path) -> Path:
    """Where the local backend writes who holds the lock of `state_file`."""
    return state_file.with_name(f".{state_file.name}.lock.info")


def clear_dead_lock(state_file: Path) -> bool:
    """Remove the lock-info file of a local state whose holder is gone; True if removed.

    The local backend's lock is an fcntl lock on the state file, which the kernel drops when
    its holder dies; the `.lock.info` file beside it is only a note and stays behind. If the
    fcntl lock can be taken now, no process holds the state: the note is stale. A lock held
    by a live process is left alone.
    """
    info = lock_info_file(state_file)
    if not info.exists():
        return False
    try:
        fd = os.open(state_file, os.O_RDWR)
    except FileNotFoundError:
        fd = None  # no state yet: nothing can hold a lock on it
    if fd is not None:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.lockf(fd, fcntl.LOCK_UN)
        except OSError:
            return False  # a live Terraform holds it
        finally:
            os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        info.unlink()
    return True


# --- the init fingerprint -------------------------------------------------------------------
#
# What makes `init` necessary: the lock file, the backend (`terraform { backend ... }`,
# `cloud`), required providers (`terraform { required_providers ... }` and providers implied
# by resource/data/provider blocks), and module calls with their sources (and, for a local
# module "./x", the same things inside it, recursively). The fingerprint is taken over
# exactly these, read from the top-level blocks of every *.tf and *.tf.json file, so that a
# change to a resource's arguments does not re-run init. A file the scanner cannot make
# sense of counts in full. If Terraform still says init is needed, `plan` forgets the
# fingerprint so that the next attempt runs init.


def init_inputs(stack_dir: Path) -> list[str]:
    """The pieces of the stack that `init` depends on, in a stable order."""
    out: list[str] = []
    _collect(Path(stack_dir), ".", out, set())
    return out


def _collect(directory: Path, label: str, out: list[str], seen: set[Path]) -> None:
    real = directory.resolve()
    if real in seen:
        return
    seen.add(real)
    out.append(f"dir {label}")  # relative, so that moving the checkout needs no init
    if label == ".":
        try:
            out.append("lock " + (directory / LOCK_FILE).read_text(errors="replace"))
        except FileNotFoundError:
            out.append("lock <none>")
    try:
        names = sorted(p.name for p in directory.iterdir() if p.is_file())
    except OSError as exc:
        out.append(f"unreadable {exc}")
        return
    local_modules: list[str] = []
    for name in names:
        if not (name.endswith(".tf") or name.endswith(".tf.json")):
            continue
        try:
            text = (directory / name).read_text(errors="replace")
        except OSError as exc:
            out.append(f"file {name} unreadable {exc}")
            continue
        pieces, sources = _json_inputs(text) if name.endswith(".tf.json") else _hcl_inputs(text)
        out.append(f"file {name}")
        out.extend(pieces)
        local_modules += [s for s in sources if s.startswith(("./", "../"))]
    for source in local_modules:
        _collect(directory / source, f"{label}/{source}", out, seen)


def _implied(block_type: str, labels: list[str]) -> str | None:
    if block_type in ("resource", "data", "ephemeral") and labels:
        return f"provider {labels[0].split('_', 1)[0]}"
    if block_type == "provider" and labels:
        return f"provider {labels[0]}"
    return None


def _hcl_inputs(text: str) -> tuple[list[str], list[str]]:
    """(init-relevant pieces, module sources) of one HCL file."""
    blocks = hcl_top_level_blocks(text)
    if blocks is None:
        return [f"whole {text}"], re.findall(r'source\s*=\s*"([^"]*)"', text)
    pieces: set[str] = set()
    sources: list[str] = []
    for block_type, labels, body in blocks:
        if block_type in ("terraform", "module"):
            pieces.add(f"{block_type} {body}")
            if block_type == "module":
                sources += re.findall(r'^\s*source\s*=\s*"([^"]*)"', body, re.MULTILINE)
        elif implied := _implied(block_type, labels):
            pieces.add(implied)
    return sorted(pieces), sources


def _json_inputs(text: str) -> tuple[list[str], list[str]]:
    try:
        doc = json.loads(text)
    except ValueError:
        return [f"whole {text}"], []
    if not isinstance(doc, dict):
        return [f"whole {text}"], []
    pieces: set[str] = set()
    sources: list[str] = []
    for key in ("terraform", "module"):
        if key in doc:
            pieces.add(f"{key} {json.dumps(doc[key], sort_keys=True)}")
    modules = doc.get("module")
    for call in modules.values() if isinstance(modules, dict) else ():
        for entry in call if isinstance(call, list) else [call]:
            if isinstance(entry, dict) and isinstance(entry.get("source"), str):
                sources.append(entry["source"])
    for key in ("resource", "data", "ephemeral", "provider"):
        section = doc.get(key)
        if isinstance(section, dict):
            for label in section:
                if implied := _implied(key, [label]):
                    pieces.add(implied)
    return sorted(pieces), sources


_HEREDOC = re.compile(r"<<-?([A-Za-z_][A-Za-z0-9_-]*)[ \t]*\r?\n")
_HEADER = re.compile(r'^\s*([A-Za-z_][\w-]*)((?:\s+(?:"(?:[^"\\]|\\.)*"|[A-Za-z_][\w-]*))*)\s*$')
_LABEL = re.compile(r'"((?:[^"\\]|\\.)*)"|([A-Za-z_][\w-]*)')


def hcl_top_level_blocks(text: str) -> list[tuple[str, list[str], str]] | None:
    """The top-level blocks of an HCL file as (type, labels, full text), or None if unsure.

    A small scanner, not a parser: it skips comments, quoted strings (with `${...}`
    templates) and heredocs, and matches braces. None means "could not follow the file".
    """
    blocks: list[tuple[str, list[str], str]] = []
    i, n = 0, len(text)
    depth = 0
    block_start = -1
    header: tuple[str, list[str]] | None = None
    while i < n:
        c = text[i]
        if c == "#" or text.startswith("//", i):
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        if text.startswith("/*", i):
            end = text.find("*/", i + 2)
            if end < 0:
                return None
            i = end + 2
            continue
        if c == '"':
            i = _skip_string(text, i)
            if i < 0:
                return None
            continue
        if text.startswith("<<", i) and (m := _HEREDOC.match(text, i)):
            i = _skip_heredoc(text, m.end(), m.group(1))
            if i < 0:
                return None
            continue
        if c in "{[(":
            if depth == 0:
                if c != "{":
                    return None  # an attribute at top level: not valid Terraform
                line_start = text.rfind("\n", 0, i) + 1
                m = _HEADER.match(text[line_start:i])
                if not m:
                    return None
                labels = [
                    lm.group(1) if lm.group(1) is not None else lm.group(2)
                    for lm in _LABEL.finditer(m.group(2))
                ]
                header = (m.group(1), labels)
                block_start = line_start
            depth += 1
        elif c in "}])":
            depth -= 1
            if depth < 0:
                return None
            if depth == 0 and header is not None:
                blocks.append((header[0], header[1], text[block_start : i + 1]))
                header = None
        i += 1
    return blocks if depth == 0 else None


def _skip_string(text: str, i: int) -> int:
    """Index after the quoted string starting at text[i] == '"', or -1."""
    i += 1
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
        elif c == '"':
            return i + 1
        elif c == "\n":
            return -1
        elif c in "$%" and text.startswith(c, i + 1):
            i += 2  # "$${" and "%%{" are literal text, not templates
        elif c in "$%" and text.startswith("{", i + 1):
            i = _skip_template(text, i + 2)
            if i < 0:
                return -1
        else:
            i += 1
    return -1


def _skip_template(text: str, i: int) -> int:
    """Index after the `}` closing a `${`/`%{` template whose body starts at i, or -1."""
    depth = 1
    n = len(text)
    while i < n:
        c = text[i]
        if c == '"':
            i = _skip_string(text, i)
            if i < 0:
                return -1
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return -1


def _skip_heredoc(text: str, i: int, marker: str) -> int:
    """Index after the heredoc whose body starts at i (the line that is just `marker`)."""
    m = re.compile(r"^[ \t]*" + re.escape(marker) + r"[ \t]*\r?$", re.MULTILINE).search(text, i)
    return m.end() if m else -1


# --- small helpers ----------------------------------------------------------------------------


def _trim(lines: list[str]) -> list[str]:
    while lines and not lines[0].strip():
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def _parse_json(command: str, text: str) -> dict:
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise TerraformCommandError(
            f"terraform {command} -json printed something that is not JSON: {exc}",
            command=command,
        ) from exc
    if not isinstance(doc, dict):
        raise TerraformCommandError(
            f"terraform {command} -json printed {type(doc).__name__}, not an object",
            command=command,
        )
    return doc


def refuse_stranded_state(ws: UnitWorkspace) -> None:
    """A unit that kept its state in the agent's state directory, and whose host config now
    names a remote backend, must not start afresh there: Terraform would plan to create
    everything again. Moving the state is a person's step (docs/terraform.md)."""
    if ws.backend is None or not keeps_agent_state(ws.stack_dir):
        return
    try:
        state = json.loads(ws.state_file.read_text())
    except (OSError, ValueError):
        return  # no local state (or not one Terraform could read either)
    if isinstance(state, dict) and state.get("resources"):
        raise TerraformCommandError(
            f"unit {ws.unit} has state in {ws.state_file}, but the host config now keeps"
            f" state in {ws.backend.where(ws.unit)}, and the agent does not move state by"
            " itself: push it there once (`terraform state push`, see docs/terraform.md,"
            " 'Remote state'), then move the local file aside",
            command="init",
        )
