"""The cached Debian root that every nspawn test host boots from, built once per machine.

    tar_path = ensure_rootfs()        # builds it if missing or its recipe changed
    python -m tests.support.rootfs    # the same from a shell (CI calls this); --force rebuilds

`debootstrap --variant=minbase` of Debian bookworm with systemd, dbus, sshd, sudo, python3 and
iproute2, from the mirror apt already uses on this machine, then the clean-ups measured in
shared/toolchain.md: `apt-get clean`, timers that would wake up during tests masked, the dbus
machine-id linked to /etc/machine-id (so each copy gets its own), and no SSH host keys or
machine id (each host makes its own).

The result is a tar outside the repo (default `/var/cache/gitops-agent-tests/rootfs-bookworm.tar`,
env `GITOPS_TEST_ROOTFS` overrides it) with a stamp file beside it naming the recipe it was
built from: a change of `RECIPE` rebuilds it. A lock file beside it keeps two processes (two
pytest runs, CI and a developer) from building at once; the second waits and then uses the
first one's result. Needs root and Debian's `debootstrap`.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

DEFAULT_TAR = Path("/var/cache/gitops-agent-tests/rootfs-bookworm.tar")
ENV_TAR = "GITOPS_TEST_ROOTFS"
ENV_MIRROR = "GITOPS_TEST_MIRROR"  # overrides the mirror read from apt's sources
FALLBACK_MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
DEBOOTSTRAP_TIMEOUT = 1200.0  # seconds; measured 60-80 s on a quiet machine
LOCK_TIMEOUT = 1500.0  # a waiting process gives up after this (another build is running)
APT_SOURCES = Path("/etc/apt/sources.list")
APT_SOURCES_DIR = Path("/etc/apt/sources.list.d")

# Everything that decides what the tar holds. Change anything here and every cached root is
# rebuilt on next use (the stamp holds a hash of this).
RECIPE: dict[str, object] = {
    "version": 1,
    "suite": SUITE,
    "variant": "minbase",
    "include": [
        "systemd",
        "systemd-sysv",
        "dbus",
        "libpam-systemd",
        "openssh-server",
        "sudo",
        "python3",
        "iproute2",
        # The bastion test installs the agent itself into a host: it runs git, and plans
        # proposals under bubblewrap.
        "git",
        "bubblewrap",
    ],
    # Timers that would start apt or fs jobs in the middle of a test.
    "mask": [
        "apt-daily.timer",
        "apt-daily-upgrade.timer",
        "e2scrub_all.timer",
        "fstrim.timer",
        "dpkg-db-backup.timer",
    ],
}


class RootfsError(RuntimeError):
    """The cached root could not be built or read; the message says what to do."""


# -- where from -----------------------------------------------------------------------------


@dataclass(frozen=True)
class AptSource:
    """One `deb` entry of apt's configuration."""

    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]


def parse_one_line_sources(text: str) -> list[AptSource]:
    """`deb [options] URI SUITE COMPONENT...` lines (sources.list format); `deb-src` ignored."""
    sources = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        line = re.sub(r"\[[^\]]*\]", " ", line)  # options such as [arch=amd64 signed-by=...]
        fields = line.split()
        if len(fields) >= 3:
            sources.append(AptSource(fields[1], (fields[2],), tuple(fields[3:])))
    return sources


def parse_deb822_sources(text: str) -> list[AptSource]:
    """Stanzas of a `.sources` file (deb822 format), skipping `Enabled: no` and non-`deb` types."""
    sources = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = ""
        for raw in stanza.splitlines():
            if raw.startswith("#") or not raw.strip():
                continue
            if raw[0] in " \t" and key:  # continuation line
                fields[key] += " " + raw.strip()
                continue
            key, _, value = raw.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() in ("no", "false", "0"):
            continue
        suites = tuple(fields.get("suites", "").split())
        components = tuple(fields.get("components", "").split())
        for uri in fields.get("uris", "").split():
            sources.append(AptSource(uri, suites, components))
    return sources


def apt_sources(
    sources_list: Path = APT_SOURCES, sources_dir: Path = APT_SOURCES_DIR
) -> list[AptSource]:
    """Every enabled `deb` entry apt reads on this machine, in apt's order."""
    files = [sources_list] if sources_list.is_file() else []
    if sources_dir.is_dir():
        # apt reads only *.list and *.sources (a `.disabled` suffix turns a file off).
        files += sorted(p for p in sources_dir.iterdir() if p.suffix in (".list", ".sources"))
    found: list[AptSource] = []
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        parse = parse_deb822_sources if path.suffix == ".sources" else parse_one_line_sources
        found += parse(text)
    return found


def debian_mirror(sources: list[AptSource] | None = None) -> str:
    """The mirror apt uses for Debian `SUITE` main here (env `GITOPS_TEST_MIRROR` wins).

    Falls back to deb.debian.org when apt names none (e.g. a machine on another release).
    """
    if os.environ.get(ENV_MIRROR):
        return os.environ[ENV_MIRROR]
    for source in apt_sources() if sources is None else sources:
        usable = source.uri.startswith(("http://", "https://", "file:"))
        if usable and SUITE in source.suites and "main" in source.components:
            return source.uri
    return FALLBACK_MIRROR


# -- the cache ------------------------------------------------------------------------------


def recipe_hash() -> str:
    return hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:16]


def rootfs_tar() -> Path:
    """Where the cached root lives (env `GITOPS_TEST_ROOTFS`, else the default)."""
    return Path(os.environ.get(ENV_TAR) or DEFAULT_TAR)


def _stamp_path(tar: Path) -> Path:
    return tar.with_name(tar.name + ".stamp")


def is_current(tar: Path) -> bool:
    """True if `tar` exists and was built from the current `RECIPE`."""
    try:
        stamp = json.loads(_stamp_path(tar).read_text())
    except (OSError, ValueError):
        return False
    return tar.is_file() and stamp.get("recipe") == recipe_hash()


@contextlib.contextmanager
def _build_lock(tar: Path, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    lock_path = tar.with_name(tar.name + ".lock")
    with open(lock_path, "a") as lock:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RootfsError(
                        f"another process has held {lock_path} for over {timeout:.0f} s "
                        "(building the test root); wait for it or remove a stale build"
                    ) from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_rootfs(tar: Path | None = None, *, force: bool = False) -> Path:
    """The path of a current cached root tar, built first if missing, stale or `force`d."""
    tar = tar or rootfs_tar()
    if not force and is_current(tar):
        return tar
    tar.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(tar):
        # Holding the lock, no build is running: a build dir left now is from a killed one.
        for stale in tar.parent.glob(f".build-{tar.name}-*"):
            remove_tree(stale)
        if force or not is_current(tar):  # another process may have built it meanwhile
            build_rootfs(tar)
    return tar


def ensure_lower_dir(tar: Path | None = None) -> Path:
    """The cached root unpacked once beside the tar, for hosts that overlay-mount it.

    Lives in `<tar>.d/<key>/`, the key derived from the tar's stamp, so a rebuilt tar gets a
    new directory. Never write into it: it is the shared read-only lower layer of every host.
    Older directories are removed once no mount uses them.
    """
    tar = ensure_rootfs(tar)
    key = hashlib.sha256(_stamp_path(tar).read_bytes()).hexdigest()[:16]
    base = tar.with_name(tar.name + ".d")
    lower = base / key
    if lower.is_dir():
        return lower
    with _build_lock(tar):
        if lower.is_dir():
            return lower
        base.mkdir(exist_ok=True)
        for stale in base.glob(".unpack-*"):
            remove_tree(stale)  # from an unpack that was killed (we hold the lock)
        partial = Path(tempfile.mkdtemp(prefix=".unpack-", dir=base))
        try:
            _run(
                ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf", str(tar),
                 "-C", str(partial)],
                f"unpacking {tar} into {partial}",
            )  # fmt: skip
            os.rename(partial, lower)  # atomic: a directory named by its key is complete
        finally:
            remove_tree(partial)
        _remove_unused_lower_dirs(base, keep=lower)
    return lower


def _remove_unused_lower_dirs(base: Path, keep: Path) -> None:
    try:
        mounts = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return
    for old in base.iterdir():
        if old != keep and old.is_dir() and not old.name.startswith(".") and str(old) not in mounts:
            remove_tree(old)


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path` in this mount namespace, deepest first."""
    prefix = str(path).rstrip("/")
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    points = [line.split()[4].replace("\\040", " ") for line in lines]
    inside = [p for p in points if p == prefix or p.startswith(prefix + "/")]
    return sorted(inside, key=len, reverse=True)


def remove_tree(path: Path) -> None:
    """`rm -rf path`, but never through a mount: a build root of a killed debootstrap can
    still have /proc, /sys or /dev mounted inside, and deleting through those would reach
    this machine's own files. Mounts are detached first; if any stays, nothing is removed."""
    for point in mounts_under(path):
        subprocess.run(["umount", "--lazy", point], capture_output=True, timeout=30)
    left = mounts_under(path)
    if left:
        raise RootfsError(f"not removing {path}: still mounted inside it: {', '.join(left)}")
    shutil.rmtree(path, ignore_errors=True)


def _run(argv: list[str], what: str, timeout: float = 300.0) -> None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RootfsError(f"{what} took over {timeout:.0f} s: {' '.join(argv)}") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])
        raise RootfsError(f"{what} failed (exit {proc.returncode}): {' '.join(argv)}\n{tail}")


def build_rootfs(tar: Path, mirror: str | None = None) -> float:
    """Build the root into `tar` (atomically: temp + rename); returns the seconds it took."""
    if os.geteuid() != 0:
        raise RootfsError("building the test root needs root (debootstrap, chroot)")
    debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    if not Path(debootstrap).exists():
        raise RootfsError("debootstrap is missing: apt-get install -y debootstrap")
    mirror = mirror or debian_mirror()
    started = time.monotonic()
    # Build next to the tar so the final rename stays on one file system.
    work = Path(tempfile.mkdtemp(prefix=f".build-{tar.name}-", dir=tar.parent))
    try:
        root = work / "root"
        include = ",".join(RECIPE["include"])  # type: ignore[arg-type]
        _run(
            [debootstrap, f"--variant={RECIPE['variant']}", f"--include={include}",
             SUITE, str(root), mirror],
            f"debootstrap from {mirror} (set {ENV_MIRROR} to use another mirror)",
            timeout=DEBOOTSTRAP_TIMEOUT,
        )  # fmt: skip
        _clean_up(root)
        partial = work / "rootfs.tar"
        _run(
            ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-C", str(root),
             "-cf", str(partial), "."],
            f"packing the test root into {partial}",
        )  # fmt: skip
        os.replace(partial, tar)
        seconds = time.monotonic() - started
        stamp = {"recipe": recipe_hash(), "mirror": mirror, "seconds": round(seconds, 1)}
        stamp_path = _stamp_path(tar)
        partial_stamp = work / "stamp.json"
        partial_stamp.write_text(json.dumps(stamp) + "\n")
        os.replace(partial_stamp, stamp_path)
        return seconds
    finally:
        remove_tree(work)


def _clean_up(root: Path) -> None:
    """What every copy should start without: caches, timers, a shared identity."""
    _run(["chroot", str(root), "apt-get", "clean"], f"apt-get clean in {root}")
    for lists in (root / "var/lib/apt/lists").glob("*"):
        if lists.is_file():
            lists.unlink()  # indexes of the build mirror; hosts use their own sources
    systemd_dir = root / "etc/systemd/system"
    for unit in RECIPE["mask"]:  # type: ignore[attr-defined]
        link = systemd_dir / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")  # what `systemctl mask` does
    # Each host writes a fresh /etc/machine-id; dbus must read that one, not a copy.
    dbus_id = root / "var/lib/dbus/machine-id"
    dbus_id.parent.mkdir(parents=True, exist_ok=True)
    dbus_id.unlink(missing_ok=True)
    dbus_id.symlink_to("/etc/machine-id")
    (root / "etc/machine-id").write_text("")
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()  # each host gets its own
    (root / "etc/hostname").write_text("localhost\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.rootfs",
        description="Build the cached Debian root for nspawn test hosts if it is missing.",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if it is current")
    args = parser.parse_args(argv)
    tar = rootfs_tar()
    if not args.force and is_current(tar):
        print(f"test root is current: {tar}")
        return 0
    if os.geteuid() != 0:
        # Not an error: without root the nspawn tests skip (under CI they fail, saying why).
        print(f"not building the test root {tar}: that needs root", file=sys.stderr)
        return 0
    started = time.monotonic()
    try:
        ensure_rootfs(tar, force=args.force)
    except RootfsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    size = tar.stat().st_size / 2**20
    print(f"test root ready: {tar} ({size:.0f} MiB) after {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
