"""Docker's reference rules (distribution/reference), as `lamina pull` and `lamina push` read them."""
from __future__ import annotations

import pytest

from registry.reference import is_loopback, parse
from store.errors import BadInput

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize("text, registry, repo, tag, digest", [
    ("busybox", "docker.io", "library/busybox", "latest", None),
    ("busybox:1.36", "docker.io", "library/busybox", "1.36", None),
    ("docker.io/busybox", "docker.io", "library/busybox", "latest", None),
    ("index.docker.io/library/busybox:x", "docker.io", "library/busybox", "x", None),
    ("user/app", "docker.io", "user/app", "latest", None),
    ("localhost/app", "localhost", "app", "latest", None),
    ("localhost:5000/a/b/c:v1", "localhost:5000", "a/b/c", "v1", None),
    ("127.0.0.1:5000/bb:1", "127.0.0.1:5000", "bb", "1", None),
    ("ghcr.io/org/img", "ghcr.io", "org/img", "latest", None),
    (f"busybox@{D}", "docker.io", "library/busybox", None, D),
    (f"host.example:443/a:t@{D}", "host.example:443", "a", "t", D),
])
def test_parse(text, registry, repo, tag, digest):
    r = parse(text)
    assert (r.registry, r.repository, r.tag, r.digest) == (registry, repo, tag, digest)
    assert r.ref == (digest or tag)


def test_docker_hub_api_host_and_string_form():
    r = parse("busybox")
    assert r.api_host == "registry-1.docker.io"
    assert str(r) == "docker.io/library/busybox:latest"
    assert parse("127.0.0.1:5000/bb").api_host == "127.0.0.1:5000"


@pytest.mark.parametrize("text", ["", "UPPER", "a//b", "a:", "-a", "a@sha256:12", "a@md5:" + "0" * 32,
                                  "a:" + "t" * 129, "host:port/a", "a/b:c:d"])
def test_malformed_references_are_refused(text):
    with pytest.raises(BadInput):
        parse(text)


@pytest.mark.parametrize("host, loop", [("127.0.0.1:5000", True), ("localhost", True), ("localhost:1", True),
                                        ("[::1]:5000", True), ("127.9.9.9", True), ("10.0.0.1:5000", False),
                                        ("docker.io", False), ("localhost.example.com", False)])
def test_loopback(host, loop):
    assert is_loopback(host) == loop
