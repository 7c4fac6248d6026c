"""The README's tour, run as a reader runs it: every `$ ` command of the block marked
`<!-- run: tour -->`, in one bash session on a terminal (a pseudo-terminal, so progress
shows as it does for a person), against a quickstart in a temp directory. Each command
must succeed, and the output the README quotes under a command must be what it printed.

How quoted output is compared: durations (`(1.9s)`, `0.49 s`, `17s ago`), run ids,
12-digit revisions (and sha256 prefixes) and the Terraform engine the quickstart names are
wildcards, `/tmp/qs` is the temp directory.
Without a `...` line the quoted lines are exactly the command's output (in any order: units
run in parallel); with one, the quoted lines are among those printed. No mocks: the real
`agent`, Git and the embedded Terraform.
"""

from __future__ import annotations

import collections
import os
import re
import select
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.docblocks import Block, block

TOUR_DIR = "/tmp/qs"
DEADLINE_S = 600.0
_VOLATILE = [
    (re.compile(r"\(\d+\.\ds\)"), "(N.Ns)"),
    (re.compile(r"\br-\d{8}T\d{6}-[0-9a-f]{4}\b"), "r-RUN"),
    (re.compile(r"\b[0-9a-f]{12}\b"), "REVISION"),
    (re.compile(r"\b\d+(\.\d+)? s\b"), "N s"),  # a host's time in a report
    (re.compile(r"\b\d+[smhd] ago\b"), "N ago"),
    # The engine the quickstart ran: the embedded one, or a terraform/tofu found on PATH.
    (re.compile(r"with (Terraform|OpenTofu) \S+ \([^)]*\), offline"), "with ENGINE, offline"),
]


@dataclass
class Step:
    command: str
    line: int  # in the README
    quoted: list[str] = field(default_factory=list)


def steps(tour: Block) -> list[Step]:
    """The commands of the tour and the output lines quoted under each."""
    found: list[Step] = []
    for offset, line in enumerate(tour.text.splitlines(), start=1):
        if line.startswith("$ "):
            found.append(Step(line[2:], tour.line + offset))
        elif found and line.strip():
            found[-1].quoted.append(line)
    return found


_UNIT_LIST = re.compile(r"\b[a-z0-9_-]+:[a-z]+(?:, [a-z0-9_-]+:[a-z]+)+")  # history's UNITS


def normalize(line: str, tmp: Path) -> str:
    line = line.replace(str(tmp), TOUR_DIR).rstrip()
    for pattern, replacement in _VOLATILE:
        line = pattern.sub(replacement, line)
    # Units finish in any order (they run in parallel): compare the list, not its order.
    return _UNIT_LIST.sub(lambda m: ", ".join(sorted(m.group(0).split(", "))), line)


def run_on_a_terminal(script: Path, env: dict[str, str], cwd: Path) -> str:
    """Run `bash script` with a pseudo-terminal as stdout and stderr; what it printed."""
    master, slave = os.openpty()
    proc = subprocess.Popen(
        ["bash", str(script)], stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
        env=env, cwd=cwd, start_new_session=True,
    )  # fmt: skip
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + DEADLINE_S
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        else:
            raise AssertionError(f"the tour did not finish within {DEADLINE_S:.0f}s")
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()  # by PID: only the shell this test started
            proc.wait(10)
        os.close(master)
    return b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")


def test_the_readme_tour_runs_and_prints_what_it_quotes(tmp_path: Path) -> None:
    tour = block("run", "tour")
    planned = steps(tour)
    assert planned and planned[0].command.startswith("agent quickstart ")
    qs = tmp_path / "qs"
    lines = []
    for index, step in enumerate(planned):
        command = step.command.replace(TOUR_DIR, str(qs))
        lines += [
            f"printf '\\n@@start {index}\\n'",
            command,
            f"printf '\\n@@end {index} %s\\n' \"$?\"",
        ]
    script = tmp_path / "tour.sh"
    script.write_text("\n".join(lines) + "\n")
    bin_dir = str(Path(sys.executable).parent)  # where the package put `agent`
    env = {k: v for k, v in os.environ.items() if k != "GITOPS_AGENT_CONFIG"}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    output = run_on_a_terminal(script, env, tmp_path)

    problems = []
    for index, step in enumerate(planned):
        match = re.search(rf"@@start {index}\n(.*?)\n@@end {index} (\d+)\n", output, re.S)
        where = f"{tour.path.name}:{step.line}: $ {step.command}"
        if match is None:
            problems.append(f"{where}: did not run\n{output[-3000:]}")
            break
        printed, code = match.group(1), int(match.group(2))
        if code != 0:
            problems.append(f"{where}: exited {code}:\n{printed}")
            continue
        if not step.quoted:
            continue
        got = [normalize(line, qs) for line in printed.splitlines() if line.strip()]
        want = [normalize(line, qs) for line in step.quoted if line.strip() != "..."]
        if "..." in (line.strip() for line in step.quoted):
            missing = collections.Counter(want) - collections.Counter(got)
            if missing:
                problems.append(f"{where}: not printed: {sorted(missing)}\nprinted:\n{printed}")
        elif sorted(got) != sorted(want):
            problems.append(
                f"{where}: the README quotes\n  " + "\n  ".join(want)
                + "\nthe product printed\n  " + "\n  ".join(got)
            )  # fmt: skip
    assert not problems, "\n\n".join(problems) + f"\n\n(script: {shlex.quote(str(script))})"

    # The modes docs/architecture.md gives for the state directory.
    state = qs / "state"
    private = [
        state,
        *(state / d for d in ("checkout", "runs", "units", "terraform", "plugin-cache")),
    ]
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in private} == {
        p.name: "0o700" for p in private
    }, "docs/architecture.md: the state directory and the ones under it are 0700"
    logs = [*state.glob("runs/*/*/*.txt"), *state.glob("runs/*/*/plan.json")]
    files = [state / "agent.db", state / "pass.lock", *logs]
    assert len(logs) > 10 and {oct(p.stat().st_mode & 0o777) for p in files} == {"0o600"}

    # The Terraform CLI config the passes wrote is the one docs/terraform.md shows (with
    # the quickstart's state directory for /var/lib/gitops-agent).
    documented = block("output", "cli-config")
    written = (qs / "state" / "terraform" / "cli.tfrc").read_text()
    expected = documented.text.replace("/var/lib/gitops-agent", str(qs / "state"))
    assert written == expected, f"{documented.where} shows another CLI config:\n{written}"
