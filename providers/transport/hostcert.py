"""OpenSSH host certificates: the check paramiko does not make.

paramiko (5.x) negotiates `*-cert-v01@openssh.com` host key types and verifies the key
exchange with the key inside the certificate, but it checks nothing about the
certificate itself: not who signed it, not its type, principals or validity. A host
that presents any self-made certificate would pass. This module makes the checks
OpenSSH's client makes for a `@cert-authority` line of known_hosts (PROTOCOL.certkeys,
sshconnect.c `check_host_cert`):

- the certificate is signed by a CA key the operator listed for this host's name, and
  the signature verifies over the certificate's bytes (SHA-1 `ssh-rsa` signatures are
  refused, as OpenSSH's default CASignatureAlgorithms does);
- it is a host certificate (type 2), not a user certificate;
- its principals are not empty and include the name connected to (the address);
- now lies in [valid_after, valid_before);
- it carries no critical option (none is defined for host certificates).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

import paramiko
from paramiko.message import Message

__all__ = ["HostCertificate", "host_pattern_matches", "parse_certificate", "problem_with"]

HOST_CERT = 2
_CERT_SUFFIX = "-cert-v01@openssh.com"
# Fields of the certified key, after the nonce, per key type (PROTOCOL.certkeys).
_KEY_FIELDS = {
    "ssh-rsa": ("mpint", "mpint"),
    "ssh-ed25519": ("string",),
    "ecdsa-sha2-nistp256": ("string", "string"),
    "ecdsa-sha2-nistp384": ("string", "string"),
    "ecdsa-sha2-nistp521": ("string", "string"),
}
_WEAK_SIGNATURES = ("ssh-rsa", "ssh-dss")  # SHA-1


@dataclass(frozen=True, slots=True)
class HostCertificate:
    """The parts of an OpenSSH certificate the checks need."""

    key_type: str  # ssh-ed25519, ...
    serial: int
    cert_type: int
    key_id: str
    principals: tuple[str, ...]
    valid_after: int
    valid_before: int
    critical_options: bytes
    signature_key: bytes  # the CA's public key blob
    signature: bytes
    signed: bytes  # everything the signature covers


def parse_certificate(blob: bytes) -> HostCertificate:
    """Parse a certificate blob; raises ValueError if it is not one."""
    try:
        msg = Message(blob)
        cert_type_name = msg.get_text()
        if not cert_type_name.endswith(_CERT_SUFFIX):
            raise ValueError(f"not a certificate ({cert_type_name})")
        base = cert_type_name[: -len(_CERT_SUFFIX)]
        if base.startswith("rsa-sha2-"):
            base = "ssh-rsa"
        if base not in _KEY_FIELDS:
            raise ValueError(f"unsupported certificate type {cert_type_name}")
        msg.get_binary()  # nonce
        for kind in _KEY_FIELDS[base]:
            msg.get_mpint() if kind == "mpint" else msg.get_binary()
        serial = msg.get_int64()
        cert_type = msg.get_int()
        key_id = msg.get_text()
        principals_blob = Message(msg.get_binary())
        valid_after = msg.get_int64()
        valid_before = msg.get_int64()
        critical = msg.get_binary()
        msg.get_binary()  # extensions
        msg.get_binary()  # reserved
        signature_key = msg.get_binary()
        signed = msg.get_so_far()
        signature = msg.get_binary()
        principals = []
        while principals_blob.get_remainder():
            principals.append(principals_blob.get_text())
    except (IndexError, TypeError, UnicodeDecodeError, paramiko.SSHException) as exc:
        raise ValueError(f"malformed certificate ({type(exc).__name__})") from None
    if not signature:
        raise ValueError("malformed certificate (no signature)")
    return HostCertificate(
        key_type=base,
        serial=serial,
        cert_type=cert_type,
        key_id=key_id,
        principals=tuple(principals),
        valid_after=valid_after,
        valid_before=valid_before,
        critical_options=critical,
        signature_key=signature_key,
        signature=signature,
        signed=signed,
    )


def problem_with(
    cert: HostCertificate,
    name: str,
    authorities: Sequence[paramiko.PKey],
    *,
    now: float | None = None,
) -> str | None:
    """Why `cert` does not certify host `name` under one of `authorities` (None: it does)."""
    if cert.cert_type != HOST_CERT:
        return f"it is a user certificate (type {cert.cert_type}), not a host certificate"
    ca = next((key for key in authorities if key.asbytes() == cert.signature_key), None)
    if ca is None:
        return "it is signed by a CA that known_hosts does not list for this host"
    sig = Message(cert.signature)
    algorithm = sig.get_text()
    if algorithm in _WEAK_SIGNATURES:
        return f"its signature uses {algorithm} (SHA-1), which is refused"
    try:
        valid = ca.verify_ssh_sig(cert.signed, Message(cert.signature))
    except Exception:  # a malformed signature is a bad one
        valid = False
    if not valid:
        return "its CA signature does not verify"
    if cert.critical_options:
        return "it carries critical options (none is defined for host certificates)"
    if not cert.principals:
        return "it names no principals (it would be valid for any host)"
    if name.lower() not in (p.lower() for p in cert.principals):
        return f"its principals ({', '.join(cert.principals)}) do not include {name}"
    moment = int(time.time() if now is None else now)
    if moment < cert.valid_after:
        return f"it is not valid before {_when(cert.valid_after)}"
    if moment >= cert.valid_before:
        return f"it expired at {_when(cert.valid_before)}"
    return None


def host_pattern_matches(patterns: str, name: str) -> bool:
    """OpenSSH's `match_hostname`: comma-separated globs (`*`, `?`), `!` negates; a
    negated match wins. `name` is `host` or `[host]:port` as known_hosts files it."""
    matched = False
    for raw in patterns.split(","):
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        if not pattern:
            continue
        regex = re.escape(pattern.lower()).replace(r"\*", ".*").replace(r"\?", ".")
        if re.fullmatch(regex, name.lower()):
            if negate:
                return False
            matched = True
    return matched


def _when(seconds: int) -> str:
    if seconds >= 2**63:
        return "forever"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))
