"""An HTTPS Git server for tests: `git http-backend` (smart HTTP) behind `http.server` + `ssl`.

    with GitHttpServer(project_root) as server:      # serves every repo under project_root
        url = server.url("repo.git")                  # https://127.0.0.1:PORT/repo.git
        ca = server.ca_bundle                         # PEM of the CA that signed the cert

A CA and a server certificate for 127.0.0.1/localhost are generated per server (with
`cryptography`). With `credentials=("user", "secret")` every request needs that HTTP Basic
auth, as a private Git host would. It serves from a thread on 127.0.0.1 and shuts that
thread down when the `with` block ends.
"""

from __future__ import annotations

import base64
import datetime
import hmac
import ipaddress
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.service import TestService

BACKEND_TIMEOUT = 30.0  # seconds for one `git http-backend` request
SOCKET_TIMEOUT = 10.0


def _git_exec_path() -> Path:
    out = subprocess.run(
        ["git", "--exec-path"], check=True, capture_output=True, text=True, timeout=10
    )
    return Path(out.stdout.strip())


def make_ca_and_cert(directory: Path) -> tuple[Path, Path, Path]:
    """(ca.pem, server.pem, server.key) for 127.0.0.1 and localhost, valid for a day."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gitops-agent test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = (
        directory / "ca.pem",
        directory / "server.pem",
        directory / "server.key",
    )
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return ca_path, cert_path, key_path


class _GitHandler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"  # one request per connection: simple and enough for tests
    timeout = SOCKET_TIMEOUT

    def setup(self) -> None:
        # TLS handshake here, in the request's thread: a client that rejects the certificate
        # fails this connection only, and quietly.
        self.request = self.server.tls.wrap_socket(self.request, server_side=True)
        super().setup()

    def do_GET(self) -> None:
        self._serve(b"")

    def do_POST(self) -> None:
        self._serve(self._read_body())

    def log_message(self, format: str, *args: object) -> None:
        self.server.requests.append(f"{self.command} {self.path}")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # CRLF after each chunk
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _authorized(self) -> bool:
        if self.server.credentials is None:
            return True
        user, password = self.server.credentials
        expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        return hmac.compare_digest(self.headers.get("Authorization", ""), expected)

    def _serve(self, body: bytes) -> None:
        if not self._authorized():
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="git"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        path, _, query = self.path.partition("?")
        env = {
            "PATH": "/usr/bin:/bin",
            "GIT_PROJECT_ROOT": str(self.server.project_root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "GATEWAY_INTERFACE": "CGI/1.1",
            "SERVER_PROTOCOL": "HTTP/1.0",
            "REQUEST_METHOD": self.command,
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_ADDR": self.client_address[0],
            "REMOTE_USER": self.server.credentials[0] if self.server.credentials else "",
        }
        for header, var in (
            ("Content-Encoding", "HTTP_CONTENT_ENCODING"),
            ("Git-Protocol", "GIT_PROTOCOL"),
        ):
            if self.headers.get(header):
                env[var] = self.headers[header]
        try:
            result = subprocess.run(
                [str(self.server.backend)],
                input=body,
                env=env,
                capture_output=True,
                timeout=BACKEND_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            self.send_error(504, "git http-backend timed out")
            return
        head, sep, payload = result.stdout.partition(b"\r\n\r\n")
        if not sep:
            head, sep, payload = result.stdout.partition(b"\n\n")
        status, headers = 200, []
        for line in head.decode("latin-1").splitlines():
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.strip().split()[0])
            elif name:
                headers.append((name, value.strip()))
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        project_root: Path,
        tls: ssl.SSLContext,
        credentials: tuple[str, str] | None,
    ) -> None:
        super().__init__(("127.0.0.1", 0), _GitHandler)
        self.project_root = project_root
        self.tls = tls
        self.credentials = credentials
        self.backend = _git_exec_path() / "git-http-backend"
        self.requests: list[str] = []
        self.errors: list[str] = []

    def handle_error(self, request: object, client_address: tuple[str, int]) -> None:
        self.errors.append(repr(sys.exc_info()[1]))  # e.g. a client that rejected our cert


class GitHttpServer(TestService):
    """Serves the bare repos under `project_root` over HTTPS on 127.0.0.1, in a thread."""

    def __init__(self, project_root: Path, *, credentials: tuple[str, str] | None = None) -> None:
        self.project_root = Path(project_root)
        self.credentials = credentials
        self.ca_bundle = Path()
        self.port = 0
        self._dir: Path | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="git-https-"))
        self.ca_bundle, cert, key = make_ca_and_cert(self._dir)
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(cert, key)
        self._server = _Server(self.project_root, tls, self.credentials)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"git-https-{self.port}",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()  # returns once serve_forever has left its loop
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def url(self, repo: str, *, userinfo: str = "") -> str:
        """`https://[USERINFO@]127.0.0.1:PORT/REPO`."""
        at = f"{userinfo}@" if userinfo else ""
        return f"https://{at}127.0.0.1:{self.port}/{repo.lstrip('/')}"

    @property
    def requests(self) -> list[str]:
        return list(self._server.requests) if self._server else []

    @property
    def errors(self) -> list[str]:
        return list(self._server.errors) if self._server else []
