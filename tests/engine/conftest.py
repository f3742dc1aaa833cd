"""Registry fixtures: a real registry (Debian's ``docker-registry``, the CNCF
distribution server) per test, with or without authentication, and a
fault-injecting HTTP proxy to put in front of it.

``registry``        no auth
``registry_auth``   htpasswd basic auth (bcrypt from ``htpasswd -Bbn``); ``.user`` / ``.password``
``registry_token``  bearer-token auth: a token server started here issues JWTs
                    (RS256, signed with ``openssl``) that the registry verifies
``registry_factory`` start more (``relative_urls=True`` makes the registry send
                    relative ``Location`` headers)
``fault_proxy``     a :class:`FaultProxy` in front of ``registry``

Each registry listens on 127.0.0.1 with a free port and keeps its storage in
the test's tmp dir; it is stopped by PID (SIGTERM, then SIGKILL) at teardown.
Tests using them are skipped with a reason when the binary is missing.
"""

from __future__ import annotations

import base64
import http.client
import http.server
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REGISTRY_BIN = os.environ.get("LAYERFS_TEST_REGISTRY_BIN", "/usr/bin/docker-registry")
START_TIMEOUT = 15.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _require(binary: str, package: str) -> str:
    path = binary if os.path.isabs(binary) else shutil.which(binary)
    if not path or not os.access(path, os.X_OK):
        pytest.skip(f"{binary} not installed (apt-get install {package}; scripts/setup.sh does)")
    return path


@dataclass
class Registry:
    """A running docker-registry process."""

    host: str  # "127.0.0.1:PORT"
    url: str  # "http://127.0.0.1:PORT"
    port: int
    root: Path  # storage directory
    config: Path
    log: Path
    proc: subprocess.Popen
    user: str | None = None
    password: str | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def creds(self) -> str | None:
        return f"{self.user}:{self.password}" if self.user else None

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        try:
            os.kill(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _q(value) -> str:
    return json.dumps(str(value))  # a JSON string is a valid YAML scalar


def _config_yaml(root: Path, port: int, auth: str, relative_urls: bool) -> str:
    return f"""version: 0.1
log:
  level: info
  formatter: text
storage:
  filesystem:
    rootdirectory: {_q(root)}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: {_q(f"127.0.0.1:{port}")}
  secret: {_q(secrets.token_hex(16))}
  relativeurls: {"true" if relative_urls else "false"}
{auth}"""


def _answers(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        conn.request("GET", "/v2/")
        status = conn.getresponse().status
        conn.close()
        return status in (200, 401)
    except OSError:
        return False


def start_registry(workdir: Path, *, auth: str = "", relative_urls: bool = False, user=None, password=None) -> Registry:
    """Start docker-registry with storage under *workdir*; *auth* is the config's ``auth:`` section."""
    binary = _require(REGISTRY_BIN, "docker-registry")
    workdir.mkdir(parents=True, exist_ok=True)
    root = workdir / "storage"
    root.mkdir(exist_ok=True)
    last = ""
    for attempt in range(3):  # the free port can be taken between probe and bind
        port = free_port()
        config = workdir / "config.yml"
        config.write_text(_config_yaml(root, port, auth, relative_urls))
        log = workdir / f"registry-{attempt}.log"
        with open(log, "wb") as logf:
            proc = subprocess.Popen([binary, "serve", str(config)], stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        reg = Registry(f"127.0.0.1:{port}", f"http://127.0.0.1:{port}", port, root, config, log, proc, user, password)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if _answers(port):
                return reg
            time.sleep(0.02)
        reg.stop()
        last = reg.log_tail()
        if "address already in use" not in last:
            break
    pytest.fail(f"docker-registry did not start; its log ends:\n{last}")


@pytest.fixture
def registry_factory(tmp_path):
    started: list[Registry] = []

    def start(name: str = "registry", **kw) -> Registry:
        reg = start_registry(tmp_path / name, **kw)
        started.append(reg)
        return reg

    yield start
    for reg in started:
        reg.stop()


@pytest.fixture
def registry(registry_factory) -> Registry:
    """A registry without authentication."""
    return registry_factory("registry")


@pytest.fixture
def registry_auth(registry_factory, tmp_path) -> Registry:
    """A registry with htpasswd basic auth; ``.user``, ``.password``, ``.creds``."""
    _require("htpasswd", "apache2-utils")
    user, password = "tester", secrets.token_urlsafe(12)
    out = subprocess.run(["htpasswd", "-Bbn", user, password], check=True, capture_output=True, text=True).stdout
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(out.strip() + "\n")
    auth = f"""auth:
  htpasswd:
    realm: {_q("layerfs-test")}
    path: {_q(htpasswd)}
"""
    return registry_factory("registry-auth", auth=auth, user=user, password=password)


# ------------------------------------------------------------- token server


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """A Docker token-auth server (the ``realm``): GET /token?service=&scope=.

    Authenticated users (basic auth against ``users``) get every action they
    ask for; anonymous requests get ``pull`` on repositories under ``public/``
    only; wrong credentials get 401.  JWTs are RS256, signed by ``openssl``
    with a self-signed certificate the registry trusts (``x5c`` header).
    """

    issuer = "layerfs-test-issuer"
    service = "layerfs-test-registry"

    def __init__(self, workdir: Path, users: dict[str, str]):
        _require("openssl", "openssl")
        self.users = users
        self.key = workdir / "token.key"
        self.cert = workdir / "token.crt"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "2",
             "-subj", "/CN=layerfs-test-token", "-keyout", str(self.key), "-out", str(self.cert)],
            check=True, capture_output=True,
        )
        der = subprocess.run(["openssl", "x509", "-in", str(self.cert), "-outform", "DER"], check=True, capture_output=True).stdout
        self._x5c = base64.b64encode(der).decode()
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 30

            def log_message(self, *args):
                pass

            def do_GET(self):
                server._handle(self)

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.realm = f"http://127.0.0.1:{self.port}/token"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def sign(self, claims: dict) -> str:
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(self.key)], input=signing_input.encode(), check=True, capture_output=True).stdout
        return f"{signing_input}.{_b64url(sig)}"

    def _handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        url = urllib.parse.urlsplit(h.path)
        query = urllib.parse.parse_qs(url.query)
        user = None
        authz = h.headers.get("Authorization", "")
        if authz.startswith("Basic "):
            try:
                u, _, p = base64.b64decode(authz[6:]).decode().partition(":")
            except Exception:
                u, p = "", None
            if self.users.get(u) != p:
                with self._lock:
                    self.requests.append({"user": u, "scopes": query.get("scope", []), "status": 401})
                return self._reply(h, 401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]})
            user = u
        access = []
        for scope in query.get("scope", []):
            for item in scope.split(" "):
                kind, _, rest = item.partition(":")
                name, _, actions = rest.rpartition(":")
                if kind != "repository" or not name:
                    continue
                wanted = [a for a in actions.split(",") if a]
                granted = wanted if user else [a for a in wanted if a == "pull" and name.startswith("public/")]
                if granted:
                    access.append({"type": "repository", "name": name, "actions": granted})
        now = int(time.time())
        token = self.sign({
            "iss": self.issuer, "sub": user or "", "aud": query.get("service", [""])[0],
            "exp": now + 300, "nbf": now - 10, "iat": now, "jti": secrets.token_hex(8), "access": access,
        })
        with self._lock:
            self.requests.append({"user": user, "scopes": query.get("scope", []), "status": 200, "access": access})
        self._reply(h, 200, {"token": token, "access_token": token, "expires_in": 300})

    @staticmethod
    def _reply(h, status: int, doc: dict) -> None:
        body = json.dumps(doc).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


@pytest.fixture
def registry_token(registry_factory, tmp_path):
    """A registry with bearer-token auth; ``.token_server`` is the :class:`TokenServer`."""
    user, password = "tokenuser", secrets.token_urlsafe(12)
    workdir = tmp_path / "token"
    workdir.mkdir()
    _require(REGISTRY_BIN, "docker-registry")
    ts = TokenServer(workdir, {user: password})
    auth = f"""auth:
  token:
    realm: {_q(ts.realm)}
    service: {_q(ts.service)}
    issuer: {_q(ts.issuer)}
    rootcertbundle: {_q(ts.cert)}
"""
    try:
        reg = registry_factory("registry-token", auth=auth, user=user, password=password)
        reg.token_server = ts
        yield reg
    finally:
        ts.stop()


# ------------------------------------------------------------ fault proxy

_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization", "proxy-authenticate"}
_BLOB_GET = re.compile(r"^/v2/.+/blobs/sha256:[0-9a-f]{64}$")
_MANIFEST_GET = re.compile(r"^/v2/.+/manifests/[^/]+$")
PROXY_CHUNK = 64 << 10
PROXY_MAX_BUFFERED = 64 << 20  # bodies without Content-Length are buffered up to this


@dataclass
class FaultProxy:
    """A threaded HTTP proxy on 127.0.0.1 in front of a registry.

    Set ``fault`` to make GETs of ``target`` ("blob" or "manifest") fail:

    ``"500"``      answer 500 with a registry JSON error body, upstream not asked
    ``"cut"``      send the headers and half the body, then close the connection
    ``"short"``    announce and send only half the body (a clean, short response)
    ``"corrupt"``  send the whole body with one byte flipped in the middle
    ``"redirect"`` answer 307 with the registry's own URL (another origin), as
                   registries backed by object storage do
    ``"hold"``     send half of a body over 4 KiB (a layer, not a config), then
                   wait until ``release`` is set before sending the rest

    ``times`` limits how many requests get the fault (None: all); ``strip_range``
    drops Range headers (a server without range support).  ``requests`` records
    (method, path, headers) of everything that passed.
    """

    upstream_port: int
    fault: str | None = None
    target: str = "blob"
    times: int | None = None
    strip_range: bool = False
    redirect_port: int | None = None  # where "redirect" points (default: the upstream)
    requests: list = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    skip: int = 0
    faults_done: int = 0

    def __post_init__(self):
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 30

            def log_message(self, *args):
                pass

            def _any(self):
                proxy._handle(self)

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _any

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def set(self, fault: str | None, *, target: str = "blob", times: int | None = None, strip_range: bool = False, skip: int = 0) -> None:
        """*skip*: let that many matching GETs through first (a pull's first blob GET is its config)."""
        with self._lock:
            self.fault, self.target, self.times, self.strip_range = fault, target, times, strip_range
            self.skip = skip
            self.faults_done = 0

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def count(self, method: str, pattern: str = "") -> int:
        return sum(1 for m, p, _ in list(self.requests) if m == method and re.search(pattern, p))

    def _take_fault(self, method: str, path: str) -> str | None:
        with self._lock:
            if not self.fault or method != "GET":
                return None
            pattern = _BLOB_GET if self.target == "blob" else _MANIFEST_GET
            if not pattern.match(urllib.parse.urlsplit(path).path):
                return None
            if self.skip > 0:
                self.skip -= 1
                return None
            if self.times is not None:
                if self.times <= 0:
                    return None
                self.times -= 1
            self.faults_done += 1
            return self.fault

    @staticmethod
    def _read_request_body(h) -> bytes | None:
        """The whole request body when it is chunked (bounded); None means stream by Content-Length."""
        if "chunked" not in h.headers.get("Transfer-Encoding", "").lower():
            return None
        out = bytearray()
        while True:
            size = int(h.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while h.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return bytes(out)
            out += h.rfile.read(size)
            h.rfile.readline()
            if len(out) > PROXY_MAX_BUFFERED:
                raise ValueError("request body too large for the test proxy")

    def _handle(self, h) -> None:
        method, path = h.command, h.path
        headers = {k: v for k, v in h.headers.items()}
        self.requests.append((method, path, headers))
        fault = self._take_fault(method, path)
        chunked_body = self._read_request_body(h)
        length = int(h.headers.get("Content-Length") or 0) if chunked_body is None else len(chunked_body)
        if fault == "500":
            if chunked_body is None and length:
                h.rfile.read(length)
            body = json.dumps({"errors": [{"code": "UNKNOWN", "message": "injected failure", "detail": None}]}).encode()
            h.send_response(500)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
            return
        if fault == "redirect":
            h.send_response(307)
            h.send_header("Location", f"http://127.0.0.1:{self.redirect_port or self.upstream_port}{path}")
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        up = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=30)
        try:
            up.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for k, v in h.headers.items():
                if k.lower() in _HOP or (self.strip_range and k.lower() == "range"):
                    continue
                if k.lower() == "content-length" and chunked_body is not None:
                    continue
                up.putheader(k, v)
            if chunked_body is not None:
                up.putheader("Content-Length", str(len(chunked_body)))
            up.endheaders()
            if chunked_body is not None:
                up.send(chunked_body)
            else:
                remaining = length
                while remaining > 0:
                    data = h.rfile.read(min(PROXY_CHUNK, remaining))
                    if not data:
                        break
                    up.send(data)
                    remaining -= len(data)
            resp = up.getresponse()
            declared = resp.getheader("Content-Length")
            no_body = method == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200
            body = None
            if not no_body and declared is None:
                body = resp.read(PROXY_MAX_BUFFERED)
                declared = str(len(body))
            total = int(declared or 0)
            send_len = total
            if fault == "short" and not no_body:
                send_len = total // 2
            h.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() in _HOP or k.lower() == "content-length":
                    continue
                h.send_header(k, v)
            if not no_body or declared is not None:
                h.send_header("Content-Length", str(send_len if not no_body else declared))
            h.end_headers()
            if no_body:
                return
            limit = total // 2 if fault in ("cut", "short") else total
            flip_at = total // 2 if fault == "corrupt" else -1
            hold_at = total // 2 if fault == "hold" and total > 4096 else -1
            sent = 0
            while sent < limit:
                if hold_at >= 0 and sent >= hold_at:
                    h.wfile.flush()
                    self.release.wait(60)
                    hold_at = -1
                end = limit if hold_at < 0 else min(limit, max(hold_at, sent + 1))
                if body is not None:
                    data = body[sent:end]
                else:
                    data = resp.read(min(PROXY_CHUNK, end - sent))
                if not data:
                    break
                if sent <= flip_at < sent + len(data):
                    i = flip_at - sent
                    data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
                h.wfile.write(data)
                sent += len(data)
            h.wfile.flush()
            if fault == "cut":
                h.close_connection = True
                try:
                    h.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            elif fault == "short":
                h.close_connection = True
        except (OSError, http.client.HTTPException):
            h.close_connection = True
        finally:
            up.close()


@pytest.fixture
def fault_proxy(registry):
    """A :class:`FaultProxy` in front of ``registry`` (no faults until told)."""
    proxy = FaultProxy(registry.port)
    proxy.registry = registry
    yield proxy
    proxy.stop()


@pytest.fixture
def images(tmp_path):
    """An engine ImageStore on a fresh store; whatever a test left mounted is detached."""
    import layerfs
    from layerfs import _mountapi
    from layerfs.engine.images import ImageStore

    store = layerfs.open_store(tmp_path / "store")
    yield ImageStore(store)
    for point in _mountapi.mounts_under(str(tmp_path)):
        _mountapi.umount(point, _mountapi.MNT_DETACH)
    store.close()
