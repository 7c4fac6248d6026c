"""package: apt/dpkg on Debian and Ubuntu, dnf (or yum) with rpm on RHEL-likes.

The host reports, from one dpkg-query or rpm call for all packages, which are installed
at which version. Installs of consecutive package resources go out as one apt-get/dnf
call; the host falls back to one call per package when it fails, so that the error is
recorded against the package that caused it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from providers.errors import ResourceConflictError
from providers.hosts.common import SAFE_NAME
from providers.hosts.model import Change, Resource

Facts = Mapping[str, Any]
Op = dict[str, Any]

LOCK_WAIT = ["-o", "DPkg::Lock::Timeout=120"]  # wait for a running apt instead of failing
APT_INSTALL = [
    "apt-get",
    "install",
    "-y",
    "--no-install-recommends",
    "--allow-downgrades",  # a pinned version below the installed one is still the desired one
    "-o",
    "Dpkg::Options::=--force-confdef",
    "-o",
    "Dpkg::Options::=--force-confold",  # keep locally changed conffiles: files own those
    *LOCK_WAIT,
]
APT_ENV = {"DEBIAN_FRONTEND": "noninteractive"}
APT_REFRESH = ["apt-get", "update", *LOCK_WAIT]


def _version(resource: Resource) -> str | None:
    version = resource.attrs.get("version")
    return None if version is None else str(version)


def _absent(resource: Resource) -> bool:
    return resource.attrs.get("state") == "absent"


def version_matches(installed: str | None, desired: str) -> bool:
    """'1:1.2-3' (with an epoch) matches a pin of '1.2-3' as well as '1:1.2-3'."""
    if installed is None:
        return False
    return installed == desired or installed.split(":", 1)[-1] == desired


def query(resource: Resource) -> dict[str, Any]:
    """Packages are gathered together on the host; each asks for its name only."""
    return {"kind": "package", "name": resource.name}


def diff(resource: Resource, facts: Facts) -> list[Change]:
    """Install, change the version of, or remove the package."""
    name, version = resource.name, _version(resource)
    if not SAFE_NAME.fullmatch(name) or (version is not None and not SAFE_NAME.fullmatch(version)):
        raise ResourceConflictError(f"{name!r} (version {version!r}) is not a package name")
    if not facts.get("manager"):
        raise ResourceConflictError(
            "no supported package manager on the host (apt with dpkg, or dnf/yum with rpm)"
        )
    installed, current = bool(facts.get("installed")), facts.get("version")
    if _absent(resource):
        if installed:
            return [Change("state", current, None, f"remove {current}")]
        if resource.attrs.get("purge") and facts.get("config_files"):
            # Removed earlier without purge: its configuration files are still there.
            return [Change("state", "config-files", None, "purge configuration files")]
        return []
    if not installed:
        text = f"install {version}" if version else "install"
        return [Change("state", None, version or "latest", text)]
    if version is not None and not version_matches(current, version):
        return [Change("version", current, version, f"version {current} -> {version}")]
    return []


def operation(resource: Resource, facts: Facts, changes: list[Change]) -> Op:
    """One package-manager call; the planner merges neighbours with the same command."""
    manager, name, version = facts.get("manager"), resource.name, _version(resource)
    if manager == "apt":
        if _absent(resource):
            verb = "purge" if resource.attrs.get("purge") else "remove"
            return {
                "packages": True,
                "argv": ["apt-get", verb, "-y", *LOCK_WAIT],
                "env": APT_ENV,
                "refresh": None,
                "spec": name,
            }
        spec = f"{name}={version}" if version else name
        return {
            "packages": True,
            "argv": APT_INSTALL,
            "env": APT_ENV,
            "refresh": APT_REFRESH,
            "spec": spec,
        }
    verb = "remove" if _absent(resource) else "install"
    spec = f"{name}-{version}" if version and not _absent(resource) else name
    return {
        "packages": True,
        "argv": [manager, verb, "-y"],
        "env": {},
        "refresh": None,
        "spec": spec,
    }
