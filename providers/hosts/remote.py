"""The program the engine runs on a target host, one round trip per call.

It is never imported by the agent: `wire.py` sends this file's source, followed by a JSON
spec, on the stdin of `python3 -c BOOTSTRAP`. It must run on any Python >= 3.7 with the
standard library only (the targets are plain Debian/Ubuntu/RHEL machines), so: no type
annotations, no syntax or stdlib calls newer than 3.7.

Two modes, one JSON document out on stdout:
- `facts`: the state of every managed resource (stat, sha256, owners, link targets; one
  dpkg-query/rpm call for all packages, one `systemctl show` for all services; users and
  groups via pwd/grp; command guards are run here).
- `apply`: a list of operations, each a list of steps (write, chmod, chown, mkdir, rmdir,
  remove, symlink, run, packages, authorized_keys, command, daemon_reload, service), then a
  `systemctl daemon-reload` if a unit file changed after the last service step, then the
  notified handlers.
  A failing step ends its operation only; later operations still run.
"""

import contextlib
import errno
import grp
import json
import os
import pwd
import stat
import sys
import time

try:  # the interpreter's own SHA-256: hashlib would load OpenSSL first (a few ms)
    from _sha256 import sha256  # Python < 3.12
except ImportError:
    try:
        from _sha2 import sha256  # Python >= 3.12
    except ImportError:
        from hashlib import sha256

# base64, shutil, signal and subprocess are imported where they are used: a facts round
# trip over files needs none of them, and importing them costs more than the work.

MAX_CONTENT = 256 * 1024  # largest file whose old text comes back for a diff
TAIL_LINES = 20
TAIL_CHARS = 2000
# systemd's system unit paths (drop-in `NAME.d/` dirs are under them): a file written or
# removed there needs `systemctl daemon-reload` before it takes effect.
SYSTEMD_DIRS = (
    "/etc/systemd/system/",
    "/run/systemd/system/",
    "/usr/local/lib/systemd/system/",
    "/usr/lib/systemd/system/",
    "/lib/systemd/system/",
)
SERVICE_PROPERTIES = "LoadState,ActiveState,SubState,UnitFileState,NeedDaemonReload"
# As services.py's ENABLED and RUNNING (this program cannot import it; a test compares them).
SERVICE_ENABLED = (
    "enabled",
    "enabled-runtime",
    "alias",
    "static",
    "indirect",
    "generated",
    "transient",
)
SERVICE_DISABLEABLE = ("enabled", "enabled-runtime")
SERVICE_RUNNING = ("active", "reloading", "activating")
# apt's "the package lists are stale or empty" messages: worth one `apt-get update`.
STALE_APT = ("Unable to locate package", "has no installation candidate", "Failed to fetch")


class StepError(Exception):
    """A step failed; the message is fit for a person (no secret, names the path)."""


class Context:
    """Per-run state: the time budget, caches and what the run has touched."""

    def __init__(self, spec):
        self.deadline = time.monotonic() + float(spec.get("timeout", 300))
        self.groups = None
        self.unit_files_changed = False
        self.refreshed = False

    def left(self):
        return max(1.0, self.deadline - time.monotonic())

    def run(self, argv, env=None, cwd=None):
        """Run argv; return (exit code, output). Exit code None: not run or timed out."""
        if cwd and not os.path.isdir(cwd):
            return None, f"working directory {cwd} does not exist"
        full_env = None
        if env:
            full_env = dict(os.environ)
            full_env.update(env)
        import signal
        import subprocess

        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=full_env,
                cwd=cwd or None,
                start_new_session=True,  # so a timeout can kill the whole process group
            )
        except OSError as exc:
            return None, f"cannot run {argv[0]}: {exc.strerror}"
        budget = self.left()
        try:
            out, _ = proc.communicate(timeout=budget)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return None, f"timed out after {budget:.0f}s"
        return proc.returncode, out.decode("utf-8", "replace")

    def all_groups(self):
        if self.groups is None:
            self.groups = grp.getgrall()
        return self.groups

    def touched(self, path):
        if path.startswith(SYSTEMD_DIRS):
            self.unit_files_changed = True

    def daemon_reload_if_needed(self):
        """Unit files written in this run take effect before any service action, and
        before the run ends (a unit file changed without a notify is loaded too)."""
        if not self.unit_files_changed:
            return
        self.unit_files_changed = False
        code, out = self.run(["systemctl", "daemon-reload"])
        if code != 0:
            raise StepError(f"systemctl daemon-reload failed: {tail(out)}")


# --- helpers -------------------------------------------------------------------------


def tail(text):
    lines = [line for line in text.strip().splitlines() if line.strip()]
    kept = "\n".join(lines[-TAIL_LINES:])
    return kept[-TAIL_CHARS:]


def describe(exc):
    if isinstance(exc, StepError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        where = exc.filename if exc.filename is not None else ""
        return f"{where}: {exc.strerror}" if where else exc.strerror
    return f"{type(exc).__name__}: {exc}"


def user_name(uid):
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def group_name(gid):
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def resolve_uid(name):
    if name is None:
        return -1
    if str(name).isdigit():
        return int(name)
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        raise StepError(f"no such user {name!r} on the host") from None


def resolve_gid(name):
    if name is None:
        return -1
    if str(name).isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise StepError(f"no such group {name!r} on the host") from None


def file_type(mode):
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "link"
    return "other"


def stat_fact(st):
    return {
        "exists": True,
        "type": file_type(st.st_mode),
        "mode": f"{stat.S_IMODE(st.st_mode):04o}",
        "uid": st.st_uid,
        "owner": user_name(st.st_uid),
        "gid": st.st_gid,
        "group": group_name(st.st_gid),
        "size": st.st_size,
    }


def content_fact(dfd, name, fact, desired_sha, want_content):
    """Add sha256 (and the old bytes, when they differ and are small) to a file fact; the
    file `name` in directory `dfd` is opened without following a link."""
    digest = sha256()
    kept = bytearray()
    keep = want_content and fact["size"] <= MAX_CONTENT
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    with os.fdopen(os.open(name, flags, dir_fd=dfd), "rb") as handle:
        for block in iter(lambda: handle.read(65536), b""):
            digest.update(block)
            if keep:
                kept.extend(block)
    fact["sha256"] = digest.hexdigest()
    if keep and fact["sha256"] != desired_sha:
        import base64

        fact["content_b64"] = base64.b64encode(bytes(kept)).decode("ascii")
    return fact


def os_ids():
    ids = set()
    try:
        with open("/etc/os-release") as handle:
            for line in handle:
                key, _, value = line.strip().partition("=")
                if key in ("ID", "ID_LIKE"):
                    ids.update(value.strip("\"'").split())
    except OSError:
        pass
    return ids


def package_manager():
    import shutil

    ids = os_ids()
    has = shutil.which
    if ids & {"debian", "ubuntu"} and has("dpkg-query") and has("apt-get"):
        return "apt"
    if ids & {"rhel", "fedora", "centos"} and has("rpm"):
        return "dnf" if has("dnf") else ("yum" if has("yum") else None)
    if has("dpkg-query") and has("apt-get"):
        return "apt"
    if has("rpm") and (has("dnf") or has("yum")):
        return "dnf" if has("dnf") else "yum"
    return None


# --- facts -----------------------------------------------------------------------------


def fact_file(query, ctx):
    # Read as the writes go (open_dir): never through a link another user made, so no
    # file they point at (root's) is read into a diff.
    try:
        dfd, name = open_parent(query["path"], create=None)
    except FileNotFoundError:
        return {"exists": False}
    try:
        st = lstat_at(dfd, name)
        if st is None:
            return {"exists": False}
        fact = stat_fact(st)
        if fact["type"] == "file":
            content_fact(dfd, name, fact, query.get("sha256"), query.get("want_content"))
        return fact
    finally:
        os.close(dfd)


def fact_directory(query, ctx):
    path = query["path"]
    try:
        st = os.stat(path)  # follows a link: a link to a directory is that directory
    except FileNotFoundError:
        return {"exists": True, "type": "link"} if os.path.islink(path) else {"exists": False}
    fact = stat_fact(st)
    fact["link"] = os.path.islink(path)
    if fact["type"] == "dir":
        with os.scandir(path) as entries:
            fact["empty"] = next(entries, None) is None
    return fact


def fact_link(query, ctx):
    path = query["path"]
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return {"exists": False}
    fact = {"exists": True, "type": file_type(st.st_mode)}
    if fact["type"] == "link":
        fact["target"] = os.readlink(path)
    return fact


def fact_user(query, ctx):
    try:
        entry = pwd.getpwnam(query["name"])
    except KeyError:
        return {"exists": False}
    fact = {
        "exists": True,
        "uid": entry.pw_uid,
        "gid": entry.pw_gid,
        "group": group_name(entry.pw_gid),
        "groups": sorted(
            g.gr_name
            for g in ctx.all_groups()
            if entry.pw_name in g.gr_mem and g.gr_gid != entry.pw_gid
        ),
        "shell": entry.pw_shell,
        "home": entry.pw_dir,
    }
    if query.get("keys"):
        fact["authorized_keys"] = keys_fact(entry, query)
    return fact


def keys_fact(entry, query):
    """The user's authorized_keys, read without following a link (so a ~/.ssh pointing
    at /root/.ssh shows as something to replace, never as root's keys)."""
    try:
        ssh_dir = open_ssh_dir(entry, create=False)
    except FileNotFoundError:
        return {"exists": False}
    except StepError:
        return {"exists": True, "type": "link"}
    try:
        st = lstat_at(ssh_dir, "authorized_keys")
        if st is None:
            return {"exists": False}
        keys = stat_fact(st)
        if keys["type"] == "file":
            content_fact(ssh_dir, "authorized_keys", keys, query.get("sha256"), True)
        return keys
    finally:
        os.close(ssh_dir)


def fact_group(query, ctx):
    try:
        entry = grp.getgrnam(query["name"])
    except KeyError:
        return {"exists": False}
    return {"exists": True, "gid": entry.gr_gid}


def guard(query, ctx, applying=False):
    """(run?, why) for a command, from its creates/unless/onlyif guards, in that order."""
    # Commands and guards run in `cwd`, or in / (not wherever the login or sudo left us).
    env, cwd = query.get("env"), query.get("cwd") or "/"
    reasons = []
    creates = query.get("creates")
    if creates:
        path = os.path.join(cwd, creates)
        if os.path.lexists(path):
            return False, f"creates {creates} exists"
        reasons.append(f"creates {creates} is missing")
    if not os.path.isdir(cwd):
        if applying:
            raise StepError(f"working directory {cwd} does not exist")
        # An earlier resource of the same apply may create it: the guards are asked
        # again in it at the command's turn.
        if query.get("unless") is not None or query.get("onlyif") is not None:
            reasons.append(f"cwd {cwd} does not exist yet (guards checked when it runs)")
        return True, "; ".join(reasons) or "no guard"
    for name in ("unless", "onlyif"):
        check = query.get(name)
        if check is None:
            continue
        code, out = ctx.run(["/bin/sh", "-c", check], env=env, cwd=cwd)
        if code is None:
            raise StepError(f"{name} guard: {out}")
        if (code == 0) == (name == "unless"):
            return False, f"{name} exited {code}"
        reasons.append(f"{name} exited {code}")
    return True, "; ".join(reasons) or "no guard"


def fact_command(query, ctx):
    run, why = guard(query, ctx)
    return {"run": run, "reason": why}


def facts_packages(queries, ctx):
    """Facts of every package resource from one dpkg-query or rpm call."""
    manager = package_manager()
    names = sorted({query["name"] for _, query in queries})
    installed = {}
    leftovers = set()  # removed, its configuration files still there (dpkg's "rc")
    error = None
    if manager == "apt":
        code, out = ctx.run(
            [
                "dpkg-query",
                "-W",
                "-f=${Package}\t${binary:Package}\t${Status}\t${Version}\n",
                *names,
            ]
        )
        if code not in (0, 1):  # 1: some names are unknown, the others are listed
            error = f"dpkg-query failed: {tail(out)}"
        for line in out.splitlines():
            fields = line.split("\t")
            if len(fields) == 4 and fields[2].endswith(" installed"):
                installed[fields[0]] = fields[3]
                installed[fields[1]] = fields[3]
            elif len(fields) == 4 and fields[2].endswith(" config-files"):
                leftovers.update(fields[:2])
    elif manager in ("dnf", "yum"):
        code, out = ctx.run(["rpm", "-q", "--qf", "%{NAME}\t%{VERSION}-%{RELEASE}\n", *names])
        if code is None:
            error = f"rpm failed: {out}"
        for line in out.splitlines():
            fields = line.split("\t")
            if len(fields) == 2:  # "package x is not installed" has no tab
                installed[fields[0]] = fields[1]
    facts = {}
    for index, query in queries:
        if error:
            facts[index] = {"error": error}
        else:
            name = query["name"]
            facts[index] = {
                "manager": manager,
                "installed": name in installed,
                "version": installed.get(name),
            }
            if name in leftovers:  # only then: what purge: true still has to remove
                facts[index]["config_files"] = True
    return facts


def facts_services(queries, ctx):
    """Facts of every service resource from one `systemctl show` call."""
    units = [query["unit"] for _, query in queries]
    code, out = ctx.run(["systemctl", "show", "-p", SERVICE_PROPERTIES, "--", *units])
    blocks = out.strip().split("\n\n") if code == 0 else []
    if code != 0 or len(blocks) != len(units):
        error = f"systemctl show failed (is systemd running?): {tail(out)}"
        return {index: {"error": error} for index, _ in queries}
    facts = {}
    for position, (index, _) in enumerate(queries):
        block = blocks[position]
        props = dict(line.partition("=")[::2] for line in block.splitlines() if "=" in line)
        facts[index] = {
            "load": props.get("LoadState", ""),
            "active": props.get("ActiveState", ""),
            "sub": props.get("SubState", ""),
            "unit_file": props.get("UnitFileState", ""),
            "need_reload": props.get("NeedDaemonReload") == "yes",
        }
    return facts


FACTS = {
    "file": fact_file,
    "directory": fact_directory,
    "link": fact_link,
    "user": fact_user,
    "group": fact_group,
    "command": fact_command,
}
BATCHED = {"package": facts_packages, "service": facts_services}


def gather(spec, ctx):
    queries = spec["resources"]
    facts = [None] * len(queries)
    for kind, batch in BATCHED.items():
        members = [(i, q) for i, q in enumerate(queries) if q["kind"] == kind]
        if members:
            try:
                for index, fact in batch(members, ctx).items():
                    facts[index] = fact
            except Exception as exc:
                for index, _ in members:
                    facts[index] = {"error": describe(exc)}
    for index, query in enumerate(queries):
        if query["kind"] in FACTS:
            try:
                facts[index] = FACTS[query["kind"]](query, ctx)
            except Exception as exc:
                facts[index] = {"error": describe(exc)}
    return {"facts": facts, "python": ".".join(str(part) for part in sys.version_info[:3])}


# --- apply -----------------------------------------------------------------------------


DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
MAX_LINKS = 40
NEW_DIR = (0o755, -1, -1)  # parents the engine creates: root's, 0755 (as mkdir -p under 022)


def trusted(st):
    """Owned by root (or the user the engine runs as): nobody else can have made it."""
    return st.st_uid in (0, os.geteuid())


def open_dir(path, create=None):
    """An fd of directory `path`, opened one component at a time from / with O_NOFOLLOW.

    The engine runs as root and writes where other users own directories (their home):
    a symbolic link is followed only when it and the directory holding it are owned by
    root, never one a user could have made (`~/.ssh -> /root/.ssh`). `create`:
    (mode, uid, gid) for missing directories, or None to fail on them.
    """
    parts = [part for part in path.split("/") if part and part != "."]
    fd = os.open("/", DIR_FLAGS)
    hops = 0
    try:
        while parts:
            part = parts.pop(0)
            try:
                child = os.open(part, DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if create is None:
                    raise
                mode, uid, gid = create
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, mode, dir_fd=fd)
                child = os.open(part, DIR_FLAGS, dir_fd=fd)
                if uid != -1 or gid != -1:
                    os.fchown(child, uid, gid)
                os.fchmod(child, mode)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                st = os.stat(part, dir_fd=fd, follow_symlinks=False)
                if not stat.S_ISLNK(st.st_mode):
                    raise StepError(f"{path}: {part} is not a directory") from None
                if not (trusted(st) and trusted(os.fstat(fd))):
                    raise StepError(
                        f"{path}: {part} is a symbolic link owned by {user_name(st.st_uid)};"
                        " not following it as root"
                    ) from None
                hops += 1
                if hops > MAX_LINKS:
                    raise StepError(f"{path}: too many symbolic links") from None
                target = os.readlink(part, dir_fd=fd)
                parts = [p for p in target.split("/") if p and p != "."] + parts
                if target.startswith("/"):
                    os.close(fd)
                    fd = os.open("/", DIR_FLAGS)
                continue
            os.close(fd)
            fd = child
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_parent(path, create=NEW_DIR):
    """(fd of the directory holding `path`, the last component), safely (open_dir)."""
    directory, name = os.path.split(os.path.normpath(path))
    if not name:
        raise StepError(f"{path} names no file")
    return open_dir(directory or "/", create), name


def lstat_at(dfd, name):
    try:
        return os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def atomic_write(dfd, name, data, mode, uid, gid):
    """Temp file beside `name` in `dfd`, fchown/fchmod, fsync, rename: readers see old or
    new. Neither the temp file nor `name` is ever opened through a link."""
    tmp = f".{name}.{os.getpid()}.{os.urandom(4).hex()}.gitops-tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(tmp, flags, 0o600, dir_fd=dfd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if uid != -1 or gid != -1:
            os.fchown(fd, uid, gid)  # before fchmod: chown clears setuid bits
        os.fchmod(fd, mode)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)  # replaces a link, never follows
    except BaseException:
        if fd != -1:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dfd)
        raise
    os.fsync(dfd)


def step_write(step, ctx):
    path = step["path"]
    dfd, name = open_parent(path)
    try:
        old = lstat_at(dfd, name)
        if old is not None and stat.S_ISDIR(old.st_mode):
            raise StepError(f"{path} is a directory; not replacing it with a file")
        regular = old is not None and stat.S_ISREG(old.st_mode)
        # Unset mode/owner/group keep what the file had; a new file gets 0644 and our user.
        if step.get("mode"):
            mode = int(step["mode"], 8)
        else:
            mode = stat.S_IMODE(old.st_mode) if regular else 0o644
        uid = resolve_uid(step.get("owner"))
        gid = resolve_gid(step.get("group"))
        if regular:
            uid = old.st_uid if uid == -1 else uid
            gid = old.st_gid if gid == -1 else gid
        import base64

        data = base64.b64decode(step["content_b64"])
        atomic_write(dfd, name, data, mode, uid, gid)
    finally:
        os.close(dfd)
    ctx.touched(path)


@contextlib.contextmanager
def opened(path):
    """An fd of `path` itself for fchmod/fchown: a directory through open_dir, anything
    else opened with O_NOFOLLOW (a link there is refused, not followed)."""
    dfd, name = open_parent(path, create=None)
    try:
        st = lstat_at(dfd, name)
        if st is None:
            raise StepError(f"{path} does not exist")
        if stat.S_ISLNK(st.st_mode) or stat.S_ISDIR(st.st_mode):
            fd = open_dir(path)  # a link only if root's: see open_dir
        else:
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
            fd = os.open(name, flags, dir_fd=dfd)
    finally:
        os.close(dfd)
    try:
        yield fd
    finally:
        os.close(fd)


def step_chmod(step, ctx):
    with opened(step["path"]) as fd:
        os.fchmod(fd, int(step["mode"], 8))


def step_chown(step, ctx):
    uid, gid = resolve_uid(step.get("owner")), resolve_gid(step.get("group"))
    with opened(step["path"]) as fd:
        os.fchown(fd, uid, gid)


def step_mkdir(step, ctx):
    path = step["path"]
    uid, gid = resolve_uid(step.get("owner")), resolve_gid(step.get("group"))
    mode = int(step.get("mode") or "0755", 8)
    dfd, name = open_parent(path)  # missing parents: root's, 0755
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=dfd)  # 0700 until it has its owner and mode
    finally:
        os.close(dfd)
    fd = open_dir(path)
    try:
        if uid != -1 or gid != -1:
            os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def step_rmdir(step, ctx):
    path = step["path"]
    dfd, name = open_parent(path, create=None)
    try:
        st = lstat_at(dfd, name)
        if st is None:
            return
        if stat.S_ISLNK(st.st_mode):
            # a link to a directory: remove the link, never the target's files
            os.unlink(name, dir_fd=dfd)
        elif step.get("recursive"):
            # rmtree never follows links inside; the fd pins the parent we checked
            import shutil

            shutil.rmtree(f"/proc/self/fd/{dfd}/{name}")
        else:
            try:
                os.rmdir(name, dir_fd=dfd)
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise StepError(
                        f"{path} is not empty; set recursive: true to remove it with its contents"
                    ) from None
                raise
    finally:
        os.close(dfd)
    ctx.touched(path)


def step_remove(step, ctx):
    path = step["path"]
    try:
        dfd, name = open_parent(path, create=None)
    except FileNotFoundError:
        return
    try:
        old = lstat_at(dfd, name)
        if old is None:
            return
        if stat.S_ISDIR(old.st_mode):
            raise StepError(f"{path} is a directory; not removing it")
        os.unlink(name, dir_fd=dfd)
    finally:
        os.close(dfd)
    ctx.touched(path)


def step_symlink(step, ctx):
    path = step["path"]
    dfd, name = open_parent(path)
    tmp = f".{name}.{os.getpid()}.gitops-tmp"
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dfd)
        os.symlink(step["target"], tmp, dir_fd=dfd)
        try:
            # replaces a file or link at once; a directory refuses
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except OSError:
            os.unlink(tmp, dir_fd=dfd)
            raise
    finally:
        os.close(dfd)
    ctx.touched(path)


def open_ssh_dir(entry, create):
    """An fd of the user's ~/.ssh, never through a link (the user owns their home and
    could point ~/.ssh anywhere); with `create`, made 0700 and owned by the user."""
    home = open_dir(entry.pw_dir)
    try:
        try:
            return os.open(".ssh", DIR_FLAGS, dir_fd=home)
        except FileNotFoundError:
            if not create:
                raise
            with contextlib.suppress(FileExistsError):
                os.mkdir(".ssh", 0o700, dir_fd=home)
            fd = os.open(".ssh", DIR_FLAGS, dir_fd=home)
            os.fchown(fd, entry.pw_uid, entry.pw_gid)
            os.fchmod(fd, 0o700)
            return fd
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise StepError(
                    f"{entry.pw_dir}/.ssh is not a directory (a symbolic link?); not writing"
                    " authorized_keys through it"
                ) from None
            raise
    finally:
        os.close(home)


def step_authorized_keys(step, ctx):
    try:
        entry = pwd.getpwnam(step["user"])
    except KeyError:
        raise StepError(f"no such user {step['user']!r} on the host") from None
    import base64

    data = base64.b64decode(step["content_b64"])
    ssh_dir = open_ssh_dir(entry, create=True)
    try:
        atomic_write(ssh_dir, "authorized_keys", data, 0o600, entry.pw_uid, entry.pw_gid)
    finally:
        os.close(ssh_dir)


def failure(argv, code, out):
    """An exit code and the useful end of the output; apt/dnf 'E:' lines first."""
    if code is None:
        return f"{argv[0]}: {out}"
    errors = [
        line.strip()
        for line in out.splitlines()
        if line.startswith(("E: ", "Error: ", "Error:", "No match for argument"))
    ]
    if errors:
        return "\n".join(errors)
    detail = tail(out)
    suffix = f": {detail}" if detail else ""
    return f"{argv[0]} exited {code}{suffix}"


def step_run(step, ctx):
    argv = step["argv"]
    user_group = step.get("user_group")
    if user_group and group_exists(user_group):
        argv = [*argv[:-1], "-g", user_group, argv[-1]]  # useradd: join it, do not make it
    code, out = ctx.run(argv, env=step.get("env"))
    if code != 0:
        raise StepError(failure(argv, code, out))


def group_exists(name):
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def step_daemon_reload(step, ctx):
    """A unit file changed on disk since systemd read it (NeedDaemonReload=yes)."""
    ctx.unit_files_changed = True
    ctx.daemon_reload_if_needed()


def step_service(step, ctx):
    """A service asked again after a package changed in this apply: act only if needed."""
    unit = step["unit"]
    code, out = ctx.run(["systemctl", "show", "-p", SERVICE_PROPERTIES, "--", unit])
    if code != 0:
        raise StepError(f"systemctl show {unit} failed: {tail(out)}")
    props = dict(line.partition("=")[::2] for line in out.splitlines() if "=" in line)
    unit_file, active = props.get("UnitFileState", ""), props.get("ActiveState", "")
    verbs = []
    if step.get("enabled") is True and unit_file not in SERVICE_ENABLED:
        verbs.append("enable")
    if step.get("state") == "running" and active not in SERVICE_RUNNING:
        verbs.append("start")
    if step.get("state") == "stopped" and active in SERVICE_RUNNING:
        verbs.append("stop")
    if step.get("enabled") is False and unit_file in SERVICE_DISABLEABLE:
        verbs.append("disable")
    if not verbs:
        raise Skipped("still as desired")
    for verb in verbs:
        step_run({"argv": ["systemctl", verb, unit]}, ctx)
    return ", ".join(verbs)


class Skipped(Exception):
    """A command's guard says it need not run after all (checked again before running)."""


def step_command(step, ctx):
    run, why = guard(step, ctx, applying=True)
    if not run:
        raise Skipped(why)
    code, out = ctx.run(
        ["/bin/sh", "-c", step["command"]], env=step.get("env"), cwd=step.get("cwd") or "/"
    )
    if code is None:
        raise StepError(out)
    if code != 0:
        detail = tail(out)
        suffix = f": {detail}" if detail else ""
        raise StepError(f"exited {code}{suffix}")
    return why  # the engine shows why a command it had been told to skip ran after all


STEPS = {
    "write": step_write,
    "chmod": step_chmod,
    "chown": step_chown,
    "mkdir": step_mkdir,
    "rmdir": step_rmdir,
    "remove": step_remove,
    "symlink": step_symlink,
    "authorized_keys": step_authorized_keys,
    "run": step_run,
    "command": step_command,
    "daemon_reload": step_daemon_reload,
    "service": step_service,
}


def run_steps(steps, ctx):
    """Run one operation's steps in order; the first failure ends the operation."""
    note = None
    for step in steps:
        try:
            if step.get("systemd"):
                ctx.daemon_reload_if_needed()
            note = STEPS[step["do"]](step, ctx) or note
        except Skipped as why:
            return {"ok": True, "changed": False, "note": f"skipped: {why}"}
        except Exception as exc:
            return {"ok": False, "changed": False, "error": describe(exc)}
    result = {"ok": True, "changed": True}
    if note:
        result["note"] = note
    return result


def run_packages(op, ctx):
    """One package-manager call for every item; on failure, one call per item to say which."""
    items = op["items"]
    env = op.get("env")

    def attempt(specs):
        return ctx.run(op["argv"] + specs, env=env)

    code, out = attempt([spec for _, spec in items])
    if code != 0 and op.get("refresh") and not ctx.refreshed and any(s in out for s in STALE_APT):
        ctx.refreshed = True  # the package lists may be empty or stale: refresh once, retry
        if ctx.run(op["refresh"], env=env)[0] == 0:
            code, out = attempt([spec for _, spec in items])
    if code == 0:
        return {index: {"ok": True, "changed": True} for index, _ in items}
    if len(items) == 1:
        return {
            items[0][0]: {"ok": False, "changed": False, "error": failure(op["argv"], code, out)}
        }
    results = {}
    for index, spec in items:
        code, out = attempt([spec])
        if code == 0:
            results[index] = {"ok": True, "changed": True}
        else:
            results[index] = {
                "ok": False,
                "changed": False,
                "error": failure(op["argv"], code, out),
            }
    return results


def apply(spec, ctx):
    results = {}
    for op in spec["ops"]:
        if op.get("packages"):
            results.update(run_packages(op, ctx))
        else:
            outcome = run_steps(op["steps"], ctx)
            for index in op["ids"]:
                results[index] = outcome
    handlers = []
    try:
        ctx.daemon_reload_if_needed()  # a unit file changed and no service step came after it
    except StepError as exc:
        handlers.append({"name": "systemctl daemon-reload", "ok": False, "error": str(exc)})
    for handler in spec.get("handlers", []):
        due = handler.get("always")  # failed in an earlier pass: still owed
        if not due and not any(
            results.get(index, {}).get("changed") for index in handler["notified_by"]
        ):
            continue
        entry = {"name": handler["name"], "ok": True}
        try:
            ctx.daemon_reload_if_needed()
            step_run(handler, ctx)
        except Exception as exc:
            entry = {"name": handler["name"], "ok": False, "error": describe(exc)}
        handlers.append(entry)
    return {"results": [[index, result] for index, result in results.items()], "handlers": handlers}


def main(data):
    """Read the JSON spec, do the work, print one JSON document on the real stdout."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # nothing a child or a stray print writes can corrupt the answer
    os.umask(0o022)  # sudo may bring 077: new directories must be 0755 whatever it was
    try:
        spec = json.loads(data.decode("utf-8"))
        ctx = Context(spec)
        answer = gather(spec, ctx) if spec["mode"] == "facts" else apply(spec, ctx)
    except Exception as exc:
        answer = {"fatal": describe(exc)}
    out.write(json.dumps(answer))
    out.flush()
