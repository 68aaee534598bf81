"""Fixtures for the registry tests: Debian's docker-registry (distribution 2.8) on 127.0.0.1, plain or behind TLS
with basic auth (a CA and an htpasswd file the fixture makes), a fault-injecting proxy of our own in front of it,
images made as OCI layouts, and a `lamina` runner with its own store and Docker config directory."""
from __future__ import annotations

import hashlib
import http.client
import http.server
import io
import json
import os
import shutil
import socket
import ssl
import subprocess
import tarfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.conftest import BIN

REGISTRY = shutil.which("docker-registry")
USER, PASSWORD = "tester", "s3cret-Pa55word-xyz"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Lamina:
    root: Path
    docker_config: Path

    def __call__(self, *args, check: bool = True, input: str | None = None, timeout: float = 300
                 ) -> subprocess.CompletedProcess:
        env = dict(os.environ, LAMINA_ROOT=str(self.root), DOCKER_CONFIG=str(self.docker_config))
        p = subprocess.run([str(BIN / "lamina"), *map(str, args)], env=env, capture_output=True, text=True,
                           timeout=timeout, input=input, stdin=None if input is not None else subprocess.DEVNULL)
        if check and p.returncode != 0:
            raise AssertionError(f"lamina {' '.join(map(str, args))} exited {p.returncode}: {p.stderr}")
        return p

    def popen(self, *args) -> subprocess.Popen:
        env = dict(os.environ, LAMINA_ROOT=str(self.root), DOCKER_CONFIG=str(self.docker_config))
        return subprocess.Popen([str(BIN / "lamina"), *map(str, args)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)

    def image_id(self, name: str) -> str:
        return json.loads(self("inspect", name).stdout)[0]["Id"]

    def diff_ids(self, name: str) -> list[str]:
        return json.loads(self("inspect", name).stdout)[0]["RootFS"]["Layers"]

    def state(self) -> tuple:
        """What must not change when a command is refused: images and tags, layers, stored objects."""
        objects = sorted(str(p.relative_to(self.root)) for p in (self.root / "objects").rglob("*") if p.is_file()) \
            if (self.root / "objects").exists() else []
        return self("images", "--format", "json").stdout, objects

    def assert_clean(self) -> None:
        r = self("fsck", check=False)
        assert r.returncode == 0 and " 0 problems" in r.stdout, r.stdout + r.stderr
        assert not any((self.root / "tmp").iterdir()), "staging left behind"


@pytest.fixture
def lamina(tmp_path) -> Lamina:
    (tmp_path / "docker-config").mkdir()
    return Lamina(tmp_path / "store", tmp_path / "docker-config")


@dataclass
class Registry:
    host: str
    storage: Path
    proc: subprocess.Popen
    cert_dir: Path | None = None

    def blob_path(self, digest: str) -> Path:
        hexd = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.cert_dir is None:
            return None
        return ssl.create_default_context(cafile=str(self.cert_dir / "ca.crt"))

    def url(self, path: str) -> str:
        return f"{'https' if self.cert_dir else 'http'}://{self.host}{path}"


def make_ca(d: Path) -> Path:
    """A CA and a server certificate for 127.0.0.1 signed by it; returns the directory to give as --cert-dir."""
    d.mkdir()
    run = lambda *a: subprocess.run(["openssl", *a], check=True, capture_output=True, cwd=d)  # noqa: E731
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=lamina test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=127.0.0.1")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf")
    certs = d / "certs.d"
    certs.mkdir()
    shutil.copy(d / "ca.pem", certs / "ca.crt")
    return certs


def start_registry(base: Path, tls: bool = False, auth: dict | None = None) -> Registry:
    base.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cfg = {"version": 0.1, "log": {"level": "error", "accesslog": {"disabled": True}},
           "storage": {"filesystem": {"rootdirectory": str(base / "data")}, "delete": {"enabled": True}},
           "http": {"addr": f"127.0.0.1:{port}", "secret": "lamina-tests"}}
    cert_dir = None
    if tls:
        cert_dir = make_ca(base / "ca")
        cfg["http"]["tls"] = {"certificate": str(base / "ca/server.pem"), "key": str(base / "ca/server.key")}
        subprocess.run(["htpasswd", "-niB", USER], input=PASSWORD + "\n", text=True, check=True,
                       stdout=open(base / "htpasswd", "w"), stderr=subprocess.DEVNULL)
        cfg["auth"] = {"htpasswd": {"realm": "lamina-tests", "path": str(base / "htpasswd")}}
    if auth is not None:
        cfg["auth"] = auth
    (base / "config.yml").write_text(json.dumps(cfg))  # JSON is YAML
    log = open(base / "registry.log", "w")
    proc = subprocess.Popen([REGISTRY, "serve", str(base / "config.yml")], stdout=log, stderr=subprocess.STDOUT)
    reg = Registry(f"127.0.0.1:{port}", base / "data", proc, cert_dir)
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("docker-registry did not start: " + (base / "registry.log").read_text()[-2000:])
            time.sleep(0.05)
    return reg


def stop(reg: Registry) -> None:
    reg.proc.terminate()
    try:
        reg.proc.wait(10)
    except subprocess.TimeoutExpired:
        reg.proc.kill()
        reg.proc.wait()


@contextmanager
def running(base: Path, **kw) -> Iterator[Registry]:
    """A registry (see start_registry) for the length of the block; the test is skipped without docker-registry."""
    if REGISTRY is None:
        pytest.skip("docker-registry is not installed (scripts/setup.sh)")
    reg = start_registry(base, **kw)
    try:
        yield reg
    finally:
        stop(reg)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    with running(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory):
    with running(tmp_path_factory.mktemp("tls-registry"), tls=True) as reg:
        yield reg


# -- images ------------------------------------------------------------------------------------------------------

def layer_tar(files: dict[str, bytes], mtime: int = 1_700_000_000) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        dirs = sorted({"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)})
        for d in dirs:
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, mtime
            tf.addfile(ti)
        for path, data in files.items():
            ti = tarfile.TarInfo(path)
            ti.size, ti.mode, ti.mtime = len(data), 0o755, mtime
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def oci_layout(d: Path, layers: list[bytes], arch: str = "amd64", cmd: list[str] | None = None) -> Path:
    """An OCI layout directory holding one image of uncompressed `layers` (for `lamina import`)."""
    blobs = d / "blobs/sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> str:
        digest = sha256(data)
        (blobs / digest[7:]).write_bytes(data)
        return digest
    diff_ids = [put(layer) for layer in layers]
    config = json.dumps({"architecture": arch, "os": "linux", "created": "2024-01-01T00:00:00Z",
                         "config": {"Cmd": cmd or ["/bin/sh"], "Env": ["PATH=/bin"]},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": put(config), "size": len(config)},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": dg,
                                       "size": len(layer)} for dg, layer in zip(diff_ids, layers)]}).encode()
    (d / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (d / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": put(manifest),
         "size": len(manifest)}]}))
    return d


# -- the fault proxy -----------------------------------------------------------------------------------------------

@dataclass
class Seen:
    method: str
    path: str
    status: int
    sent: int  # body bytes sent to the client
    headers: dict


@dataclass
class Fault:
    """Applies `action` to the next `times` requests whose method and path match."""
    method: str
    path_contains: str
    action: str  # drop | corrupt | status500 | status429 (Retry-After: arg) | big | redirect (to arg(path)) | gzip
    times: int = 1
    arg: object = None


@dataclass
class Proxy:
    port: int
    upstream: Registry
    faults: list[Fault] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    server: http.server.ThreadingHTTPServer | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def blob_bytes(self, digest: str) -> int:
        return sum(s.sent for s in self.seen if s.method == "GET" and s.path.endswith(f"/blobs/{digest}"))

    def requests(self, method: str, contains: str = "") -> list[Seen]:
        return [s for s in self.seen if s.method == method and contains in s.path]


def _handler(proxy: Proxy):
    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a) -> None:
            pass

        def _fault(self) -> Fault | None:
            for f in proxy.faults:
                if f.times > 0 and f.method == self.command and f.path_contains in self.path:
                    f.times -= 1
                    return f
            return None

        def _forward(self) -> None:
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n) if n else None
            fault = self._fault()
            headers = {k: v for k, v in self.headers.items()}
            if fault is not None and fault.action == "status500":
                return self._reply(500, {"Content-Type": "text/plain"}, b"injected\n")
            if fault is not None and fault.action == "status429":
                return self._reply(429, {"Retry-After": str(fault.arg)}, b"slow down\n")
            if fault is not None and fault.action == "redirect":
                return self._reply(307, {"Location": fault.arg(self.path)}, b"")
            up = proxy.upstream
            if up.cert_dir:
                conn = http.client.HTTPSConnection(up.host, context=up.ssl_context(), timeout=60)
            else:
                conn = http.client.HTTPConnection(up.host, timeout=60)
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                out = {k: v for k, v in resp.getheaders() if k.lower() not in ("transfer-encoding", "connection")}
                status = resp.status
            finally:
                conn.close()
            if fault is not None and fault.action == "corrupt" and len(data) > 100:
                data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
            if fault is not None and fault.action == "gzip" and "gzip" in self.headers.get("Accept-Encoding", ""):
                import gzip
                data = gzip.compress(data)  # as a web server with gzip on would, when the client accepts it
                out["Content-Encoding"] = "gzip"
            if fault is not None and fault.action == "big":
                data = b'{"schemaVersion":2,"pad":"' + b"x" * (5 << 20) + b'"}'
                out.pop("Docker-Content-Digest", None)
                out.pop("Content-Length", None)
            if fault is not None and fault.action == "drop":
                out["Content-Length"] = str(len(data))
                self.send_response(status)
                for k, v in out.items():
                    self.send_header(k, v)
                self.end_headers()
                half = data[: len(data) // 2]
                self.wfile.write(half)
                self.wfile.flush()
                proxy.seen.append(Seen(self.command, self.path, status, len(half), headers))
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self._reply(status, out, data, headers)

        def _reply(self, status: int, out: dict, data: bytes, headers: dict | None = None) -> None:
            out = {k: v for k, v in out.items() if k.lower() != "content-length"}
            self.send_response(status)
            for k, v in out.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            proxy.seen.append(Seen(self.command, self.path, status, 0 if self.command == "HEAD" else len(data),
                                   headers or dict(self.headers.items())))

        do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _forward
    return H


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # a client that went away (a killed pull) is no failure of the proxy


@pytest.fixture
def proxy_for() -> Callable[[Registry], Proxy]:
    made: list[Proxy] = []

    def make(upstream: Registry) -> Proxy:
        p = Proxy(0, upstream)
        p.server = _Server(("127.0.0.1", 0), _handler(p))
        p.port = p.server.server_address[1]
        threading.Thread(target=p.server.serve_forever, daemon=True).start()
        made.append(p)
        return p
    yield make
    for p in made:
        p.server.shutdown()
        p.server.server_close()
