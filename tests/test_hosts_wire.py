"""The round trip's bootstrap: a host whose Python is the agent's runs the code compiled on
the bastion (no compile on the host); any other Python compiles the source it was sent.

The bootstrap runs in real interpreters (`python3 -I -S -c BOOTSTRAP`), fed real stdin.
"""

from __future__ import annotations

import glob
import json
import subprocess
import sys
from pathlib import Path

import pytest

from providers.hosts import wire

PY37 = sorted(glob.glob("/root/.pyenv/versions/3.7.*/bin/python3"))
# Stands in for the program's source: it can only fail, so an answer proves the code ran.
BROKEN = b"raise SystemExit('the source was compiled')\n"


def parts() -> tuple[bytes, bytes, bytes]:
    """The payload's (magic, source, code)."""
    header, rest = wire.payload().split(b"\n", 1)
    length, code_length, magic = header.split()
    source, code = rest[: int(length)], rest[int(length) :]
    assert len(code) == int(code_length)
    return magic, source, code


def facts_of(path: Path) -> bytes:
    query = {"kind": "file", "path": str(path), "state": "present"}
    return json.dumps({"mode": "facts", "resources": [query], "timeout": 30}).encode()


def run(python: str, stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        wire.command(python), input=stdin, capture_output=True, timeout=60, check=False
    )


def test_the_agents_python_runs_the_code_compiled_on_the_bastion(tmp_path: Path) -> None:
    magic, _, code = parts()
    stdin = b"%d %d %s\n" % (len(BROKEN), len(code), magic) + BROKEN + code + facts_of(tmp_path)
    done = run(sys.executable, stdin)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["facts"][0]["type"] == "dir"


def test_another_bytecode_magic_compiles_the_source(tmp_path: Path) -> None:
    _, source, code = parts()
    stdin = b"%d %d 00000000\n" % (len(BROKEN), len(code)) + BROKEN + code + facts_of(tmp_path)
    done = run(sys.executable, stdin)
    assert b"the source was compiled" in done.stderr
    stdin = b"%d %d 00000000\n" % (len(source), len(code)) + source + code + facts_of(tmp_path)
    done = run(sys.executable, stdin)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["facts"][0]["type"] == "dir"


@pytest.mark.skipif(not PY37, reason="no Python 3.7 interpreter on this machine")
def test_an_older_python_on_the_host_compiles_the_source_it_was_sent(tmp_path: Path) -> None:
    done = run(PY37[-1], wire.payload() + facts_of(tmp_path))
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["python"].startswith("3.7.")
    assert answer["facts"][0]["type"] == "dir"


def test_a_facts_round_trip_over_files_imports_no_process_or_encoding_module(
    tmp_path: Path,
) -> None:
    # What the program needs is imported where it is used: reading file facts must not
    # pay for subprocess, shutil or base64 (their import costs more than the work).
    probe = wire.payload() + facts_of(tmp_path / "absent")
    script = (
        "import sys;"
        f"exec(compile({wire.BOOTSTRAP!r}, 'bootstrap', 'exec'));"
        "print(sorted(m for m in ('subprocess', 'shutil', 'base64') if m in sys.modules),"
        " file=sys.stderr)"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", script],
        input=probe,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.decode().strip().splitlines()[-1] == "[]"
