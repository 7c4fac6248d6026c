"""The `agent` command.

Exit codes: EXIT_CODES below (`agent --help` prints it; the README has the same table).

`agent run` is the daemon (agent.service.daemon). While it runs, `reconcile`, `approve`,
`suspend` and `resume` go through its control socket (agent.service.control) and print exactly
what they print without it; without a daemon they work directly on the state directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.config import HostConfig, load_host_config, resolve_host_config_path
from agent.core.fsutil import private_umask
from agent.core.progress import ConsoleReporter
from agent.errors import (
    AgentError,
    ConfigError,
    NotFoundError,
    PassBusyError,
    StoreError,
)
from agent.state.layout import StateLayout
from agent.state.store import RunStatus, RunStore, open_run_store

if TYPE_CHECKING:
    from agent.state.storefile import StoreReport

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_BUSY = 4
EXIT_NOT_FOUND = 5
EXIT_CHANGES = 2  # reconcile --detailed-exitcode: changes or drift pending or held
EXIT_USAGE_DETAILED = 64  # a usage error when 2 would mean "changes" (sysexits' EX_USAGE)
EXIT_INTERRUPTED = 130
EXIT_PIPE = 141  # 128 + SIGPIPE: what a shell reports for git or terraform in `| head`

_EXIT_BY_ERROR: list[tuple[type[AgentError], int]] = [
    (ConfigError, EXIT_CONFIG),
    (StoreError, EXIT_CONFIG),
    (PassBusyError, EXIT_BUSY),
    (NotFoundError, EXIT_NOT_FOUND),
]


EXIT_CODES = """\
exit codes:
  0    success; with reconcile --detailed-exitcode: success and nothing left to do
  1    a unit failed, a revision was rejected, or `validate` found errors
  2    usage error (bad arguments: the usage is printed and nothing runs);
       with reconcile --detailed-exitcode: success, but changes or drift are
       pending or held (a dry run that found some, a plan held for approval,
       drift only reported), as `terraform plan -detailed-exitcode`
  3    the host config is invalid or the state directory cannot be used
  4    another pass is running (with --no-wait)
  5    the unit or run named does not exist
  64   usage error of a command line that has --detailed-exitcode (so that 2
       there can only mean changes)
  130  interrupted (SIGINT/SIGTERM); the running Terraform was stopped gracefully
  141  the reader of the output went away (`agent logs app | head`): the
       command stops quietly, with the status a shell shows for git there"""


def build_parser() -> argparse.ArgumentParser:
    import shtab

    def command(name: str, summary: str, example: str, details: str = "") -> Any:
        """A subcommand whose --help says what it does (`summary`, `details`) and shows
        `example` (one command per line)."""
        description = f"{summary[0].upper()}{summary[1:]}."
        return sub.add_parser(
            name,
            help=summary,
            description=f"{description}\n\n{details}" if details else description,
            epilog=("examples:" if "\n" in example else "example:") + f"\n{example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    def json_flag(p: argparse.ArgumentParser, what: str = "the result") -> None:
        p.add_argument(
            "--json",
            action="store_true",
            help=f"print {what} as JSON (times as RFC 3339 strings, UTC)",
        )

    parser = argparse.ArgumentParser(
        prog="agent",
        description="gitops-agent: keeps Terraform stacks and SSH-managed hosts in line with"
        " a Git repository.",
        epilog="examples:\n  agent quickstart /tmp/qs\n  agent reconcile --now --dry-run\n"
        "  agent status\n  agent COMMAND --help\n\n" + EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        help="host config file (default: $GITOPS_AGENT_CONFIG, else /etc/gitops-agent/agent.yaml)",
    ).complete = shtab.FILE  # type: ignore[attr-defined]
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = command(
        "reconcile",
        "run a reconcile pass now: fetch, plan, apply or hold, converge hosts",
        "  agent reconcile --now\n  agent reconcile --now --unit app --dry-run --detailed-exitcode",
        "Through the running agent (`agent run`) if there is one, else directly on the\n"
        "state directory. Prints each unit's result; progress goes to stderr.",
    )
    p.add_argument("--now", action="store_true", help="run the pass now (the default here)")
    p.add_argument("--unit", help="reconcile only this unit (exit 5 if the manifest has none)")
    p.add_argument("--dry-run", action="store_true", help="plan only; apply nothing")
    p.add_argument(
        "--changed-only",
        action="store_true",
        help="plan only units whose inputs changed since their last clean plan or whose drift"
        " check is due; record the others `unchanged` (what the agent does for pushes)",
    )
    p.add_argument(
        "--override-window",
        action="store_true",
        help="apply even outside the change window (needs --reason; recorded with who asked)",
    )
    p.add_argument("--reason", help="why the change window is overridden (recorded)")
    wait = p.add_mutually_exclusive_group()
    wait.add_argument(
        "--wait", dest="wait", action="store_true", default=True, help="wait for a running pass"
    )
    wait.add_argument(
        "--no-wait", dest="wait", action="store_false", help="fail (exit 4) if a pass runs"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="stream Terraform's output")
    p.add_argument(
        "--detailed-exitcode",
        action="store_true",
        help="exit 2 when changes or drift are left pending or held, 0 when nothing is"
        " (usage errors then exit 64)",
    )
    json_flag(p, "the pass result")

    p = command(
        "run",
        "run as a service: timers, webhooks, control socket",
        "  agent --config /etc/gitops-agent/agent.yaml run",
        "What the systemd unit starts. Logs go to the journal (stderr).",
    )

    p = command(
        "approve",
        "apply the plan a run held for approval",
        "  agent approve r-20261123T091502-3f9a --unit db",
        "Exactly the saved plan is applied, or refused if it went stale.",
    )
    p.add_argument("run", help="the run that held the plan (see `agent status`, `agent history`)")
    p.add_argument("--unit", help="approve only this unit's plan (default: every plan held)")
    json_flag(p)

    p = command(
        "suspend",
        "leave a unit out of every pass until resumed",
        '  agent suspend app --reason "database migration by hand"',
    )
    p.add_argument("unit", help="the unit to leave out")
    p.add_argument("--reason", help="why (shown in `agent status`)")
    json_flag(p)

    p = command("resume", "reconcile a suspended unit again", "  agent resume app")
    p.add_argument("unit", help="the suspended unit")
    json_flag(p)

    p = command(
        "status",
        "each unit: revision, last result, drift, when; a fleet's hosts",
        "  agent status\n  agent status --json",
    )
    json_flag(p, "the status")

    p = command(
        "logs",
        "the plan/apply output of a unit, as Terraform printed it (a fleet: each host's diff)",
        "  agent logs app\n  agent logs app --run r-20261123T091502-3f9a",
    )
    p.add_argument("unit", help="the unit whose output to show")
    p.add_argument("--run", help="a run id (default: the unit's latest run with output)")
    p.add_argument("--proposal", metavar="REF", help="the unit's plan in proposal REF")
    json_flag(p, "the output")

    p = command(
        "proposals",
        "proposed changes (pull/merge requests, branches) and their plans",
        "  agent proposals\n  agent proposals --plan\n  agent logs app --proposal pull/7/head",
        "Lists the open proposals the host config's `proposals:` names, each with its head\n"
        "and each affected unit's plan. --plan fetches them and plans every new head now\n"
        "(the running agent does so on its poll and on pull/merge-request webhooks).",
    )
    p.add_argument("--plan", action="store_true", help="fetch and plan new heads now")
    p.add_argument("--ref", help="with --plan: plan only this ref (again if unchanged)")
    p.add_argument("--all", action="store_true", help="closed proposals too")
    json_flag(p, "the proposals")

    p = command(
        "history",
        "past passes, or one unit's results in them",
        "  agent history --limit 5\n  agent history --unit app",
    )
    p.add_argument("--unit", help="show this unit's results (plan counts, a fleet's hosts)")
    p.add_argument("--limit", type=int, default=20, help="at most this many (default: 20)")
    json_flag(p, "the history")

    p = command(
        "validate",
        "check a repo's manifest, templates and stacks, offline",
        "  agent validate ~/src/infra",
        "What a repository's CI runs before merge; exit 1 if it found errors.",
    )
    p.add_argument(
        "repo_dir", nargs="?", default=".", help="the repository (default: the current directory)"
    ).complete = shtab.DIRECTORY  # type: ignore[attr-defined]
    json_flag(p, "the report")

    p = command("version", "versions of the agent and of Terraform", "  agent version --json")
    json_flag(p, "the versions")

    p = command(
        "quickstart",
        "set up and run the offline quickstart",
        "  agent quickstart /tmp/qs",
    )
    p.add_argument(
        "dir", nargs="?", help="where to lay it out (default: a new temp dir)"
    ).complete = shtab.DIRECTORY  # type: ignore[attr-defined]

    p = command(
        "service",
        "install or remove the systemd service on this machine (as root)",
        "  agent service install --dry-run\n  sudo agent service install",
        "Put the systemd unit, sysusers and tmpfiles files where systemd reads them, create\n"
        "the user and directories, write a starter host config if there is none. Idempotent.",
    )
    p.add_argument(
        "action", choices=["install", "uninstall"], help="install, or remove what install put"
    )
    p.add_argument("--dry-run", action="store_true", help="print what it would do; change nothing")
    p.add_argument(
        "--root", default="/", help="install into this root (packaging); runs no systemd tool"
    ).complete = shtab.DIRECTORY  # type: ignore[attr-defined]

    p = command(
        "store",
        "check the run store, or restore it from its backup",
        "  agent store check\n  agent store restore",
        "After a damaged or lost agent.db (exit 3): see docs/recovery.md.",
    )
    store_sub = p.add_subparsers(
        dest="store_command", metavar="ACTION", required=True, help="check, or restore"
    )
    q = store_sub.add_parser("check", help="integrity check of the run store and its backup")
    json_flag(q, "the report")
    q = store_sub.add_parser(
        "restore", help="put the backup in place of a damaged run store (agent stopped)"
    )
    json_flag(q, "what was restored")

    p = command(
        "cluster",
        "show the agents sharing the store, the units each owns, and the leases held",
        "  agent cluster\n  agent cluster --json",
        "Scale-out mode (host config `cluster:`): see docs/scale-out.md.",
    )
    json_flag(p, "the agents and leases")

    p = command(
        "drain",
        "hand this agent's units to the others before a planned stop",
        "  agent drain && systemctl stop gitops-agent",
        "The running agent takes no new unit, lets its running unit finish, gives its\n"
        "leases back and counts itself out: the others take its units over at once.\n"
        "A restart of the agent makes it take units again.",
    )
    p.add_argument(
        "--timeout", type=float, default=600.0, help="seconds to wait for the running unit"
    )
    json_flag(p, "the answer")

    p = command(
        "completion",
        "print a shell completion script",
        "  agent completion bash > ~/.local/share/bash-completion/completions/agent\n"
        "  source <(agent completion bash)",
    )
    p.add_argument("shell", choices=["bash", "zsh"], help="the shell to complete for")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(words)
    except SystemExit as exc:
        # With --detailed-exitcode, 2 means "changes pending": a usage error must not say so.
        if exc.code == EXIT_USAGE and _asks_detailed_exitcode(words):
            return EXIT_USAGE_DETAILED
        raise
    # Before anything is created: no mode in the state directory may depend on the
    # caller's umask. Not for `service`: it installs system files meant to be readable.
    if args.command != "service":
        private_umask()
    try:
        code = _run(args)
        sys.stdout.flush()  # a closed pipe shows here for the last lines
        return code
    except BrokenPipeError:
        return _pipe_closed()


def _asks_detailed_exitcode(words: Sequence[str]) -> bool:
    flag = "--detailed-exitcode"
    # argparse takes unambiguous prefixes too (--detailed).
    return any(len(w) >= 5 and flag.startswith(w.split("=")[0]) for w in words)


def _pipe_closed() -> int:
    """The reader went away (`agent logs app | head`): stop quietly, as git does.

    What is still buffered goes to /dev/null, so Python's own flush at exit cannot
    raise again and print a traceback."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_PIPE


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    handler: Callable[[argparse.Namespace], int] = _COMMANDS[args.command]
    try:
        return handler(args)
    except AgentError as exc:
        if args.debug:
            logging.exception("failed")
        print(exc.render(), file=sys.stderr)
        for error_type, code in _EXIT_BY_ERROR:
            if isinstance(exc, error_type):
                return code
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _host(args: argparse.Namespace) -> HostConfig:
    return load_host_config(resolve_host_config_path(args.config, os.environ))


def _print_json(data: Any) -> None:
    from agent.cli.views import as_json

    print(json.dumps(as_json(data), indent=2, sort_keys=True, default=str))


# --- commands -----------------------------------------------------------------------


def cmd_reconcile(args: argparse.Namespace) -> int:
    from agent.core.redact import install_logging_redaction
    from agent.engine.reconcile import PassRequest, Reconciler
    from agent.policy.windows import override_record
    from agent.service.control import check_not_suspended, user_name
    from agent.units.changed import CLI_CHANGED_ONLY

    host = _host(args)
    reporter = ConsoleReporter(sys.stderr)
    if args.verbose:
        reporter = _verbose(reporter)
    reason = _override_reason(args)
    if (client := _daemon(host)) is not None:
        options = {"unit": args.unit, "dry_run": args.dry_run, "wait": args.wait}
        if args.changed_only:
            options["changed_only"] = True
        if reason is not None:
            options["override_window"] = reason  # the daemon records who asked (SO_PEERCRED)
        result = _remote_pass(client, host, "reconcile", reporter, lines=args.verbose, **options)
        return _print_pass(result, args)
    reconciler = Reconciler(host, reporter=reporter)
    install_logging_redaction(reconciler.redactor)
    with _interrupt_on_signals(reconciler.interrupt):
        try:
            check_not_suspended(reconciler.store, args.unit)
            if args.wait:
                _say_if_busy(reconciler)
            override = override_record(user_name(os.getuid()), reason)
            request = PassRequest(
                trigger=CLI_CHANGED_ONLY if args.changed_only else "cli",
                dry_run=args.dry_run,
                unit=args.unit,
                override_window=override,
                changed_only=args.changed_only,
            )
            result = reconciler.run_pass(request, wait=args.wait)
        finally:
            reconciler.close()
    return _print_pass(result, args)


def _override_reason(args: argparse.Namespace) -> str | None:
    """The reason given with --override-window (None without it); refused without one."""
    if not args.override_window:
        if args.reason is not None:
            raise AgentError("--reason is for --override-window", hint="add --override-window")
        return None
    if not args.reason or not args.reason.strip() or not args.reason.isprintable():
        raise AgentError(
            "--override-window needs --reason TEXT (one printable line)",
            hint="say why the change window is overridden: it is recorded with who asked",
        )
    return args.reason


def cmd_approve(args: argparse.Namespace) -> int:
    from agent.core.redact import install_logging_redaction
    from agent.engine.reconcile import Reconciler
    from agent.service.control import user_name

    host = _host(args)
    reporter = ConsoleReporter(sys.stderr)
    if (client := _daemon(host)) is not None:
        options = {"run": args.run, "unit": args.unit, "user": user_name(os.getuid())}
        result = _remote_pass(client, host, "approve", reporter, **options)
        return _print_pass(result, args)
    reconciler = Reconciler(host, reporter=reporter)
    install_logging_redaction(reconciler.redactor)
    with _interrupt_on_signals(reconciler.interrupt):
        try:
            _say_if_busy(reconciler)
            result = reconciler.approve(args.run, args.unit, by=user_name(os.getuid()))
        finally:
            reconciler.close()
    code = _print_pass(result, args)
    if code == EXIT_OK and not args.json:
        print("units that depend on it are reconciled by the next pass", file=sys.stderr)
    return code


def cmd_suspend(args: argparse.Namespace) -> int:
    from agent.service.control import suspend_unit

    return _unit_switch(
        args,
        "suspend",
        lambda store, known, by: suspend_unit(store, args.unit, known, by=by, reason=args.reason),
        reason=args.reason,
    )


def cmd_resume(args: argparse.Namespace) -> int:
    from agent.service.control import resume_unit

    return _unit_switch(
        args, "resume", lambda store, known, by: resume_unit(store, args.unit, known, by=by)
    )


def _unit_switch(
    args: argparse.Namespace, op: str, direct: Callable[..., Any], **extra: Any
) -> int:
    """suspend/resume: through the daemon, or on the store under the pass lock."""
    from agent.engine.reconcile import Reconciler
    from agent.service.control import known_units, run_remote, user_name
    from agent.state.passlock import PassLock

    host = _host(args)
    if (client := _daemon(host)) is not None:
        me = user_name(os.getuid())
        answer = run_remote(
            client, op, unit=args.unit, state_dir=str(host.state_dir), user=me, **extra
        )
    else:
        reconciler = Reconciler(host)
        try:
            _say_if_busy(reconciler)
            lock = PassLock(reconciler.layout.root)
            lock.acquire(wait=True)
            with lock:
                answer = direct(reconciler.store, known_units(reconciler), user_name(os.getuid()))
        finally:
            reconciler.close()
    _print_json(answer) if args.json else print(answer["message"])
    return EXIT_OK


def _daemon(host: HostConfig) -> Any:
    """A connection to the running daemon of this host config, or None (direct mode)."""
    from agent.service.control import ControlClient

    return ControlClient.connect(host.service.control_socket)


def _remote_pass(
    client: Any, host: HostConfig, op: str, reporter: Callable[[Any], None], **options: Any
) -> Any:
    """Run a pass (or an approval) in the daemon, showing its progress as direct mode does."""
    from agent.service.control import decode_result, run_remote

    def note(message: str) -> None:
        print(message, file=sys.stderr)

    try:
        answer = run_remote(client, op, reporter, note, state_dir=str(host.state_dir), **options)
    except KeyboardInterrupt:
        note("\nstopped following: the pass goes on in the agent (see `agent status`)")
        raise
    return decode_result(answer)


def _print_pass(result: Any, args: argparse.Namespace) -> int:
    """Print a pass's result (text or --json); the exit code it deserves."""
    from agent.cli.views import pass_view, pending_changes, render_pass

    if args.json:
        _print_json(pass_view(result))
    else:
        print(render_pass(result))
        if result.error:
            print(result.error, file=sys.stderr)
    if result.status is RunStatus.INTERRUPTED:
        return EXIT_INTERRUPTED
    if not result.ok:
        return EXIT_FAILED
    if getattr(args, "detailed_exitcode", False) and pending_changes(result):
        return EXIT_CHANGES
    return EXIT_OK


def _verbose(base: ConsoleReporter) -> Callable[[Any], None]:
    from agent.core.progress import EventKind

    def report(event: Any) -> None:
        if event.kind is EventKind.UNIT_LINE:
            base.stream.write(f"  [{event.unit}] {event.message}\n")
            return
        base(event)

    return report


def _say_if_busy(reconciler: Any) -> None:
    from agent.state.passlock import PassLock

    lock = PassLock(reconciler.layout.root)
    try:
        lock.acquire(wait=False)
    except PassBusyError as exc:
        print(f"waiting: {exc.message}", file=sys.stderr)
    else:
        lock.release()


class _interrupt_on_signals:
    """On the first SIGINT/SIGTERM, ask the pass to stop (Terraform gets one SIGINT).

    Later signals are only acknowledged: a second SIGINT to Terraform would make it
    exit at once and could leave its state lock behind.
    """

    def __init__(self, interrupt: Callable[[], None]) -> None:
        self._interrupt = interrupt
        self._seen = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self._seen:
            self._seen = True
            print(
                f"\n{signal.Signals(signum).name}: stopping after Terraform finishes"
                " cleaning up...",
                file=sys.stderr,
            )
            self._interrupt()
        else:
            print("still stopping: waiting for Terraform to release its lock", file=sys.stderr)

    def __enter__(self) -> _interrupt_on_signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def _open_store(args: argparse.Namespace) -> tuple[RunStore, StateLayout]:
    """The store, read-only: reading commands never write it nor wait on a writer."""
    host = _host(args)
    return open_run_store(host, read_only=True), StateLayout(host.state_dir)


def cmd_status(args: argparse.Namespace) -> int:
    from agent.cli.views import render_status, status_view
    from agent.service.control import describe_suspension

    store, layout = _open_store(args)
    view = status_view(store, layout)
    suspended = store.suspensions.by_unit()
    view["suspended"] = {unit: asdict(row) for unit, row in suspended.items()}
    if args.json:
        _print_json(view)
        return EXIT_OK
    print(render_status(view))
    for unit, row in suspended.items():
        print(f"suspended: {unit} ({describe_suspension(row)}); `agent resume {unit}`")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from agent.service.daemon import run_daemon
    from agent.service.logfmt import setup_logging

    context = setup_logging(logging.DEBUG if args.debug else logging.INFO)
    host = _host(args)
    _check_credentials(host)
    return run_daemon(host, context)


def _check_credentials(host: HostConfig) -> None:
    """Before the daemon starts: a credential of the unit that the config names must be there."""
    from agent.service.install import missing_credentials

    missing = missing_credentials(host)
    if missing:
        key, path, source = missing[0]
        raise ConfigError(
            f"{host.path}: {key}: {path} was not handed over by systemd",
            hint=f"create {source} (root:root, 0600) and restart the service; "
            f"every file in {source.parent} reaches the agent as {path.parent}/gitops_<file>",
        )


def cmd_service(args: argparse.Namespace) -> int:
    from agent.service.install import carry_out, plan_install, plan_uninstall, what_is_left

    root = Path(args.root)
    if root == Path("/") and not args.dry_run and os.geteuid() != 0:
        raise ConfigError(
            f"`agent service {args.action}` changes /etc and needs root",
            hint=f"sudo {sys.argv[0]} service {args.action} (or --dry-run to see the steps)",
        )
    steps = plan_install(root) if args.action == "install" else plan_uninstall(root)
    verb = "Would" if args.dry_run else "Doing"
    print(f"{verb}: agent service {args.action}" + ("" if root == Path("/") else f" --root {root}"))
    carry_out(steps, dry_run=args.dry_run, say=print)
    if args.action == "install":
        print("\nStill yours to provide:")
        for item in what_is_left(root):
            print(f"  - {item}")
    else:
        print("\nKept: /etc/gitops-agent (config, credentials) and /var/lib/gitops-agent (state).")
    return EXIT_OK


def cmd_cluster(args: argparse.Namespace) -> int:
    from agent.cli.cluster import cluster_view, render_cluster

    view = cluster_view(_host(args))
    _print_json(view) if args.json else print(render_cluster(view))
    return EXIT_OK


def cmd_drain(args: argparse.Namespace) -> int:
    from agent.cli.cluster import drain

    host = _host(args)
    if (client := _daemon(host)) is None:
        raise AgentError(
            f"no agent runs on {host.service.control_socket}: nothing to drain",
            hint="`agent drain` asks the running agent (`agent run`) to hand its units over",
        )
    answer = drain(client, host, timeout=args.timeout, say=lambda m: print(m, file=sys.stderr))
    if args.json:
        _print_json(answer)
    else:
        print(f"agent {answer['agent']} is draining: it holds no lease; the others run its units")
    return EXIT_OK


def cmd_history(args: argparse.Namespace) -> int:
    from agent.cli.views import history_view, render_history

    store, layout = _open_store(args)
    view = history_view(store, args.unit, args.limit, layout)
    _print_json(view) if args.json else print(render_history(view))
    return EXIT_OK


def cmd_logs(args: argparse.Namespace) -> int:
    from agent.cli.views import logs_view, render_logs

    store, layout = _open_store(args)
    if args.proposal:
        from agent.cli.proposals import proposal_logs_view, render_proposal_logs
        from agent.state.proposals import ProposalRecords

        records = ProposalRecords(store)
        found = proposal_logs_view(records, layout.root / "proposals", args.unit, args.proposal)
        _print_json(found) if args.json else print(render_proposal_logs(found))
        return EXIT_OK
    view = logs_view(store, layout, args.unit, args.run)
    _print_json(view) if args.json else print(render_logs(view))
    return EXIT_OK


def cmd_proposals(args: argparse.Namespace) -> int:
    from agent.cli.proposals import proposal_dict, render_proposals
    from agent.engine.proposals import ProposalPlanner
    from agent.state.proposals import ProposalRecords

    if args.plan:
        planner = ProposalPlanner(_host(args))
        try:
            ref = args.ref
            if ref and not ref.startswith("refs/"):
                ref = f"refs/{ref}"
            polled = planner.poll(only=ref)
            rows = polled.planned
        finally:
            planner.close()
    else:
        store, _ = _open_store(args)
        rows = ProposalRecords(store).all(closed=args.all)
    if args.json:
        _print_json([proposal_dict(row) for row in rows])
    else:
        print(render_proposals(rows) if rows or not args.plan else "no new proposal head")
    return EXIT_OK


def cmd_store(args: argparse.Namespace) -> int:
    from agent.state.storefile import check_store, restore_backup

    host = _host(args)
    if host.store is not None:
        # The file checks and the backup are the SQLite store's; a database has its own.
        raise AgentError(
            f"{host.store.where}: the run store is a PostgreSQL database:"
            f" `agent store {args.store_command}` is for the SQLite store only",
            hint="check it with `agent status` (it opens the store read-only);"
            " back it up and restore it with pg_dump and pg_restore",
        )
    if args.store_command == "check":
        live, backup, created = check_store(host.state_dir)
        if args.json:
            _print_json({"store": asdict(live), "backup": asdict(backup), "created": created})
        else:
            print(_render_store_report("run store", live))
            if created:
                print(f"  created: {created}")
            print(_render_store_report("backup", backup))
            if live.state in ("damaged", "missing", "empty"):
                what = "`agent store restore`" if backup.state == "ok" else "see docs/recovery.md"
                print(f"the run store is {live.state}: {what}", file=sys.stderr)
        return EXIT_OK if live.state in ("ok", "new") else EXIT_CONFIG

    from agent.state.passlock import PassLock

    if _daemon(host) is not None:
        raise PassBusyError(
            f"the agent service of {host.state_dir} is running: it has the run store open",
            hint="stop it first (`systemctl stop gitops-agent`), restore, then start it again",
        )
    lock = PassLock(host.state_dir)
    lock.acquire(wait=False)  # PassBusyError (exit 4) while a pass runs
    with lock:
        restored, kept = restore_backup(host.state_dir)
    if args.json:
        _print_json({"restored": asdict(restored), "replaced_kept_as": kept and str(kept)})
        return EXIT_OK
    print(f"restored {host.state_dir / 'agent.db'} from the backup taken {restored.written_at}")
    print(_render_store_report("backup", restored))
    if kept:
        print(f"the store it replaced was kept as {kept}")
    print("anything recorded after the backup (runs, suspensions since then) is not in it")
    return EXIT_OK


def _render_store_report(title: str, report: StoreReport) -> str:
    lines = [f"{title}: {report.path}: {report.state}"]
    if report.written_at:
        lines.append(f"  written: {report.written_at}")
    if report.schema is not None:
        lines.append(f"  schema: {report.schema}")
    if report.runs is not None:
        last = f" (last {report.last_run}, {report.last_run_at})" if report.last_run else ""
        lines.append(f"  runs: {report.runs}{last}")
    if report.state == "ok" or report.suspended:
        lines.append(f"  suspended units: {', '.join(report.suspended) or 'none'}")
    lines.extend(f"  problem: {problem}" for problem in report.problems[:20])
    return "\n".join(lines)


def cmd_validate(args: argparse.Namespace) -> int:
    from agent.engine.validate import validate_repo

    report = validate_repo(Path(args.repo_dir), config_path=args.config)
    if args.json:
        _print_json(report.as_dict())
    else:
        print(report.render())
    return EXIT_OK if report.ok else EXIT_FAILED


def cmd_version(args: argparse.Namespace) -> int:
    from agent.config.host import DEFAULT_HOST_CONFIG_PATH
    from providers.errors import ProviderError
    from providers.terraform import find_terraform

    info: dict[str, Any] = {"agent": __version__, "python": sys.version.split()[0]}
    # The Terraform a pass would run: the host config's terraform.binary when there is a
    # host config (a missing default one is fine: version works before the set-up).
    path = resolve_host_config_path(args.config, os.environ)
    configured = None
    if args.config or os.environ.get("GITOPS_AGENT_CONFIG") or DEFAULT_HOST_CONFIG_PATH.exists():
        configured = load_host_config(path).terraform.binary
        info["host_config"] = str(path)
    try:
        binary = find_terraform(configured)
        info["terraform"] = {
            "kind": binary.kind,
            "version": binary.version,
            "path": binary.argv[0] if binary.kind != "embedded" else None,
            "origin": binary.origin,
        }
        tf_text = binary.describe()
    except ProviderError as exc:
        info["terraform"] = {"error": str(exc)}
        tf_text = f"none: {exc}"
    if args.json:
        _print_json(info)
    else:
        print(f"gitops-agent {info['agent']}\npython {info['python']}\nterraform: {tf_text}")
    return EXIT_OK


def cmd_completion(args: argparse.Namespace) -> int:
    import shtab

    print(shtab.complete(build_parser(), shell=args.shell))
    return EXIT_OK


def cmd_quickstart(args: argparse.Namespace) -> int:
    from agent.cli.quickstart import run_quickstart

    return run_quickstart(Path(args.dir) if args.dir else None)


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run,
    "reconcile": cmd_reconcile,
    "approve": cmd_approve,
    "suspend": cmd_suspend,
    "resume": cmd_resume,
    "status": cmd_status,
    "logs": cmd_logs,
    "history": cmd_history,
    "cluster": cmd_cluster,
    "drain": cmd_drain,
    "proposals": cmd_proposals,
    "validate": cmd_validate,
    "version": cmd_version,
    "quickstart": cmd_quickstart,
    "service": cmd_service,
    "store": cmd_store,
    "completion": cmd_completion,
}


if __name__ == "__main__":
    sys.exit(main())
