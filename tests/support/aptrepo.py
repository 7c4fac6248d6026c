"""Real `.deb` packages and a flat local apt repository for test hosts, built offline.

    repo = build_test_repo(tmp_path / "repo")           # testpkg, testpkg-lib, testsvc
    with NspawnHost(apt_repo=repo) as host:             # bound read-only at /srv/localrepo
        host.run("apt-get install -y testpkg")          # no network: only the local repo

Packages are built with `dpkg-deb --build --root-owner-group` and indexed with
`dpkg-scanpackages --multiversion` (Debian's `dpkg-dev`). The repository is flat (`./`) and
unsigned, so hosts list it as `deb [trusted=yes] file:/srv/localrepo ./`; `configure_root`
also empties the Debian sources inside the host so nothing there reaches for the network.

A package that ships a systemd unit gets a postinst that only runs `systemctl daemon-reload`:
it enables and starts nothing, as the agent's service resource is what must do that. The one
exception, `testsvc-auto`, enables and starts its service on install, as most Debian packages do.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO_MOUNT = "/srv/localrepo"  # where hosts see the repository
SOURCES_LINE = f"deb [trusted=yes] file:{REPO_MOUNT} ./"
SOURCES_FILE = "etc/apt/sources.list.d/localrepo.list"  # relative to a host's root
MAINTAINER = "gitops-agent tests <tests@example.invalid>"
TIMEOUT = 60.0

# The postinst/postrm of a package with a unit: tell a running systemd about the file, no more.
_RELOAD_SCRIPT = """\
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
fi
exit 0
"""


class AptRepoError(RuntimeError):
    """A package or the repository index could not be built; the message names which."""


@dataclass(frozen=True)
class DebPackage:
    """What goes into one `.deb`.

    `files` maps absolute install paths to contents; a content starting with `#!` is installed
    0755, anything else 0644, unless `modes` says otherwise. Files under /etc become conffiles,
    as debhelper would make them. `service` is the text of a systemd unit installed as
    /lib/systemd/system/`service_name` (default `NAME.service`).
    """

    name: str
    version: str = "1.0"
    files: Mapping[str, str | bytes] = field(default_factory=dict)
    modes: Mapping[str, int] = field(default_factory=dict)
    depends: Sequence[str] = ()
    service: str | None = None
    service_name: str | None = None
    description: str = "a package built by the gitops-agent tests"
    # Maintainer scripts by name (`postinst`, `prerm`, ...), instead of the default ones.
    scripts: Mapping[str, str] = field(default_factory=dict)

    @property
    def unit_name(self) -> str:
        return self.service_name or f"{self.name}.service"

    @property
    def deb_name(self) -> str:
        return f"{self.name}_{self.version}_all.deb"


def _run(argv: list[str], what: str, **kwargs: object) -> subprocess.CompletedProcess[bytes]:
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=TIMEOUT, **kwargs)  # type: ignore[call-overload]
    except FileNotFoundError:
        raise AptRepoError(f"{argv[0]} is missing: apt-get install -y dpkg-dev") from None
    except subprocess.TimeoutExpired:
        raise AptRepoError(f"{what} took over {TIMEOUT:.0f} s") from None
    if proc.returncode != 0:
        raise AptRepoError(
            f"{what} failed (exit {proc.returncode}): {proc.stderr.decode(errors='replace')}"
        )
    return proc


def build_deb(package: DebPackage, out_dir: Path) -> Path:
    """Build `package` into `out_dir/NAME_VERSION_all.deb` and return its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, str | bytes] = dict(package.files)
    if package.service is not None:
        files[f"/lib/systemd/system/{package.unit_name}"] = package.service
    with tempfile.TemporaryDirectory(prefix="deb-") as tmp:
        tree = Path(tmp) / "tree"
        control_dir = tree / "DEBIAN"
        control_dir.mkdir(parents=True)
        for path, content in files.items():
            if not path.startswith("/"):
                raise AptRepoError(f"package {package.name}: file path {path!r} is not absolute")
            target = tree / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            data = content.encode() if isinstance(content, str) else content
            target.write_bytes(data)
            default_mode = 0o755 if data.startswith(b"#!") else 0o644
            target.chmod(package.modes.get(path, default_mode))
        control = [
            f"Package: {package.name}",
            f"Version: {package.version}",
            "Architecture: all",
            f"Maintainer: {MAINTAINER}",
            "Section: misc",
            "Priority: optional",
        ]
        if package.depends:
            control.append(f"Depends: {', '.join(package.depends)}")
        control.append(f"Description: {package.description}")
        (control_dir / "control").write_text("\n".join(control) + "\n")
        conffiles = sorted(p for p in files if p.startswith("/etc/"))
        if conffiles:
            (control_dir / "conffiles").write_text("\n".join(conffiles) + "\n")
        scripts = dict.fromkeys(("postinst", "postrm"), _RELOAD_SCRIPT) if package.service else {}
        scripts.update(package.scripts)
        for script, text in scripts.items():
            (control_dir / script).write_text(text)
            (control_dir / script).chmod(0o755)
        deb = out_dir / package.deb_name
        _run(
            ["dpkg-deb", "--root-owner-group", "--build", str(tree), str(deb)],
            f"dpkg-deb --build of {package.name} {package.version}",
        )
    return deb


def index_repo(repo_dir: Path) -> Path:
    """Write `repo_dir/Packages` for every `.deb` in it (all versions kept); returns its path."""
    proc = _run(
        ["dpkg-scanpackages", "--multiversion", "."],
        f"dpkg-scanpackages in {repo_dir}",
        cwd=repo_dir,
    )
    packages = repo_dir / "Packages"
    partial = repo_dir / ".Packages.tmp"
    partial.write_bytes(proc.stdout)
    os.replace(partial, packages)  # a host running apt-get update never reads half a file
    return packages


def write_repo(repo_dir: Path, packages: Iterable[DebPackage]) -> Path:
    """Build `packages` into `repo_dir` (added to what is there) and index it; returns it."""
    repo_dir.mkdir(parents=True, exist_ok=True)
    # apt reads file: repositories as its `_apt` user when it can: keep the tree readable.
    repo_dir.chmod(0o755)
    for package in packages:
        build_deb(package, repo_dir)
    index_repo(repo_dir)
    return repo_dir


# -- what the tests install -----------------------------------------------------------------

TESTSVC_UNIT = """\
[Unit]
Description=gitops-agent test service (a static HTTP server on 127.0.0.1, any free port)

[Service]
ExecStart=/usr/bin/python3 -m http.server 0 --bind 127.0.0.1 --directory /usr/share/testsvc

[Install]
WantedBy=multi-user.target
"""


def _testpkg(version: str) -> DebPackage:
    return DebPackage(
        name="testpkg",
        version=version,
        depends=("testpkg-lib",),
        files={
            "/usr/bin/testpkg": f"#!/bin/sh\necho testpkg {version}\n",
            "/etc/testpkg.conf": "# testpkg configuration\ncolour = blue\n",
        },
        description="test package that depends on testpkg-lib",
    )


# As Debian's deb-systemd-helper/invoke-rc.d do for most services: enabled and started on
# install (the agent's service resource must still hold `enabled: false, state: stopped`).
_AUTOSTART_POSTINST = """\
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable testsvc-auto.service
    systemctl start testsvc-auto.service
fi
exit 0
"""
_AUTOSTART_PRERM = """\
#!/bin/sh
if [ -d /run/systemd/system ]; then
    systemctl disable --now testsvc-auto.service >/dev/null 2>&1 || true
fi
exit 0
"""
TEST_PACKAGES: tuple[DebPackage, ...] = (
    DebPackage(
        name="testpkg-lib",
        files={"/usr/share/testpkg-lib/VERSION": "1.0\n"},
        description="test library that testpkg depends on",
    ),
    _testpkg("1.0"),
    _testpkg("1.1"),  # apt picks the newest; `testpkg=1.0` pins, an upgrade has somewhere to go
    DebPackage(
        name="testsvc",
        depends=("python3",),
        files={"/usr/share/testsvc/index.html": "testsvc\n"},
        service=TESTSVC_UNIT,
        description="test package shipping a systemd service (not enabled on install)",
    ),
    DebPackage(
        name="testsvc-auto",
        depends=("python3",),
        files={"/usr/share/testsvc/auto.html": "testsvc-auto\n"},
        service=TESTSVC_UNIT,
        scripts={"postinst": _AUTOSTART_POSTINST, "prerm": _AUTOSTART_PRERM},
        description="test package shipping a systemd service it enables and starts on install",
    ),
)


def build_test_repo(repo_dir: Path) -> Path:
    """The standard test repository (`TEST_PACKAGES`) in `repo_dir`; returns `repo_dir`."""
    return write_repo(repo_dir, TEST_PACKAGES)


# -- a host's view of it --------------------------------------------------------------------


def configure_root(root: Path, repo_dir: Path | None) -> None:
    """Point the apt of the host rooted at `root` at the local repository, and nowhere else.

    The Debian sources debootstrap wrote are emptied (the file is kept so apt does not warn),
    and the local repository, if any, is listed; `nspawn_bind_args` makes it visible.
    """
    (root / "etc/apt/sources.list").write_text(
        "# Debian sources disabled: test hosts install only from the local repository\n"
    )
    for other in (root / "etc/apt/sources.list.d").glob("*"):
        if other.suffix in (".list", ".sources"):
            other.unlink()
    if repo_dir is not None:
        (root / SOURCES_FILE).write_text(SOURCES_LINE + "\n")


def nspawn_bind_args(repo_dir: Path) -> list[str]:
    """The systemd-nspawn argument that shows `repo_dir` read-only at `REPO_MOUNT`."""
    if ":" in str(repo_dir):
        raise AptRepoError(f"{repo_dir}: systemd-nspawn cannot bind a path containing ':'")
    return [f"--bind-ro={repo_dir.resolve()}:{REPO_MOUNT}"]
