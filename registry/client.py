"""HTTP to one registry: TLS, authentication, retries and one-line errors.

HTTPS with the system CA store (plus a registry's certs.d directory) by default; plain HTTP only for a loopback
registry or with tls_verify=False, and only after HTTPS was refused for a reason other than a bad certificate.
Authentication follows the registry's `WWW-Authenticate` challenge from `GET /v2/`: none, Basic with the stored
credentials, or a Bearer token fetched from the challenge's realm for the request's scope and reused until it
expires. Redirects are followed; httpx drops the Authorization header on a redirect to another origin (blob
storage), so the registry's credentials never reach it. Transient failures (connection errors, 5xx, 429 with
Retry-After) are retried with exponential backoff.
"""
from __future__ import annotations

import base64
import glob
import json
import re
import ssl
import time
from typing import Iterable

import httpx

from store.errors import StoreError

from . import credentials
from .reference import is_loopback

ATTEMPTS = 5
BACKOFF = 0.5  # seconds before the first retry; doubled each time
MAX_WAIT = 30.0  # longest Retry-After honoured
USER_AGENT = "lamina/0.1"
_PARAM_RE = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))')


class RegistryError(StoreError):
    """A registry refused or failed a request; the message is one line and carries no secret."""


class Unauthorized(RegistryError):
    pass


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """'Bearer realm="…",service="…",scope="…"' -> ("bearer", {realm, service, scope})."""
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), {m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
                            for m in _PARAM_RE.finditer(rest)}


def error_text(resp: httpx.Response) -> str:
    """The registry's own words for a failed request (distribution's {"errors": [{code, message}]})."""
    try:
        errs = json.loads(resp.read()[:65536]).get("errors") or []
        parts = [f"{e.get('code', '').lower().replace('_', ' ')}: {e.get('message', '')}".strip(": ") for e in errs]
        if parts:
            return "; ".join(parts)
    except (ValueError, AttributeError, httpx.HTTPError):
        pass
    return f"HTTP {resp.status_code} {resp.reason_phrase}".strip()


def retry_delay(attempt: int, resp: httpx.Response | None = None) -> float:
    if resp is not None:
        ra = resp.headers.get("Retry-After", "")
        if ra.isdigit():
            return min(float(ra), MAX_WAIT)
    return BACKOFF * (2 ** attempt)


def _ssl_context(host: str, cert_dir: str | None, verify: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context()  # the system's CA store
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    dirs = [cert_dir] if cert_dir else [f"/etc/containers/certs.d/{host}", f"/etc/docker/certs.d/{host}"]
    for d in dirs:
        for ca in sorted(glob.glob(f"{d}/*.crt")):
            ctx.load_verify_locations(cafile=ca)
        for cert in sorted(glob.glob(f"{d}/*.cert")):
            ctx.load_cert_chain(cert, cert[: -len(".cert")] + ".key")
    return ctx


class Client:
    """Requests to one registry (host[:port]); thread-safe (httpx's connection pool, tokens under the GIL)."""

    def __init__(self, registry: str, api_host: str | None = None, *, tls_verify: bool = True,
                 cert_dir: str | None = None, creds: tuple[str, str] | None = None) -> None:
        self.registry = registry
        self.host = api_host or registry
        self.tls_verify = tls_verify
        self.creds = creds or credentials.lookup(registry)
        try:
            ctx = _ssl_context(self.host, cert_dir, tls_verify)
        except (OSError, ssl.SSLError) as e:
            raise RegistryError(f"{self.host}: cannot load certificates: {e}") from None
        # Loopback traffic never goes through a proxy named in the environment. Bodies are hashed as sent: no
        # Content-Encoding may come between them and their digests.
        self.http = httpx.Client(verify=ctx, follow_redirects=True, trust_env=not is_loopback(self.host),
                                 timeout=httpx.Timeout(60.0, connect=15.0),
                                 headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
                                 limits=httpx.Limits(max_connections=16, max_keepalive_connections=8))
        self.base: str | None = None
        self.challenge: tuple[str, dict[str, str]] | None = None
        self.tokens: dict[tuple[str, ...], tuple[str, float]] = {}

    def close(self) -> None:
        self.http.close()

    # -- connection and authentication ---------------------------------------------------------------------------
    def ping(self) -> None:
        """GET /v2/: picks the scheme and learns the authentication challenge."""
        if self.base is not None:
            return
        schemes = ["https"]
        if is_loopback(self.host) or not self.tls_verify:
            schemes.append("http")
        for i, scheme in enumerate(schemes):
            url = f"{scheme}://{self.host}/v2/"
            try:
                resp = self._send_retrying(lambda: self.http.build_request("GET", url))
            except RegistryError as e:
                # A plain-HTTP registry answers a TLS hello with garbage; a bad certificate is never a reason to
                # fall back.
                if i + 1 < len(schemes) and isinstance(e.__cause__, httpx.ConnectError) \
                        and "CERTIFICATE_VERIFY_FAILED" not in str(e.__cause__) and "refused" not in str(e.__cause__):
                    continue
                raise
            break
        resp.close()
        if resp.status_code == 401:
            self.challenge = parse_challenge(resp.headers.get("WWW-Authenticate", ""))
        elif resp.status_code != 200:
            raise RegistryError(f"{self.host}: not a registry (GET /v2/ answered {resp.status_code})")
        self.base = f"{scheme}://{self.host}"

    def _basic(self) -> str | None:
        if self.creds is None:
            return None
        return "Basic " + base64.b64encode(f"{self.creds[0]}:{self.creds[1]}".encode()).decode()

    def _auth_header(self, scopes: tuple[str, ...], fresh: bool = False) -> str | None:
        if self.challenge is None:
            return None
        scheme, params = self.challenge
        if scheme == "basic":
            return self._basic()
        if scheme != "bearer" or "realm" not in params:
            raise RegistryError(f"{self.host}: unsupported authentication scheme {scheme!r}")
        cached = self.tokens.get(scopes)
        if cached is not None and not fresh and cached[1] > time.monotonic():
            return "Bearer " + cached[0]
        query = [("scope", s) for s in scopes]
        if params.get("service"):
            query.insert(0, ("service", params["service"]))
        headers = {}
        basic = self._basic()
        if basic:
            headers["Authorization"] = basic
        resp = self._send_retrying(lambda: self.http.build_request("GET", params["realm"], params=query,
                                                                   headers=headers))
        resp.read()
        if resp.status_code in (401, 403):
            raise Unauthorized(f"{self.registry}: " + ("incorrect username or password" if basic else
                                                       "authentication required (lamina login " + self.registry + ")"))
        if resp.status_code != 200:
            raise RegistryError(f"{self.registry}: token server answered {resp.status_code}")
        try:
            body = resp.json()
            token = body.get("token") or body["access_token"]
            ttl = float(body.get("expires_in") or 60)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise RegistryError(f"{self.registry}: token server sent no token") from None
        self.tokens[scopes] = (token, time.monotonic() + max(ttl - 10, 1))
        return "Bearer " + token

    # -- requests ---------------------------------------------------------------------------------------------
    def _send_retrying(self, build, stream: bool = False) -> httpx.Response:
        """Sends build() until it is not a transient failure; the last 5xx/429 answer is returned as it is."""
        for attempt in range(ATTEMPTS):
            try:
                resp = self.http.send(build(), stream=stream)
            except httpx.TransportError as e:
                if attempt + 1 >= ATTEMPTS or isinstance(e, httpx.UnsupportedProtocol):
                    raise RegistryError(f"{self.host}: {_reason(e)}") from e
                if isinstance(e, httpx.ConnectError) and "SSL" in str(e):
                    raise RegistryError(f"{self.host}: {_reason(e)}") from e
                time.sleep(retry_delay(attempt))
                continue
            if (resp.status_code >= 500 or resp.status_code == 429) and attempt + 1 < ATTEMPTS:
                resp.close()
                time.sleep(retry_delay(attempt, resp))
                continue
            return resp
        raise AssertionError("unreachable")

    def request(self, method: str, url: str, scopes: Iterable[str], *, headers: dict | None = None,
                content: bytes | None = None, params: dict | None = None, stream: bool = False) -> httpx.Response:
        """One request (path under the registry, or an absolute URL it gave), authenticated for `scopes`, retried
        when transient. A 401 fetches a new token once (the challenge may ask for more scope)."""
        self.ping()
        if url.startswith("/"):
            url = self.base + url  # type: ignore[operator]
        if params:  # added to the query the registry gave (an upload URL's state), which httpx would replace
            url = str(httpx.URL(url).copy_merge_params(params))
        scopes = tuple(scopes)
        for attempt in range(2):
            auth = self._auth_header(scopes, fresh=attempt > 0)

            def build() -> httpx.Request:
                h = dict(headers or {})
                if auth:
                    h["Authorization"] = auth
                return self.http.build_request(method, url, headers=h, content=content)
            resp = self._send_retrying(build, stream=stream)
            if resp.status_code != 401:
                return resp
            resp.close()
            scheme, params_ = parse_challenge(resp.headers.get("WWW-Authenticate", ""))
            if scheme not in ("basic", "bearer") or (scheme == "basic" and self.creds is None):
                break
            self.challenge = (scheme, params_)
            if params_.get("scope"):  # the registry says which scope it wants (a mount's source repository)
                scopes = tuple(dict.fromkeys((*scopes, *params_["scope"].split(" "))))
        if self.creds is None:
            raise Unauthorized(f"{self.registry}: authentication required (lamina login {self.registry})")
        raise Unauthorized(f"{self.registry}: unauthorized: incorrect username or password, or no access")


def _reason(e: httpx.TransportError) -> str:
    text = str(e) or e.__class__.__name__
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return "TLS certificate not trusted (" + text.split("certificate verify failed:")[-1].strip(" )") + \
            "); use --cert-dir DIR with its CA, or --tls-verify=false"
    return text.splitlines()[0][:200]


def scope(repository: str, actions: str = "pull") -> str:
    return f"repository:{repository}:{actions}"

