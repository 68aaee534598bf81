"""Image references as Docker reads them (distribution/reference): `busybox` is docker.io/library/busybox:latest,
`host:port/repo:tag` names another registry, `repo@sha256:<hex>` pins a manifest digest."""
from __future__ import annotations

import re
from dataclasses import dataclass

from store.errors import BadInput

DOCKER_HUB = "docker.io"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_DOMAIN_RE = re.compile(r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
                        r"|\[[0-9a-fA-F:]+\])(?::[0-9]+)?$")
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class Reference:
    registry: str  # "docker.io", "127.0.0.1:5000"
    repository: str  # "library/busybox"
    tag: str | None
    digest: str | None

    @property
    def ref(self) -> str:
        """What to ask the registry for: the digest when there is one, else the tag."""
        return self.digest or self.tag or "latest"

    @property
    def api_host(self) -> str:
        """The host serving the API (Docker Hub's registry is not at docker.io)."""
        return "registry-1.docker.io" if self.registry == DOCKER_HUB else self.registry

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out

    def with_tag(self, tag: str) -> "Reference":
        return Reference(self.registry, self.repository, tag, None)


def is_loopback(host: str) -> bool:
    """Whether a registry host[:port] is this machine (where plain HTTP is allowed, as Docker allows it)."""
    if host.startswith("["):
        h = host[1:host.find("]")]
    else:
        h = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return h == "localhost" or h.startswith("127.") or h == "::1"


def parse(text: str) -> Reference:
    """Docker's rules; a malformed reference is refused with a one-line error naming it."""
    bad = BadInput(f"invalid reference format: {text!r}")
    rest, digest = text, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not _DIGEST_RE.match(digest):
            raise BadInput(f"invalid digest in reference {text!r} (sha256:<64 hex digits>)")
    tag = None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1:]
        if not _TAG_RE.match(tag):
            raise bad
    first, sep, remainder = rest.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        domain, path = first, remainder
        if not _DOMAIN_RE.match(domain):
            raise bad
    else:
        domain, path = DOCKER_HUB, rest
    if domain == "index.docker.io":
        domain = DOCKER_HUB
    if domain == DOCKER_HUB and "/" not in path:
        path = "library/" + path
    if not _PATH_RE.match(path) or len(domain) + 1 + len(path) > 255:
        raise bad
    if tag is None and digest is None:
        tag = "latest"
    return Reference(domain, path, tag, digest)
