"""The directory Terraform runs in for a stack: a shadow of the stack outside the checkout.

Terraform keeps a stack's local state where it runs (`terraform.tfstate`), and the agent
keeps it in its state directory instead (`units/<unit>/terraform.tfstate`). The `-state`
flag that did so is deprecated (every plan and apply began with `Warning: Deprecated flag:
-state`); its replacement is the `path` of a `local` backend, which only a file of the root
module can set (`-backend-config` is ignored when the stack declares no backend, measured
with Terraform 1.15), and the checkout's files are the repository's. So Terraform runs in
a shadow of the stack in the unit's own directory:

    units/<unit>/workdir/              symlinks to the checkout's top-level entries...
      stacks/                          ...a real directory on the way to the stack...
        app/                           ...the stack's place: a symlink per entry, plus
          zz_gitops_agent_state_override.tf    terraform { backend "local" { path = ... } }
          zz_gitops_agent_sensitive_override.tf  variable "x" { sensitive = true }

Relative module sources (`../../modules/x`) and `path.module` files resolve as in the
checkout (`..` of a real directory is its real parent). The state override is only written
for a stack that declares no backend, or a `local` one without a `path`: a stack with its own
backend keeps it. The sensitive override marks the variables the agent feeds from another
stack's sensitive outputs `sensitive = true` (an override file may change a declared
variable's attributes), so that Terraform prints `(sensitive value)` where they are used
instead of the value, as it does in the stack that produced them. The same state file as
before, so no state moves. Init writes the lock file here when the repository has none,
never into the checkout.

The shadow is synced (not rebuilt) before each command sequence: missing or stale symlinks
are replaced atomically, entries gone from the checkout removed, so two syncs at once (two
units reading one stack's outputs) end in the same tree.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from pathlib import Path

from providers.atomic import atomic_write
from providers.errors import TerraformCommandError

OVERRIDE_FILE = "zz_gitops_agent_state_override.tf"
SENSITIVE_FILE = "zz_gitops_agent_sensitive_override.tf"
RESERVED = (OVERRIDE_FILE, SENSITIVE_FILE)
_SKIP = (".git",)  # never needed by Terraform
_BACKEND = re.compile(r'^\s*backend\s+"([^"]+)"\s*\{', re.MULTILINE)
_CLOUD = re.compile(r"^\s*cloud\s*\{", re.MULTILINE)
_PATH = re.compile(r"^\s*path\s*=", re.MULTILINE)


def shadow_dir(root: Path, stack_dir: Path, work_dir: Path) -> Path:
    """Where Terraform runs for `stack_dir` (a directory inside `root`)."""
    return work_dir / stack_dir.relative_to(root)


def sync_shadow(
    root: Path,
    stack_dir: Path,
    work_dir: Path,
    state_file: Path,
    backend_block: str | None = None,
    sensitive: frozenset[str] | None = None,
) -> Path:
    """Lay out (or bring up to date) the shadow of `stack_dir` under `work_dir`; return the
    directory to run Terraform in. The state goes to `state_file`, or to the remote backend
    of `backend_block` (backend.py) when one is given. `sensitive`: the variables to mark
    sensitive (None leaves the mark file as it is: reading outputs or applying a saved
    plan). Raises TerraformCommandError if the stack holds a file of one of the agent's
    reserved names."""
    for reserved in RESERVED:
        if (stack_dir / reserved).exists():
            raise TerraformCommandError(
                f"{stack_dir.relative_to(root) / reserved}: the agent reserves this file name"
                " for the settings it adds to the stack; rename the file"
            )
    work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    source, shadow = root, work_dir
    for part in stack_dir.relative_to(root).parts:
        _sync_links(source, shadow, keep=part)
        source, shadow = source / part, shadow / part
        if shadow.is_symlink():  # it was a sibling's link before the stack moved here
            shadow.unlink()
        shadow.mkdir(exist_ok=True, mode=0o700)
    _sync_links(source, shadow, keep=RESERVED)
    _write_or_remove(
        shadow / OVERRIDE_FILE,
        (backend_block or _override_text(state_file)) if keeps_agent_state(stack_dir) else None,
    )
    if sensitive is not None:
        _write_or_remove(shadow / SENSITIVE_FILE, _sensitive_text(sensitive))
    return shadow


def _write_or_remove(path: Path, text: str | None) -> None:
    """`path` holds `text` afterwards (unchanged files are not rewritten), or is gone."""
    if text is None:
        path.unlink(missing_ok=True)
        return
    with contextlib.suppress(FileNotFoundError):
        if path.read_text() == text:
            return
    atomic_write(path, text)


def _sensitive_text(names: frozenset[str]) -> str | None:
    if not names:
        return None
    blocks = "".join(f'variable "{name}" {{\n  sensitive = true\n}}\n' for name in sorted(names))
    return (
        "# Written by gitops-agent: these variables carry sensitive outputs of other stacks.\n"
        + blocks
    )


def _override_text(state_file: Path) -> str:
    return (
        "# Written by gitops-agent: this unit's state file, outside the checkout.\n"
        f'terraform {{\n  backend "local" {{\n    path = {json.dumps(str(state_file))}\n  }}\n}}\n'
    )


def _sync_links(source: Path, shadow: Path, *, keep: str | tuple[str, ...]) -> None:
    """Make `shadow` hold a symlink to each entry of `source` (but `keep`, real entries)."""
    kept = (keep,) if isinstance(keep, str) else keep
    wanted = {
        entry.name: entry.path
        for entry in os.scandir(source)
        if entry.name not in kept and entry.name not in _SKIP
    }
    for name, target in wanted.items():
        link = shadow / name
        with contextlib.suppress(OSError):
            if os.readlink(link) == target:
                continue
        if link.is_dir() and not link.is_symlink():
            continue  # a real directory of ours (never replaced by a link)
        temporary = shadow / f".{name}.{os.getpid()}.{threading.get_ident()}.link"
        temporary.unlink(missing_ok=True)
        os.symlink(target, temporary)
        os.replace(temporary, link)  # atomic: a running Terraform sees the old or the new
    for entry in os.scandir(shadow):
        # Only links are removed: a file Terraform wrote here (the lock file of a stack
        # whose repository has none) stays.
        if entry.name not in wanted and entry.name not in kept and entry.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)


def keeps_agent_state(stack_dir: Path) -> bool:
    """True when the stack declares no backend (or a `local` one without `path`): its
    state is the agent's to place. A file that cannot be followed counts as declaring a
    backend: better a state in the shadow than a remote backend overridden by a local one."""
    from providers.terraform.runner import hcl_top_level_blocks  # the runner imports us

    for path in sorted(stack_dir.glob("*.tf")):
        try:
            blocks = hcl_top_level_blocks(path.read_text(errors="replace"))
        except OSError:
            return False
        if blocks is None:
            return False
        for block_type, _labels, body in blocks:
            if block_type != "terraform":
                continue
            if _CLOUD.search(body):
                return False
            for backend in _BACKEND.finditer(body):
                if backend.group(1) != "local" or _PATH.search(body, backend.end()):
                    return False
    for path in sorted(stack_dir.glob("*.tf.json")):
        try:
            document = json.loads(path.read_text(errors="replace"))
        except (OSError, ValueError):
            return False
        settings = document.get("terraform") if isinstance(document, dict) else None
        for block in settings if isinstance(settings, list) else [settings or {}]:
            if not isinstance(block, dict) or "cloud" in block:
                return False
            backend = block.get("backend") or {}
            if not isinstance(backend, dict) or any(
                kind != "local" or (isinstance(config, dict) and "path" in config)
                for kind, config in backend.items()
            ):
                return False
    return True


def state_outputs(state_file: Path) -> dict[str, tuple[object, bool]] | None:
    """The root outputs in a local state file, as `terraform output -json` gives them:
    {name: (value, sensitive)}; {} when there is no state yet; None when the file is not
    a version-4 state this can read (then ask Terraform). Read without starting Terraform:
    a dependent unit reads its upstream's outputs once the upstream has finished."""
    try:
        document = json.loads(state_file.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return None
    if not isinstance(document, dict) or document.get("version") != 4:
        return None
    outputs = document.get("outputs") or {}
    if not isinstance(outputs, dict):
        return None
    found: dict[str, tuple[object, bool]] = {}
    for name, entry in outputs.items():
        if not isinstance(entry, dict) or "value" not in entry:
            return None
        found[str(name)] = (entry["value"], bool(entry.get("sensitive")))
    return found
