"""One round trip: the remote program and a JSON spec in on stdin, one JSON answer out.

The command line is always the same small bootstrap (`python3 -I -S -c ...`); the
program (remote.py) and the spec, which may hold secrets (command environments, file
contents), travel on stdin only, so they never show in `ps` or a shell history.
"""

from __future__ import annotations

import functools
import json
import logging
import marshal
import time
from importlib.util import MAGIC_NUMBER
from pathlib import Path
from typing import Any

from providers.errors import HostEngineError
from providers.text import plural
from providers.transport.base import Transport

log = logging.getLogger(__name__)

# stdin: b"<source length> <code length> <magic>\n" + source + code + JSON spec, where code
# is the source compiled on the bastion (marshal). A host whose Python has the same bytecode
# magic runs it and skips compiling (10-40 ms of CPU a round trip); any other compiles the
# source. A Python < 3.7 says so and stops.
# One line, double quotes only: it passes any login shell's quoting unchanged.
BOOTSTRAP = (
    "import sys, marshal;"
    "sys.version_info < (3, 7) and sys.exit("
    '"gitops-agent needs Python >= 3.7 on the target, found " + sys.version.split()[0]);'
    "d = sys.stdin.buffer.read();"
    'n = d.index(b"\\n");'
    "h = d[:n].split();"
    "k = int(h[0]);"
    "m = int(h[1]) if len(h) == 3 else 0;"
    "e = n + 1 + k;"
    'x = getattr(sys.modules.get("_frozen_importlib_external"), "MAGIC_NUMBER", b"");'
    'g = {"__name__": "gitops_remote"};'
    "exec(marshal.loads(d[e:e + m]) if m and x and x.hex().encode() == h[2]"
    ' else compile(d[n + 1:e], "gitops-remote", "exec"), g);'
    'g["main"](d[e + m:])'
)
STDERR_TAIL = 1000  # characters of the host's stderr kept in an error message
REMOTE_MARGIN = 0.9  # the host's own deadline, as a share of the round trip's timeout


@functools.cache
def program() -> bytes:
    """The remote program's source, sent on every round trip (about 35 KB)."""
    return Path(__file__).with_name("remote.py").read_bytes()


@functools.cache
def payload() -> bytes:
    """What precedes the spec on stdin: the header, the source, and its code compiled once
    here (the agent's own Python; a host with another bytecode magic ignores it)."""
    source = program()
    code = marshal.dumps(compile(source, "gitops-remote", "exec"))
    return b"%d %d %s\n" % (len(source), len(code), MAGIC_NUMBER.hex().encode()) + source + code


def command(python: str) -> list[str]:
    """The argv of every round trip: no secret, no per-host data."""
    # -I: ignore PYTHON* variables and user site-packages; -S: skip site (faster start).
    return [python, "-I", "-S", "-c", BOOTSTRAP]


def call(
    transport: Transport,
    spec: dict[str, Any],
    *,
    become: bool,
    timeout: float,
    python: str = "python3",
) -> dict[str, Any]:
    """Run the remote program with `spec` on the host; return its JSON answer.

    Raises TransportError (from the transport) or HostEngineError (naming the host).
    """
    body = json.dumps({**spec, "timeout": timeout * REMOTE_MARGIN}).encode("utf-8")
    stdin = payload() + body
    started = time.monotonic()
    result = transport.run(command(python), stdin=stdin, timeout=timeout, become=become)
    log.debug(
        "%s: %s round trip, %s in, %d out, exit %d, %.3fs",
        transport.host,
        spec.get("mode"),
        plural(len(stdin), "byte"),
        len(result.stdout),
        result.exit_code,
        time.monotonic() - started,
    )
    stderr = result.stderr.decode("utf-8", "replace").strip()[-STDERR_TAIL:]
    if result.exit_code == 127:
        raise HostEngineError(
            f"{transport.host}: {python} was not found (the engine needs Python >= 3.7 on the"
            f" target): {stderr}"
        )
    if result.exit_code != 0:
        raise HostEngineError(
            f"{transport.host}: the engine's program exited {result.exit_code}: {stderr}"
        )
    try:
        answer = json.loads(result.stdout)
    except ValueError:
        raise HostEngineError(
            f"{transport.host}: the engine's program gave no readable answer: {stderr}"
        ) from None
    if not isinstance(answer, dict):
        raise HostEngineError(f"{transport.host}: the engine's program gave an unexpected answer")
    if "fatal" in answer:
        raise HostEngineError(f"{transport.host}: the engine's program failed: {answer['fatal']}")
    return answer
