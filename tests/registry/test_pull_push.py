"""Push and pull against a real registry (Debian's docker-registry, distribution 2.8) on 127.0.0.1, with skopeo
and podman as the other side, and a proxy of our own counting bytes and injecting faults."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time

import httpx
import pytest

from tests.registry.conftest import Fault, layer_tar, oci_layout, sha256

SKOPEO = ["skopeo", "--insecure-policy"]
needs_skopeo = pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed")


def run(*cmd, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=300, **kw)
    assert p.returncode == 0, f"{cmd} exited {p.returncode}: {p.stderr}"
    return p


@pytest.fixture
def bb(lamina, busybox_dir) -> str:
    lamina("import", busybox_dir, "-t", "bb:1", "-c", 'CMD ["/bin/sh"]')
    return "bb:1"


def two_layer_images(lamina, tmp_path) -> tuple[str, str]:
    """'base:1' (one layer) and 'app:1' (that layer plus one more)."""
    base = layer_tar({"base/data.bin": os.urandom(300_000), "base/small": b"base"})
    top = layer_tar({"app/data.bin": os.urandom(200_000)})
    lamina("import", oci_layout(tmp_path / "base", [base]), "-t", "base:1")
    lamina("import", oci_layout(tmp_path / "app", [base, top]), "-t", "app:1")
    return "base:1", "app:1"


def refused(lamina, *args, message: str) -> str:
    """Runs a command that must fail with one `lamina: …` line naming `message`, leaving the store as it was."""
    before = lamina.state()
    r = lamina(*args, check=False)
    assert r.returncode != 0, r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lamina: "), r.stderr
    assert message in lines[0], lines[0]
    assert "Traceback" not in r.stderr
    assert lamina.state() == before
    lamina.assert_clean()
    return lines[0]


def test_round_trip_keeps_image_id_and_diff_ids(lamina, registry, bb, tmp_path):
    ref = f"{registry.host}/roundtrip/bb:1"
    image_id, diff_ids = lamina.image_id(bb), lamina.diff_ids(bb)
    out = lamina("push", bb, ref).stdout.strip().splitlines()
    digest = out[-1].split("@")[1]
    assert out[-1] == f"{ref}@{digest}" and digest.startswith("sha256:")
    lamina("rmi", bb)
    lamina("gc")
    assert lamina("images", "-q").stdout == ""
    r = lamina("pull", ref)
    assert r.stdout.splitlines()[-1] == ref and f"Digest: {digest}" in r.stdout
    assert lamina.image_id(ref) == image_id
    assert lamina.diff_ids(ref) == diff_ids
    lamina.assert_clean()
    # by digest too (nothing downloaded: the layer is stored)
    r = lamina("pull", f"{registry.host}/roundtrip/bb@{digest}")
    assert "1 already present" in r.stdout


def test_second_push_uploads_no_blob_and_quiet_prints_only_the_reference(lamina, registry, proxy_for, bb):
    proxy = proxy_for(registry)
    ref = f"{proxy.host}/again/bb:1"
    first = lamina("push", bb, ref).stdout.splitlines()[-1]
    assert proxy.requests("PUT", "/blobs/uploads/")  # layer and config went up
    proxy.seen.clear()
    r = lamina("push", "-q", bb, ref)
    assert r.stdout.splitlines() == [first] and r.stderr == ""
    assert not proxy.requests("POST") and not proxy.requests("PATCH") and not proxy.requests("PUT", "/blobs/")
    assert proxy.requests("HEAD", "/blobs/")
    # another repository of the same registry: the layer is mounted, not uploaded
    proxy.seen.clear()
    r = lamina("push", bb, f"{proxy.host}/elsewhere/bb:2")
    mounts = [s for s in proxy.requests("POST", "/blobs/uploads/") if "mount=" in s.path]
    assert mounts and all(s.status == 201 for s in mounts) and "Mounted from again/bb" in r.stderr
    assert first.split("@")[1] in r.stdout  # same manifest, same digest


def test_chunked_upload_of_a_layer_larger_than_a_chunk(lamina, registry, proxy_for, tmp_path):
    big = layer_tar({"big.bin": os.urandom(9 << 20)})  # incompressible: > 8 MiB compressed
    lamina("import", oci_layout(tmp_path / "big", [big]), "-t", "big:1")
    proxy = proxy_for(registry)
    lamina("push", "big:1", f"{proxy.host}/big:1")
    patches = proxy.requests("PATCH", "/blobs/uploads/")
    assert len(patches) == 2 and all(s.status == 202 for s in patches)
    lamina("rmi", "big:1")
    lamina("gc")
    lamina("pull", f"{proxy.host}/big:1")
    assert lamina.diff_ids(f"{proxy.host}/big:1") == [sha256(big)]


@needs_skopeo
def test_skopeo_and_podman_read_what_lamina_pushed(lamina, registry, bb, tmp_path):
    for comp in ("gzip", "zstd"):
        ref = f"{registry.host}/to-skopeo/{comp}:1"
        lamina("push", "--compression", comp, bb, ref)
        info = json.loads(run(*SKOPEO, "inspect", "--tls-verify=false", f"docker://{ref}").stdout)
        assert info["Architecture"] and len(info["Layers"]) == 1
        raw = json.loads(run(*SKOPEO, "inspect", "--raw", "--tls-verify=false", f"docker://{ref}").stdout)
        assert raw["layers"][0]["mediaType"].endswith("+" + comp)
        run(*SKOPEO, "copy", "--src-tls-verify=false", f"docker://{ref}", f"oci:{tmp_path}/copy-{comp}:x")
        cfg = json.loads(run(*SKOPEO, "inspect", "--config", f"oci:{tmp_path}/copy-{comp}:x").stdout)
        assert cfg["rootfs"]["diff_ids"] == lamina.diff_ids(bb)
    root, runroot = tmp_path / "podman", tempfile.mkdtemp(prefix="lp-", dir="/tmp")
    podman = ["podman", "--root", str(root), "--runroot", runroot, "--storage-driver", "vfs",
              "--cgroup-manager", "cgroupfs", "--events-backend", "file", "--runtime", "runc"]
    try:
        run(*podman, "pull", "-q", "--tls-verify=false", f"{registry.host}/to-skopeo/gzip:1")
        p = run(*podman, "run", "--rm", "--net", "none", "--ulimit", "nofile=1024:1024",
                "--ulimit", "nproc=1024:1024", f"{registry.host}/to-skopeo/gzip:1", "sh", "-c", "echo hi from $0")
        assert p.stdout.strip() == "hi from sh"
        ids = run(*podman, "images", "--no-trunc", "--format", "{{.ID}}").stdout.split()
        assert lamina.image_id(bb) in ids
    finally:
        subprocess.run([*podman, "system", "reset", "-f"], capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(runroot, ignore_errors=True)


@needs_skopeo
@pytest.mark.parametrize("fmt, comp", [("v2s2", "gzip"), ("oci", "gzip"), ("oci", "zstd")])
def test_lamina_pulls_and_runs_what_skopeo_pushed(lamina, registry, busybox_dir, tmp_path, fmt, comp):
    # a layer of its own per case: skopeo would otherwise reuse the blob it pushed for another case (its blob-info
    # cache), whatever compression is asked for
    shutil.copytree(busybox_dir, tmp_path / "rootfs", symlinks=True)
    (tmp_path / "rootfs/case").write_text(f"{fmt} {comp}\n")
    lamina("import", tmp_path / "rootfs", "-t", "bb:1")
    bb = "bb:1"
    lamina("save", bb, "-o", tmp_path / "bb.tar")
    ref = f"{registry.host}/from-skopeo/{fmt}-{comp}:1"
    run(*SKOPEO, "copy", "--dest-tls-verify=false", "--format", fmt, "--dest-compress-format", comp,
        "--dest-compress", f"oci-archive:{tmp_path}/bb.tar", f"docker://{ref}")
    raw = json.loads(run(*SKOPEO, "inspect", "--raw", "--tls-verify=false", f"docker://{ref}").stdout)
    assert raw["layers"][0]["mediaType"].endswith("tar.gzip" if fmt == "v2s2" else "+" + comp)
    fresh = type(lamina)(tmp_path / "fresh-store", lamina.docker_config)
    fresh("pull", ref)
    assert fresh.image_id(ref) == lamina.image_id(bb)
    try:
        r = fresh("run", "--rm", ref, "sh", "-c", "echo ran $0")
        assert r.stdout.strip() == "ran sh"
    finally:
        from tests.runtime.conftest import sweep
        sweep(fresh.root)
    fresh.assert_clean()


def _put_index(registry, repo: str, entries: list[tuple[str, str, str]], media: str) -> None:
    """An index (OCI) or manifest list (Docker) of `entries` (manifest digest, os, arch) pushed as repo:multi."""
    manifests = []
    for digest, os_, arch in entries:
        r = httpx.get(registry.url(f"/v2/{repo}/manifests/{digest}"),
                      headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
        manifests.append({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest,
                          "size": len(r.content), "platform": {"os": os_, "architecture": arch}})
    index = json.dumps({"schemaVersion": 2, "mediaType": media, "manifests": manifests}).encode()
    r = httpx.put(registry.url(f"/v2/{repo}/manifests/multi"), content=index, headers={"Content-Type": media})
    assert r.status_code == 201, r.text


@pytest.mark.parametrize("media", ["application/vnd.oci.image.index.v1+json",
                                   "application/vnd.docker.distribution.manifest.list.v2+json"])
def test_index_with_two_platforms_picks_the_right_one(lamina, registry, tmp_path, media):
    repo = "multi-" + media.split(".")[-2].split("+")[0]  # multi-index, multi-list
    digests, ids = {}, {}
    for arch in ("amd64", "arm64"):
        lamina("import", oci_layout(tmp_path / arch, [layer_tar({f"{arch}.txt": arch.encode()})], arch=arch),
               "-t", f"m:{arch}")
        ids[arch] = lamina.image_id(f"m:{arch}")
        out = lamina("push", f"m:{arch}", f"{registry.host}/{repo}:{arch}").stdout
        digests[arch] = out.splitlines()[-1].split("@")[1]
    from store.archives import host_arch
    host = host_arch()
    if host not in ids:
        pytest.skip(f"host architecture {host} is neither amd64 nor arm64")
    other = "arm64" if host == "amd64" else "amd64"
    # the host's platform listed second, so that taking the first entry would be wrong
    _put_index(registry, repo, [(digests[other], "linux", other), (digests[host], "linux", host)], media)
    fresh = type(lamina)(tmp_path / "fresh", lamina.docker_config)
    ref = f"{registry.host}/{repo}:multi"
    r = fresh("pull", ref)
    assert f"Digest: {digests[host]}" in r.stdout
    assert fresh.image_id(ref) == ids[host]
    fresh("pull", "--platform", f"linux/{other}", ref)
    assert fresh.image_id(ref) == ids[other]
    msg = refused(fresh, "pull", "--platform", "linux/riscv64", ref, message="no image for platform linux/riscv64")
    assert "linux/amd64" in msg and "linux/arm64" in msg


def test_pull_transfers_only_the_layers_the_store_lacks(lamina, registry, proxy_for, tmp_path):
    base, app = two_layer_images(lamina, tmp_path)
    lamina("push", base, f"{registry.host}/layers/base:1")
    lamina("push", app, f"{registry.host}/layers/app:1")
    manifest = httpx.get(registry.url("/v2/layers/app/manifests/1"),
                         headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}).json()
    base_blob, top_blob = (d["digest"] for d in manifest["layers"])
    proxy = proxy_for(registry)
    fresh = type(lamina)(tmp_path / "fresh", lamina.docker_config)
    fresh("pull", f"{proxy.host}/layers/base:1")
    assert proxy.blob_bytes(base_blob) == manifest["layers"][0]["size"]
    proxy.seen.clear()
    r = fresh("pull", f"{proxy.host}/layers/app:1")
    assert "1 layers pulled, 1 already present" in r.stdout
    assert proxy.blob_bytes(base_blob) == 0
    assert proxy.blob_bytes(top_blob) == manifest["layers"][1]["size"]
    assert fresh.image_id(f"{proxy.host}/layers/app:1") == lamina.image_id(app)
    fresh.assert_clean()


def test_concurrent_pulls_sharing_a_layer_store_it_once(lamina, registry, tmp_path):
    base, app = two_layer_images(lamina, tmp_path)
    lamina("push", base, f"{registry.host}/conc/base:1")
    lamina("push", app, f"{registry.host}/conc/app:1")
    fresh = type(lamina)(tmp_path / "fresh", lamina.docker_config)
    fresh("images")  # creates the store before two processes race to
    procs = [fresh.popen("pull", f"{registry.host}/conc/{n}:1") for n in ("base", "app")]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    df = json.loads(fresh("df", "--format", "json").stdout)
    assert df["layers"] == 2 and df["images"] == 2
    fresh.assert_clean()


# -- faults --------------------------------------------------------------------------------------------------------

@pytest.fixture
def pushed(lamina, registry, tmp_path):
    """An image of one 1 MB incompressible layer in the registry, and its blob's digest; the store left empty."""
    lamina("import", oci_layout(tmp_path / "f", [layer_tar({"f.bin": os.urandom(1 << 20)})]), "-t", "f:1")
    lamina("push", "f:1", f"{registry.host}/faults:1")
    manifest = httpx.get(registry.url("/v2/faults/manifests/1"),
                         headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}).json()
    image_id = lamina.image_id("f:1")
    lamina("rmi", "f:1")
    lamina("gc")
    return manifest["layers"][0]["digest"], image_id


def test_dropped_connection_resumes_with_range(lamina, registry, proxy_for, pushed):
    blob, image_id = pushed
    proxy = proxy_for(registry)
    proxy.faults.append(Fault("GET", f"/blobs/{blob}", "drop"))
    lamina("pull", f"{proxy.host}/faults:1")
    gets = proxy.requests("GET", f"/blobs/{blob}")
    assert len(gets) == 2 and gets[1].status == 206
    start = int(gets[1].headers["Range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < start <= gets[0].sent
    assert lamina.image_id(f"{proxy.host}/faults:1") == image_id
    lamina.assert_clean()


def test_server_errors_are_retried(lamina, registry, proxy_for, pushed):
    blob, image_id = pushed
    proxy = proxy_for(registry)
    proxy.faults += [Fault("GET", f"/blobs/{blob}", "status500", times=2), Fault("GET", "/manifests/", "status500")]
    lamina("pull", f"{proxy.host}/faults:1")
    assert [s.status for s in proxy.requests("GET", f"/blobs/{blob}")] == [500, 500, 200]
    assert lamina.image_id(f"{proxy.host}/faults:1") == image_id


def test_too_many_requests_waits_as_told(lamina, registry, proxy_for, pushed):
    blob, image_id = pushed
    proxy = proxy_for(registry)
    proxy.faults.append(Fault("GET", f"/blobs/{blob}", "status429", arg=2))
    t0 = time.monotonic()
    lamina("pull", f"{proxy.host}/faults:1")
    assert time.monotonic() - t0 >= 2  # Retry-After: 2, not the first backoff of 0.5 s
    assert [s.status for s in proxy.requests("GET", f"/blobs/{blob}")] == [429, 200]


def test_persistent_server_errors_are_refused(lamina, registry, proxy_for, pushed):
    blob, _ = pushed
    proxy = proxy_for(registry)
    proxy.faults.append(Fault("GET", f"/blobs/{blob}", "status500", times=100))
    refused(lamina, "pull", f"{proxy.host}/faults:1", message="500")


def test_corrupted_byte_is_refused(lamina, registry, proxy_for, pushed):
    blob, _ = pushed
    proxy = proxy_for(registry)
    proxy.faults.append(Fault("GET", f"/blobs/{blob}", "corrupt", times=100))
    refused(lamina, "pull", f"{proxy.host}/faults:1", message=f"{blob} does not match its digest")


def test_tampered_blob_in_registry_storage_is_refused(lamina, registry, tmp_path):
    lamina("import", oci_layout(tmp_path / "t", [layer_tar({"t.bin": b"tamper me " * 1000})]), "-t", "t:1")
    lamina("push", "t:1", f"{registry.host}/tampered:1")
    manifest = httpx.get(registry.url("/v2/tampered/manifests/1"),
                         headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}).json()
    path = registry.blob_path(manifest["layers"][0]["digest"])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    lamina("rmi", "t:1")
    lamina("gc")
    refused(lamina, "pull", f"{registry.host}/tampered:1", message="does not match its digest")


def test_missing_manifest_and_oversized_manifest(lamina, registry, proxy_for, pushed):
    refused(lamina, "pull", f"{registry.host}/faults:nope", message="manifest unknown")
    refused(lamina, "pull", f"{registry.host}/never-pushed:1", message="manifest unknown")
    proxy = proxy_for(registry)
    proxy.faults.append(Fault("GET", "/manifests/", "big"))
    refused(lamina, "pull", f"{proxy.host}/faults:1", message="more than the 4 MiB allowed")


def test_bad_references_and_platforms(lamina, registry):
    refused(lamina, "pull", "Not/Valid", message="invalid reference format")
    refused(lamina, "pull", "--platform", "linux", f"{registry.host}/x:1", message="invalid platform")
    refused(lamina, "pull", f"127.0.0.1:{_closed_port()}/x:1", message="127.0.0.1")


def _closed_port() -> int:
    from tests.registry.conftest import free_port
    return free_port()


def test_killed_pull_leaves_nothing_visible(lamina, registry, proxy_for, pushed):
    blob, image_id = pushed
    proxy = proxy_for(registry)
    proxy.faults.append(Fault("GET", f"/blobs/{blob}", "drop", times=100))  # keeps it busy resuming
    p = lamina.popen("pull", f"{proxy.host}/faults:1")
    deadline = time.monotonic() + 60
    while not proxy.requests("GET", f"/blobs/{blob}") and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert lamina("images", "-q").stdout == ""
    lamina.assert_clean()
    objects = [f for f in (lamina.root / "objects").rglob("*") if f.is_file()]
    assert objects == []
    proxy.faults.clear()
    lamina("pull", f"{proxy.host}/faults:1")
    assert lamina.image_id(f"{proxy.host}/faults:1") == image_id


def test_registry_that_keeps_closing_mid_blob_is_refused(lamina, registry, proxy_for, pushed):
    blob, _ = pushed
    proxy = proxy_for(registry)
    proxy.faults.append(Fault("GET", f"/blobs/{blob}", "drop", times=100))
    refused(lamina, "pull", f"{proxy.host}/faults:1", message="connection broken off")


def _upload(registry, repo: str, data: bytes) -> str:
    r = httpx.post(registry.url(f"/v2/{repo}/blobs/uploads/"))
    r = httpx.put(str(r.url.join(r.headers["Location"])) + f"&digest={sha256(data)}", content=data)
    assert r.status_code == 201, r.text
    return sha256(data)


def test_config_whose_diff_id_does_not_match_the_layer_is_refused(lamina, registry, bb):
    lamina("push", bb, f"{registry.host}/wrongdiff:good")
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    manifest = httpx.get(registry.url("/v2/wrongdiff/manifests/good"), headers=accept).json()
    config = httpx.get(registry.url(f"/v2/wrongdiff/blobs/{manifest['config']['digest']}")).json()
    config["rootfs"]["diff_ids"] = [sha256(b"something else")]
    data = json.dumps(config).encode()
    manifest["config"] = {**manifest["config"], "digest": _upload(registry, "wrongdiff", data), "size": len(data)}
    r = httpx.put(registry.url("/v2/wrongdiff/manifests/bad"), content=json.dumps(manifest).encode(),
                  headers={"Content-Type": manifest["mediaType"]})
    assert r.status_code == 201, r.text
    fresh = type(lamina)(lamina.root.parent / "fresh", lamina.docker_config)
    fresh("images")
    refused(fresh, "pull", f"{registry.host}/wrongdiff:bad", message="does not match config")


def test_layers_sharing_contents_pulled_in_parallel_store_them_once(lamina, registry, tmp_path):
    shared_big, shared_small = os.urandom(100_000), b"small and shared"
    layers = [layer_tar({f"l{i}/big": shared_big, f"l{i}/small": shared_small, f"l{i}/own": os.urandom(5000)})
              for i in range(4)]
    lamina("import", oci_layout(tmp_path / "shared", layers), "-t", "shared:1")
    lamina("push", "shared:1", f"{registry.host}/shared:1")
    fresh = type(lamina)(tmp_path / "fresh", lamina.docker_config)
    fresh("pull", f"{registry.host}/shared:1")
    df = json.loads(fresh("df", "--format", "json").stdout)
    assert df["layers"] == 4 and df["objects"] == 2 + 4 + 4  # big, small, each layer's own file and tar skeleton
    assert fresh.image_id(f"{registry.host}/shared:1") == lamina.image_id("shared:1")
    fresh.assert_clean()


def test_no_content_encoding_between_bodies_and_their_digests(lamina, registry, proxy_for, pushed):
    """A front end that gzips what the client accepts (nginx's gzip on) must not be offered it: bodies are hashed
    as they arrive."""
    _, image_id = pushed
    proxy = proxy_for(registry)
    proxy.faults.append(Fault("GET", "/v2/faults/", "gzip", times=100))
    lamina("pull", f"{proxy.host}/faults:1")
    assert lamina.image_id(f"{proxy.host}/faults:1") == image_id
    assert all(s.headers.get("Accept-Encoding") == "identity" for s in proxy.requests("GET"))


def test_push_retries_server_errors(lamina, registry, proxy_for, bb, tmp_path):
    proxy = proxy_for(registry)
    proxy.faults += [Fault("POST", "/blobs/uploads/", "status500"), Fault("PUT", "/blobs/uploads/", "status500", 2),
                     Fault("PUT", "/manifests/", "status429", arg=0)]
    out = lamina("push", bb, f"{proxy.host}/retried:1").stdout
    assert [s.status for s in proxy.requests("PUT", "/manifests/")] == [429, 201]
    assert all(f.times == 0 for f in proxy.faults)
    fresh = type(lamina)(tmp_path / "fresh", lamina.docker_config)
    assert out.splitlines()[-1].split("@")[1] in fresh("pull", f"{registry.host}/retried:1").stdout
    assert fresh.image_id(f"{registry.host}/retried:1") == lamina.image_id(bb)
