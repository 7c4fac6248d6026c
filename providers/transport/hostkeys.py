"""Host keys: the operator's known_hosts (plain, hashed, `@revoked`, `@cert-authority`
lines) and the check of the key a server offers before anything is sent to it: a known
key, a certificate signed by a trusted CA, a fingerprint published for the host (an EC2
tag), or -- only when allowed -- trust on first use, recorded in known_hosts."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hmac
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import paramiko
from paramiko.hostkeys import HostKeyEntry, InvalidHostKey

from providers.atomic import atomic_write
from providers.errors import HostKeyError
from providers.transport.hostcert import host_pattern_matches, parse_certificate, problem_with

if TYPE_CHECKING:
    from providers.transport.ssh import SSHTarget

log = logging.getLogger(__name__)

# A known_hosts "ssh-rsa" key is the same key for both SHA-2 signature algorithms.
_RSA_ALGORITHMS = ("rsa-sha2-512", "rsa-sha2-256")
# Serializes trust-on-first-use writes between the threads of this process; a flock on
# the known_hosts directory serializes them with other processes.
_TOFU_LOCK = threading.Lock()


class HostKeyVerifier:
    """Checks the host key offered by `host`'s server (or its jump host) against
    `known_hosts`; with `trust_on_first_use`, an unknown key is recorded, a changed one
    still refused."""

    def __init__(self, host: str, known_hosts: Path, *, trust_on_first_use: bool) -> None:
        self.host = host
        self.known_hosts = known_hosts
        self.trust_on_first_use = trust_on_first_use

    def check(
        self,
        target: SSHTarget,
        where: str,
        offered: paramiko.PKey,
        known: KnownHosts,
        known_keys: list[paramiko.PKey],
    ) -> None:
        """Refuse a revoked, changed or (unless trust-on-first-use) unknown host key.
        `where` names the target in messages (`address:port`, or the jump host)."""
        path = self.known_hosts
        seen = describe_key(offered)
        if offered.asbytes() in known.revoked:
            raise HostKeyError(
                f"{self.host}: {where} offered host key {seen}, which {path} marks @revoked; "
                "refusing to connect",
                host=self.host,
            )
        if known_keys:
            self._check_known(where, offered, known_keys)
            return
        authorities = known.authorities_for(target.known_hosts_name)
        if authorities:
            self._check_certificate(target, where, offered, authorities, known)
            return
        if target.published_keys:
            if offered.fingerprint not in target.published_keys:
                raise HostKeyError(
                    f"{self.host}: {where} offered host key {seen}, which is not among the "
                    f"fingerprints published for it ({', '.join(target.published_keys)}). "
                    "Nothing was run",
                    host=self.host,
                )
            log.info("%s: host key of %s matches its published fingerprint", self.host, where)
            return
        if not self.trust_on_first_use:
            absent = " (the file does not exist)" if known.missing else ""
            raise HostKeyError(
                f"{self.host}: the host key of {where} is not in known_hosts {path}{absent}; "
                f"the host offered {seen}. Nothing was run. Check that fingerprint with the "
                f"host's owner, then add the key to {path} (or allow trust_on_first_use)",
                host=self.host,
            )
        self._trust_on_first_use(target, where, offered)

    def _check_certificate(
        self,
        target: SSHTarget,
        where: str,
        offered: paramiko.PKey,
        authorities: list[paramiko.PKey],
        known: KnownHosts,
    ) -> None:
        """A host known_hosts names a CA for (`@cert-authority`) must present a host
        certificate that CA signed for the address connected to, valid now. No trust on
        first use here: a host under a CA that cannot prove it is refused."""
        path = self.known_hosts
        blob = offered.public_blob.key_blob if offered.public_blob is not None else None
        if blob is None:
            raise HostKeyError(
                f"{self.host}: {where} offered a plain host key ({describe_key(offered)}), not "
                f"a certificate; {path} trusts only certificates signed by its @cert-authority "
                f"for this host. Nothing was run. Configure sshd with HostCertificate",
                host=self.host,
            )
        try:
            cert = parse_certificate(blob)
            problem = (
                "its CA key is marked @revoked"
                if cert.signature_key in known.revoked
                else problem_with(cert, target.address, authorities)
            )
        except ValueError as exc:
            problem = str(exc)
        if problem is not None:
            raise HostKeyError(
                f"{self.host}: the host certificate of {where} ({describe_key(offered)}) is "
                f"refused: {problem}. Nothing was run",
                host=self.host,
            )
        log.debug(
            "%s: host certificate of %s (id %r, serial %d) verified",
            self.host,
            where,
            cert.key_id,
            cert.serial,
        )

    def _check_known(
        self, where: str, offered: paramiko.PKey, known_keys: list[paramiko.PKey]
    ) -> None:
        if any(key.asbytes() == offered.asbytes() for key in known_keys):
            return
        path = self.known_hosts
        expected = ", ".join(describe_key(k) for k in known_keys)
        raise HostKeyError(
            f"{self.host}: the host key of {where} has CHANGED: {path} has "
            f"{expected}; the host offered {describe_key(offered)}. Refusing to connect (this "
            f"may be a man-in-the-middle). If the host was rebuilt, check the new fingerprint "
            f"with its owner and replace its line in {path}",
            host=self.host,
        )

    def _trust_on_first_use(self, target: SSHTarget, where: str, offered: paramiko.PKey) -> None:
        """Append `offered` to known_hosts, unless another connection recorded one first."""
        path = self.known_hosts.resolve()
        with _TOFU_LOCK, _flocked(path.parent):
            current = KnownHosts.load(path, self.host)
            recorded = current.keys_for(target.known_hosts_name)
            if recorded:  # another connection won the race: that key is now the known one
                self._check_known(where, offered, recorded)
                return
            try:
                text = path.read_text()
                mode = path.stat().st_mode & 0o777
            except FileNotFoundError:
                text, mode = "", 0o644
            if text and not text.endswith("\n"):
                text += "\n"
            line = f"{target.known_hosts_name} {offered.get_name()} {offered.get_base64()}\n"
            atomic_write(path, text + line, mode=mode)
        log.warning(
            "%s: trusted the host key of %s on first use (%s) and recorded it in %s",
            self.host,
            where,
            describe_key(offered),
            path,
        )


class KnownHosts:
    """A known_hosts file: plain and hashed (`|1|salt|hash`) entries, and `@revoked` keys.

    Read and indexed once per change of the file (`cached`), not once per connection: a
    plain name is one dict lookup; a hashed entry is one HMAC (its salt is its own, so each
    is tried), and what a name matched is remembered until the file changes.
    Host patterns with wildcards or negation are not matched for host keys (paramiko does
    not either); they are for `@cert-authority` lines (`@cert-authority *.internal KEY`),
    whose keys are CAs trusted to sign host certificates (`hostcert.py` checks those).
    """

    def __init__(
        self,
        plain: dict[str, list[tuple[int, paramiko.PKey]]],
        hashed: list[tuple[int, bytes, bytes, paramiko.PKey]],
        revoked: frozenset[bytes],
        *,
        missing: bool = False,
        authorities: tuple[tuple[str, paramiko.PKey], ...] = (),
    ) -> None:
        self.authorities = authorities  # (host patterns, CA key)
        self.plain = plain
        self.hashed = hashed  # (line, salt, HMAC-SHA1 of the name, key)
        self.revoked = revoked
        self.missing = missing  # the file does not exist (yet)
        self._found: dict[str, list[paramiko.PKey]] = {}

    @classmethod
    def cached(cls, path: Path, host: str) -> KnownHosts:
        """The index of `path`, read again only when the file changed (or was replaced)."""
        try:
            info = path.stat()
        except FileNotFoundError:
            return cls({}, [], frozenset(), missing=True)
        except OSError as exc:
            raise HostKeyError(
                f"{host}: cannot read known_hosts {path}: {exc.strerror}", host=host
            ) from exc
        # Stat before reading: a change after the stat gives a new signature next time.
        signature = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
        with _INDEX_LOCK:
            found = _INDEX.get(path)
            if found is not None and found[0] == signature:
                return found[1]
            index = cls.load(path, host)
            _INDEX[path] = (signature, index)
            return index

    @classmethod
    def load(cls, path: Path, host: str) -> KnownHosts:
        """Read and index `path` now."""
        plain: dict[str, list[tuple[int, paramiko.PKey]]] = {}
        hashed: list[tuple[int, bytes, bytes, paramiko.PKey]] = []
        revoked: set[bytes] = set()
        authorities: list[tuple[str, paramiko.PKey]] = []
        try:
            text = path.read_text()
        except FileNotFoundError:  # nothing is known yet: every key is unknown
            return cls({}, [], frozenset(), missing=True)
        except OSError as exc:
            raise HostKeyError(
                f"{host}: cannot read known_hosts {path}: {exc.strerror}", host=host
            ) from exc
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            marker = ""
            if line.startswith("@"):
                marker, _, line = line.partition(" ")
                line = line.lstrip()
            try:
                entry = HostKeyEntry.from_line(line, number)
            except (InvalidHostKey, paramiko.SSHException):
                entry = None
            if entry is None:  # as OpenSSH does: skip what cannot be read, keep the rest
                log.warning("%s: %s line %d is not a host key entry; ignored", host, path, number)
            elif marker == "@revoked":
                revoked.add(entry.key.asbytes())
            elif marker == "@cert-authority":
                authorities.append((",".join(entry.hostnames), entry.key))
            elif not marker:
                for listed in entry.hostnames:
                    if not listed.startswith("|1|"):
                        plain.setdefault(listed, []).append((number, entry.key))
                    elif salted := _salt_and_hash(listed):
                        hashed.append((number, *salted, entry.key))
        return cls(plain, hashed, frozenset(revoked), authorities=tuple(authorities))

    def authorities_for(self, name: str) -> list[paramiko.PKey]:
        """The CA keys trusted to certify `name` (`[address]:port` off port 22); a CA
        marked @revoked is not one."""
        return [
            key
            for patterns, key in self.authorities
            if key.asbytes() not in self.revoked and host_pattern_matches(patterns, name)
        ]

    def keys_for(self, name: str) -> list[paramiko.PKey]:
        """Every key listed for `name` (a host may have several), in file order."""
        found = self._found.get(name)
        if found is None:
            wanted = name.encode()
            matches = list(self.plain.get(name, ()))
            matches += [
                (number, key)
                for number, salt, digest, key in self.hashed
                if hmac.compare_digest(hmac.digest(salt, wanted, "sha1"), digest)
            ]
            found = [key for _, key in sorted(matches, key=lambda match: match[0])]
            self._found[name] = found
        return list(found)


# One index per known_hosts file, with the stat signature it was read at.
_INDEX: dict[Path, tuple[tuple[int, ...], KnownHosts]] = {}
_INDEX_LOCK = threading.Lock()


def _salt_and_hash(listed: str) -> tuple[bytes, bytes] | None:
    """The salt and HMAC of a hashed name `|1|salt|hmac` (OpenSSH's HashKnownHosts)."""
    parts = listed.split("|")
    if len(parts) != 4:
        return None
    try:
        salt, digest = base64.b64decode(parts[2]), base64.b64decode(parts[3])
    except ValueError:
        return None
    if len(salt) != 20 or len(digest) != 20:  # what paramiko's hash_host accepts
        return None
    return salt, digest


def prefer_key_types(wire: paramiko.Transport, known_keys: list[paramiko.PKey]) -> None:
    """Ask for a key type known_hosts has, so a host with several keys shows a known one."""
    wanted: list[str] = []
    for key in known_keys:
        wanted.extend(_RSA_ALGORITHMS if key.get_name() == "ssh-rsa" else (key.get_name(),))
    options = wire.get_security_options()
    first = [name for name in dict.fromkeys(wanted) if name in options.key_types]
    if first:
        options.key_types = (*first, *(k for k in options.key_types if k not in first))


def prefer_certificates(wire: paramiko.Transport) -> None:
    """Ask for a host certificate first (paramiko lists them after plain keys, and a server
    picks the first type of ours it has); a plain key stays possible, to be refused with
    a clear message rather than a failed negotiation."""
    options = wire.get_security_options()
    plain = tuple(options.key_types)
    certs = tuple(f"{name}-cert-v01@openssh.com" for name in plain)
    options.key_types = (*certs, *plain)


def describe_key(key: paramiko.PKey) -> str:
    """`ssh-ed25519 SHA256:...`: the type and fingerprint, as `ssh-keygen -l` shows it."""
    return f"{key.get_name()} {key.fingerprint}"


@contextlib.contextmanager
def _flocked(directory: Path) -> Iterator[None]:
    """Hold an exclusive flock on `directory` (the known_hosts file itself gets replaced)."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
