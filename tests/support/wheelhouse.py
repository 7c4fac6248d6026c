"""Wheels to install the agent into a test host the way an operator does (`pip install`).

A booted test host has no network of its own to PyPI set up and no pip (Debian's python3
without python3-venv), so the tests bring both: the project's dependencies as wheels, built
once per dependency list and cached outside the repo (`/var/cache/gitops-agent-tests/
wheelhouse/<key>/`, or `$GITOPS_TEST_WHEELHOUSE`), pip's own wheel (runnable as
`python pip.whl/pip`), and the project itself, built fresh from the work tree for every test
session. The key hashes the dependency list and the Python version: a change rebuilds it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = Path("/var/cache/gitops-agent-tests/wheelhouse")
ENV_CACHE = "GITOPS_TEST_WHEELHOUSE"
BUILD_TIMEOUT = 900.0  # seconds; downloads from PyPI (or pip's cache) on the first build


class WheelhouseError(RuntimeError):
    """The wheels could not be built; the message has pip's output."""


def _dependencies() -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return list(project["dependencies"])


def _pip(*args: str, timeout: float = BUILD_TIMEOUT) -> None:
    argv = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise WheelhouseError(
            f"`{' '.join(argv)}` exited {proc.returncode}:\n{proc.stderr[-3000:]}"
        )


def dependency_wheels() -> Path:
    """The cached directory of dependency wheels (and pip's), built if missing."""
    deps = _dependencies()
    key_source = json.dumps([deps, list(sys.version_info[:2])]).encode()
    key = hashlib.sha256(key_source).hexdigest()[:16]
    cache = Path(os.environ.get(ENV_CACHE) or DEFAULT_CACHE)
    target = cache / key
    if (target / ".complete").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session may be building the same key
        if (target / ".complete").is_file():
            return target
        building = cache / f".{key}.building"
        shutil.rmtree(building, ignore_errors=True)
        _pip("wheel", "--quiet", "--wheel-dir", str(building), *deps)
        _pip("download", "--quiet", "--no-deps", "--dest", str(building), "pip")
        (building / ".complete").write_text(json.dumps(deps) + "\n")
        shutil.rmtree(target, ignore_errors=True)
        building.rename(target)
    return target


def project_wheel(dest: Path) -> Path:
    """A wheel of the work tree as it is now, in `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    _pip("wheel", "--quiet", "--no-deps", "--wheel-dir", str(dest), str(REPO), timeout=300.0)
    wheels = sorted(dest.glob("gitops_agent-*.whl"))
    if not wheels:
        raise WheelhouseError(f"pip built no gitops_agent wheel in {dest}")
    return wheels[-1]


def pip_wheel(wheels: Path) -> Path:
    """pip's own wheel in `wheels` (run as `python PATH/pip install ...`)."""
    found = sorted(wheels.glob("pip-*.whl"))
    if not found:
        raise WheelhouseError(f"no pip wheel in {wheels}")
    return found[-1]
