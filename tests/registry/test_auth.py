"""TLS and authentication against real servers: docker-registry behind TLS with a CA the test makes and basic auth
(htpasswd); the same with bearer tokens from a token server of our own (JWTs the registry verifies); a redirect to
another host for blob storage. Credentials stay in ~/.docker/config.json and out of every output."""
from __future__ import annotations

import base64
import http.server
import json
import os
import stat
import subprocess
import threading
import time
import urllib.parse

import httpx
import pytest

from tests.registry.conftest import PASSWORD, USER, Fault, layer_tar, oci_layout, running


@pytest.fixture
def small(lamina, tmp_path) -> str:
    lamina("import", oci_layout(tmp_path / "img", [layer_tar({"hello.txt": os.urandom(50_000)})]), "-t", "small:1")
    return "small:1"


def login(lamina, reg, password: str = PASSWORD, check: bool = True):
    return lamina("login", "--cert-dir", reg.cert_dir, "-u", USER, "--password-stdin", reg.host,
                  input=password + "\n", check=check)


def no_secret(*texts: str) -> None:
    b64 = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    for t in texts:
        assert PASSWORD not in t and b64 not in t


def test_tls_needs_a_trusted_ca(lamina, tls_registry, small):
    ref = f"{tls_registry.host}/tls/small:1"
    r = lamina("push", small, ref, check=False)
    assert r.returncode != 0 and r.stderr.startswith("lamina: ") and len(r.stderr.splitlines()) == 1
    assert "certificate not trusted" in r.stderr and "--cert-dir" in r.stderr


def test_unauthenticated_is_refused_in_one_line(lamina, tls_registry, small):
    ref = f"{tls_registry.host}/auth/small:1"
    r = lamina("push", "--cert-dir", tls_registry.cert_dir, small, ref, check=False)
    assert r.returncode != 0 and r.stderr == f"lamina: {tls_registry.host}: authentication required " \
                                            f"(lamina login {tls_registry.host})\n"
    before = lamina.state()
    r = lamina("pull", "--cert-dir", tls_registry.cert_dir, ref, check=False)
    assert r.returncode != 0 and "authentication required" in r.stderr and len(r.stderr.splitlines()) == 1
    assert lamina.state() == before
    lamina.assert_clean()


def test_login_push_pull_logout(lamina, tls_registry, small):
    reg = tls_registry
    r = login(lamina, reg, "wrong-password", check=False)
    assert r.returncode != 0 and r.stderr.startswith("lamina: ") and "incorrect username or password" in r.stderr
    assert not (lamina.docker_config / "config.json").exists()
    (lamina.docker_config / "config.json").write_text(json.dumps({"auths": {"other.example": {"auth": "eDp5"}},
                                                                  "credsStore": ""}))
    r = login(lamina, reg)
    assert r.stdout.strip() == "Login Succeeded"
    cfg_file = lamina.docker_config / "config.json"
    cfg = json.loads(cfg_file.read_text())
    assert base64.b64decode(cfg["auths"][reg.host]["auth"]).decode() == f"{USER}:{PASSWORD}"
    assert cfg["auths"]["other.example"] == {"auth": "eDp5"} and "credsStore" in cfg  # the rest is kept
    assert stat.S_IMODE(cfg_file.stat().st_mode) == 0o600
    ref = f"{reg.host}/auth/small:1"
    outs = [lamina("push", "--cert-dir", reg.cert_dir, small, ref)]
    image_id = lamina.image_id(small)
    lamina("rmi", small)
    lamina("gc")
    outs.append(lamina("pull", "--cert-dir", reg.cert_dir, ref))
    outs.append(lamina("inspect", ref))
    assert lamina.image_id(ref) == image_id
    no_secret(*(o.stdout + o.stderr for o in outs))
    assert lamina("logout", reg.host).stdout.strip() == f"Removed login credentials for {reg.host}"
    assert reg.host not in json.loads(cfg_file.read_text())["auths"]
    r = lamina("pull", "--cert-dir", reg.cert_dir, ref, check=False)
    assert r.returncode != 0 and "authentication required" in r.stderr
    assert lamina("logout", reg.host).stdout.strip() == f"Not logged in to {reg.host}"


def test_no_password_option(lamina):
    r = lamina("login", "-p", PASSWORD, "127.0.0.1:1", check=False)
    assert r.returncode != 0 and "No such option" in r.stderr


class _Storage(http.server.BaseHTTPRequestHandler):
    """Blob storage on another origin: serves what the test put in `blobs`, records the headers it was sent."""
    blobs: dict[str, bytes] = {}
    seen: list[dict] = []

    def log_message(self, *a) -> None:
        pass

    def do_GET(self) -> None:
        type(self).seen.append(dict(self.headers.items()))
        data = self.blobs.get(self.path.rsplit("/", 1)[-1])
        self.send_response(200 if data is not None else 404)
        self.send_header("Content-Length", str(len(data or b"")))
        self.end_headers()
        self.wfile.write(data or b"")


def test_redirect_to_blob_storage_does_not_leak_credentials(lamina, tls_registry, proxy_for, small):
    reg = tls_registry
    login(lamina, reg)
    lamina("push", "--cert-dir", reg.cert_dir, small, f"{reg.host}/redirect/small:1")
    auth = (USER, PASSWORD)
    ctx = reg.ssl_context()
    manifest = httpx.get(reg.url("/v2/redirect/small/manifests/1"), auth=auth, verify=ctx,
                         headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}).json()
    blob = manifest["layers"][0]["digest"]
    _Storage.blobs = {blob: httpx.get(reg.url(f"/v2/redirect/small/blobs/{blob}"), auth=auth, verify=ctx).content}
    _Storage.seen = []
    storage = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Storage)
    threading.Thread(target=storage.serve_forever, daemon=True).start()
    try:
        proxy = proxy_for(reg)  # plain HTTP on loopback in front of the TLS registry
        port = storage.server_address[1]
        proxy.faults.append(Fault("GET", f"/blobs/{blob}", "redirect", arg=lambda path: f"http://127.0.0.1:{port}"
                                  f"/storage/{path.rsplit('/', 1)[-1]}"))
        lamina("rmi", small)
        lamina("gc")
        # the proxy's host is another registry name: give it the same credentials
        cfg = json.loads((lamina.docker_config / "config.json").read_text())
        cfg["auths"][proxy.host] = cfg["auths"][reg.host]
        (lamina.docker_config / "config.json").write_text(json.dumps(cfg))
        lamina("pull", f"{proxy.host}/redirect/small:1")
    finally:
        storage.shutdown()
        storage.server_close()
    assert [s.status for s in proxy.requests("GET", f"/blobs/{blob}")] == [307]
    assert proxy.requests("GET", f"/blobs/{blob}")[0].headers.get("Authorization", "").startswith("Basic ")
    assert len(_Storage.seen) == 1 and "Authorization" not in _Storage.seen[0]


# -- bearer tokens -------------------------------------------------------------------------------------------------

def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """Docker's token protocol (docs/spec/auth/token.md): GET realm?service=&scope= with optional Basic auth ->
    {"token": JWT}. Signs RS256 JWTs with openssl, the signing certificate in the x5c header; anonymous callers
    get pull access only."""

    def __init__(self, d, service: str) -> None:
        self.d = d
        self.service = service
        self.requests: list[dict] = []
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "token.key",
                        "-out", "token.pem", "-days", "2", "-subj", "/CN=lamina token issuer"], cwd=d, check=True,
                       capture_output=True)
        der = subprocess.run(["openssl", "x509", "-in", "token.pem", "-outform", "DER"], cwd=d, check=True,
                             capture_output=True).stdout
        self.x5c = base64.b64encode(der).decode()
        server = self

        class H(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a) -> None:
                pass

            def do_GET(self) -> None:
                q = urllib.parse.urlparse(self.path)
                params = urllib.parse.parse_qs(q.query)
                auth = self.headers.get("Authorization", "")
                user = None
                if auth.startswith("Basic "):
                    u, _, p = base64.b64decode(auth[6:]).decode().partition(":")
                    if (u, p) != (USER, PASSWORD):
                        self.send_response(401)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    user = u
                server.requests.append({"scope": params.get("scope", []), "user": user})
                body = json.dumps({"token": server.token(params.get("scope", []), user), "expires_in": 300}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.realm = f"http://127.0.0.1:{self.httpd.server_address[1]}/token"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def token(self, scopes: list[str], user: str | None) -> str:
        access = []
        for s in scopes:
            for one in s.split(" "):
                kind, name, actions = one.split(":")
                granted = [a for a in actions.split(",") if user or a == "pull"]
                access.append({"type": kind, "name": name, "actions": granted})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]}
        claims = {"iss": "lamina-issuer", "sub": user or "", "aud": self.service, "exp": now + 300, "nbf": now - 10,
                  "iat": now, "jti": os.urandom(8).hex(), "access": access}
        signing = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", "token.key"], input=signing.encode(),
                             cwd=self.d, check=True, capture_output=True).stdout
        return f"{signing}.{_b64url(sig)}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory):
    d = tmp_path_factory.mktemp("token-registry")
    ts = TokenServer(d, "lamina-registry")
    auth = {"token": {"realm": ts.realm, "service": "lamina-registry", "issuer": "lamina-issuer",
                      "rootcertbundle": str(d / "token.pem")}}
    try:
        with running(d / "reg", auth=auth) as reg:
            yield reg, ts
    finally:
        ts.close()


def test_bearer_tokens_from_the_challenge_reused_across_requests(lamina, token_registry, small, tmp_path):
    reg, ts = token_registry
    ref = f"{reg.host}/bearer/small:1"
    r = lamina("push", small, ref, check=False)  # anonymous tokens carry pull only
    assert r.returncode != 0 and "authentication required" in r.stderr and len(r.stderr.splitlines()) == 1
    lamina("login", "-u", USER, "--password-stdin", reg.host, input=PASSWORD + "\n")
    ts.requests.clear()
    lamina("push", small, ref)
    # one token for the repository's pull,push scope, reused by every HEAD, POST, PUT of the push
    assert [t["scope"] for t in ts.requests] == [[f"repository:bearer/small:pull,push"]]
    assert all(t["user"] == USER for t in ts.requests)
    lamina("logout", reg.host)
    ts.requests.clear()
    fresh = type(lamina)(tmp_path / "fresh", lamina.docker_config)
    fresh("pull", ref)  # anonymous pull: manifest, config and layer on one token
    assert ts.requests == [{"scope": ["repository:bearer/small:pull"], "user": None}]
    assert fresh.image_id(ref) == lamina.image_id(small)
