"""The files in systemd/: what systemd's own tools say about them, and the directives we rely on.

Needs Debian's `systemd` package (systemd-analyze, systemd-sysusers, systemd-tmpfiles). PID 1
need not be systemd: every command here works offline. A missing tool fails the test with
the package to install; it never skips, so a CI without it cannot look green.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.config.host import DEFAULT_TIMEOUT

SYSTEMD_DIR = Path(__file__).resolve().parent.parent / "systemd"
UNIT = SYSTEMD_DIR / "gitops-agent.service"
MAX_EXPOSURE = 3.0
EXEC = "/opt/gitops-agent/bin/agent"
# The one complaint of `systemd-analyze verify` we accept: the venv is not installed here.
TOLERATED = f"gitops-agent.service: Command {EXEC} is not executable: No such file or directory"


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is missing: apt-get install -y systemd (Debian package 'systemd')")
    return found


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


# -- a unit-file reader: sections, repeated keys, continuations, resets -----------------


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections to (key, value) pairs in file order, as systemd reads them (no drop-ins)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1].rstrip() + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"directive outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a KEY=VALUE line: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def values(section: list[tuple[str, str]], key: str) -> list[str]:
    """Every assignment of `key` in effect: an empty assignment resets the list."""
    out: list[str] = []
    for k, v in section:
        if k == key:
            out = [] if v == "" else [*out, v]
    return out


def last(section: list[tuple[str, str]], key: str) -> str | None:
    """The value in effect for a single-valued key (the last assignment wins)."""
    found = [v for k, v in section if k == key]
    return found[-1] if found else None


_SPAN_UNITS = {
    "us": 1e-6, "ms": 1e-3, "s": 1, "sec": 1, "m": 60, "min": 60,
    "h": 3600, "hr": 3600, "d": 86400,
}  # fmt: skip


def seconds(span: str) -> float:
    """A systemd time span (`35min`, `1h 30min`, `90`) in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span)
    assert parts and "".join(n + u for n, u in parts) == span.replace(" ", ""), span
    return sum(float(n) * _SPAN_UNITS[u or "s"] for n, u in parts)


@pytest.fixture(scope="module")
def service() -> list[tuple[str, str]]:
    return parse_unit(UNIT.read_text())["Service"]


def test_parser_handles_repeats_resets_and_continuations() -> None:
    parsed = parse_unit("[Service]\nA=1\nA=2\nB=x \\\n  y\nA=\nA=3\n# A=4\n")["Service"]
    assert values(parsed, "A") == ["3"]
    assert last(parsed, "B") == "x y"
    assert seconds("1h 30min") == 5400 and seconds("35min") == 2100 and seconds("90") == 90


# -- what systemd's tools say ----------------------------------------------------------


def test_security_exposure_is_at_most_3() -> None:
    proc = run(tool("systemd-analyze"), "security", "--offline=yes", "--no-pager", str(UNIT))
    match = re.search(r"Overall exposure level for gitops-agent\.service: (\d+\.\d+)", proc.stdout)
    assert match, f"no exposure line (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    assert float(match.group(1)) <= MAX_EXPOSURE, proc.stdout


def test_verify_has_no_complaint_but_the_missing_binary() -> None:
    proc = run(tool("systemd-analyze"), "verify", "--no-pager", str(UNIT))
    lines = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    about_us = [ln for ln in lines if "gitops-agent" in ln or not re.match(r"^\S+\.\w+:", ln)]
    assert about_us in ([], [TOLERATED]), "\n".join(lines)


def test_sysusers_and_tmpfiles_make_the_user_and_directories(tmp_path: Path) -> None:
    # Applied to an empty root: the real /etc is never touched.
    root = tmp_path / "root"
    for kind, suffix in (("sysusers.d", "sysusers"), ("tmpfiles.d", "tmpfiles")):
        target = root / "usr" / "lib" / kind / "gitops-agent.conf"
        target.parent.mkdir(parents=True)
        shutil.copy(SYSTEMD_DIR / f"gitops-agent.{suffix}", target)
    (root / "etc").mkdir()
    made = run(tool("systemd-sysusers"), f"--root={root}", "gitops-agent.conf")
    assert made.returncode == 0, made.stderr
    passwd = {
        ln.split(":")[0]: ln.split(":") for ln in (root / "etc/passwd").read_text().splitlines()
    }
    group = {
        ln.split(":")[0]: ln.split(":") for ln in (root / "etc/group").read_text().splitlines()
    }
    user = passwd["gitops-agent"]
    uid, gid = int(user[2]), int(user[3])
    assert 0 < uid < 1000, "a system user"
    assert int(group["gitops-agent"][2]) == gid
    assert user[5] == "/var/lib/gitops-agent"
    assert user[6] == "/usr/sbin/nologin"

    created = run(tool("systemd-tmpfiles"), f"--root={root}", "--create", "gitops-agent.conf")
    assert created.returncode == 0, created.stderr
    expected = {  # path: (mode, uid, gid)
        "etc/gitops-agent": (0o750, 0, gid),
        "etc/gitops-agent/credentials": (0o700, 0, 0),
        "var/lib/gitops-agent": (0o700, uid, gid),
    }
    for rel, want in expected.items():
        st = (root / rel).stat()
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == want, rel


def _entries(path: Path) -> dict[str, list[str]]:
    """/etc/passwd-style lines by name."""
    return {ln.split(":")[0]: ln.split(":") for ln in path.read_text().splitlines()}


# -- the directives the agent and the docs rely on -------------------------------------


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("ExecStart", f"{EXEC} run"),
        ("User", "gitops-agent"),
        ("Group", "gitops-agent"),
        ("StateDirectory", "gitops-agent"),
        ("StateDirectoryMode", "0700"),
        ("RuntimeDirectory", "gitops-agent"),
        ("RuntimeDirectoryMode", "0750"),
        ("ConfigurationDirectory", "gitops-agent"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("NoNewPrivileges", "yes"),
        ("SystemCallArchitectures", "native"),
        ("UMask", "0077"),
        ("KillMode", "mixed"),
        ("KillSignal", "SIGTERM"),
        ("Restart", "on-failure"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("ProtectControlGroups", "yes"),
        ("ProtectClock", "yes"),
        ("ProtectHostname", "yes"),
        ("ProtectProc", "invisible"),
        ("RestrictNamespaces", "yes"),
        ("LockPersonality", "yes"),
        ("RestrictRealtime", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("RemoveIPC", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
    ],
)
def test_directive(service: list[tuple[str, str]], key: str, expected: str) -> None:
    assert last(service, key) == expected


def test_no_dynamic_user(service: list[tuple[str, str]]) -> None:
    # The state must keep one owner across restarts and reboots.
    assert last(service, "DynamicUser") in (None, "no")


def test_no_capabilities_at_all(service: list[tuple[str, str]]) -> None:
    assert "CapabilityBoundingSet" in dict(service), "must be set (to empty)"
    assert values(service, "CapabilityBoundingSet") == []
    assert values(service, "AmbientCapabilities") == []


def test_address_families(service: list[tuple[str, str]]) -> None:
    families = " ".join(values(service, "RestrictAddressFamilies")).split()
    assert sorted(families) == ["AF_INET", "AF_INET6", "AF_UNIX"]


def test_system_call_filter_starts_from_system_service(service: list[tuple[str, str]]) -> None:
    filters = values(service, "SystemCallFilter")
    assert filters[0] == "@system-service"
    assert all(f.startswith("~") for f in filters[1:]), "later lines may only take calls away"


def test_watchdog_and_restart_timing(service: list[tuple[str, str]]) -> None:
    watchdog = seconds(last(service, "WatchdogSec") or "0")
    assert 10 <= watchdog <= 600
    assert 1 <= seconds(last(service, "RestartSec") or "0") <= 60


def test_stop_timeout_outlasts_an_apply(service: list[tuple[str, str]]) -> None:
    # A stopping agent lets Terraform finish what it started; a SIGKILL before that would
    # leave the state locked and resources half-made.
    assert seconds(last(service, "TimeoutStopSec") or "0") > DEFAULT_TIMEOUT


def test_secrets_come_as_credentials(service: list[tuple[str, str]]) -> None:
    # The whole credentials directory: the unit starts with whichever credentials the host
    # config uses, and requires none it does not (no Vault, no Vault secret-id).
    assert values(service, "LoadCredential") == ["gitops:/etc/gitops-agent/credentials"]


def test_the_users_in_the_unit_match_sysusers() -> None:
    sysusers = (SYSTEMD_DIR / "gitops-agent.sysusers").read_text()
    entries = [ln.split() for ln in sysusers.splitlines() if ln and not ln.startswith("#")]
    assert [e[:2] for e in entries] == [["u", "gitops-agent"]]
