"""The Terraform CLI configuration file the agent writes and points TF_CLI_CONFIG_FILE at.

The agent always sets TF_CLI_CONFIG_FILE itself: an operator's ~/.terraformrc (or a machine
that presets TF_CLI_CONFIG_FILE to a file that does not exist) must not change what the agent
does. The file holds the shared plugin cache and the provider installation: the providers
that ship with the agent come from a filesystem mirror the agent builds
(`install_builtin_providers`), every other provider from its registry. A mirror (rather than
`dev_overrides`) works with every Terraform and OpenTofu version: before 1.15, `init` tried
to download dev-overridden providers.
`dev_overrides` stay available for provider development.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sysconfig
from collections.abc import Mapping, Sequence
from pathlib import Path

from providers.atomic import atomic_write
from providers.tfprovider import PROVIDER_ADDRESS, PROVIDER_EXECUTABLE, PROVIDER_VERSION


def render_cli_config(
    *,
    plugin_cache_dir: Path,
    dev_overrides: Mapping[str, Path] | None = None,
    mirror_dir: Path | None = None,
    mirrored: Sequence[str] = (),
) -> str:
    """The text of the CLI config (HCL); strings are JSON-quoted, which HCL accepts."""
    lines = [
        "# Written by gitops-agent; rewritten at every start. Do not edit.",
        f"plugin_cache_dir = {_quote(plugin_cache_dir)}",
        "",
        "provider_installation {",
    ]
    if dev_overrides:
        lines.append("  dev_overrides {")
        for address in sorted(dev_overrides):
            lines.append(f"    {_quote(address)} = {_quote(dev_overrides[address])}")
        lines.append("  }")
    patterns = ", ".join(_quote(a) for a in sorted(mirrored))
    if mirror_dir is not None and mirrored:
        lines += [
            "  filesystem_mirror {",
            f"    path    = {_quote(mirror_dir)}",
            f"    include = [{patterns}]",
            "  }",
            "  direct {",
            f"    exclude = [{patterns}]",
            "  }",
        ]
    else:
        lines.append("  direct {}")
    lines += ["}", ""]
    return "\n".join(lines)


def write_cli_config(
    path: Path,
    *,
    plugin_cache_dir: Path,
    dev_overrides: Mapping[str, Path] | None = None,
    mirror_dir: Path | None = None,
    mirrored: Sequence[str] = (),
) -> Path:
    """Write the CLI config atomically (temp file + rename) and return its path."""
    text = render_cli_config(
        plugin_cache_dir=plugin_cache_dir,
        dev_overrides=dev_overrides,
        mirror_dir=mirror_dir,
        mirrored=mirrored,
    )
    return atomic_write(path, text, mode=0o600)  # the state dir is private, all of it


def install_builtin_providers(mirror_dir: Path) -> list[str]:
    """Put the providers shipped with the agent into a filesystem mirror at `mirror_dir`.

    Returns their source addresses (for `render_cli_config(mirrored=...)`); empty if the
    provider executable is not installed. Rebuilt only when the executable changed.
    """
    executable = provider_executable()
    if executable is None:
        return []
    host, namespace, name = PROVIDER_ADDRESS.split("/")
    stamp = mirror_dir / PROVIDER_ADDRESS / f".{PROVIDER_VERSION}.source"
    source = f"{executable}\n{hashlib.sha256(executable.read_bytes()).hexdigest()}\n"
    if not (stamp.exists() and stamp.read_text() == source):
        from tf.runner import install_provider  # a heavy import (grpc): only when needed

        install_provider(host, namespace, name, PROVIDER_VERSION, mirror_dir, executable)
        stamp.write_text(source)
    return [PROVIDER_ADDRESS]


def builtin_dev_overrides() -> dict[str, Path]:
    """Source address -> directory of the executable, for the providers shipped with the agent.

    Terraform runs `DIR/terraform-provider-localfile`: the console script pip installed next to
    the interpreter (or, failing that, the first one on PATH). Empty if it is not installed.
    """
    found = provider_executable()
    return {PROVIDER_ADDRESS: found.parent} if found else {}


def provider_executable() -> Path | None:
    candidate = Path(sysconfig.get_path("scripts")) / PROVIDER_EXECUTABLE
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    on_path = shutil.which(PROVIDER_EXECUTABLE)
    return Path(on_path).absolute() if on_path else None


def _quote(value: object) -> str:
    return json.dumps(str(value))
