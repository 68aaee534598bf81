"""`lamina pull`: manifest (or index, then the platform's manifest), config, then the layers the store lacks,
downloaded in parallel (6 at a time, as containers/image) and streamed straight into one store import that checks
each blob's digest and size and each layer's DiffID as it reads, and commits the image all or nothing.

A body that breaks off resumes with `Range: bytes=N-` (a registry that ignores it sends the blob again and the first
N bytes are skipped); connection errors, 5xx and 429 are retried by the client (registry/client.py).
"""
from __future__ import annotations

import hashlib
import io
import json
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable

import httpx

from store.archives import CONFIG_TYPES, DOCKER_LIST, DOCKER_MANIFEST, LAYER_TYPES, OCI_INDEX, OCI_MANIFEST, host_arch
from store.errors import BadInput
from store.refs import normalize_ref
from store.root import Store
from store.streamimport import StreamImport

from .blobinfo import BlobInfo
from .client import ATTEMPTS, Client, RegistryError, error_text, retry_delay, scope
from .reference import Reference

MAX_MANIFEST = 4 << 20  # as containers/image: a larger manifest is refused unread
MAX_CONFIG = 4 << 20
PARALLEL = 6
ACCEPT = ", ".join([OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST])
LISTS = (OCI_INDEX, DOCKER_LIST)


@dataclass
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str | None) -> "Platform":
        if not text:
            return cls("linux", host_arch(), "v8" if host_arch() == "arm64" else None)
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise BadInput(f"invalid platform {text!r} (os/arch[/variant])")
        return cls(*parts)  # type: ignore[arg-type]

    def matches(self, p: dict) -> bool:
        if p.get("os") != self.os or p.get("architecture") != self.architecture:
            return False
        default = "v8" if self.architecture == "arm64" else None
        return (p.get("variant") or default) == (self.variant or default) or self.variant is None

    def __str__(self) -> str:
        return "/".join(x for x in (self.os, self.architecture, self.variant) if x)


def read_capped(resp: httpx.Response, limit: int, what: str) -> bytes:
    declared = resp.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise BadInput(f"{what} is {int(declared)} bytes, more than the {limit >> 20} MiB allowed")
    buf = bytearray()
    for chunk in resp.iter_raw():
        buf += chunk
        if len(buf) > limit:
            raise BadInput(f"{what} is more than the {limit >> 20} MiB allowed")
    return bytes(buf)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def compression_of(media_type: str) -> str:
    return "zstd" if media_type.endswith("zstd") else "gzip" if media_type.endswith("gzip") else "none"


class Puller:
    def __init__(self, client: Client, ref: Reference) -> None:
        self.client = client
        self.ref = ref
        self.scopes = [scope(ref.repository, "pull")]

    def _get(self, path: str, headers: dict | None = None) -> httpx.Response:
        return self.client.request("GET", f"/v2/{self.ref.repository}/{path}", self.scopes, headers=headers,
                                   stream=True)

    def manifest(self, ref: str) -> tuple[bytes, str, str]:
        """(bytes, media type, digest) of a manifest, checked against the digest asked for or announced."""
        resp = self._get(f"manifests/{ref}", {"Accept": ACCEPT})
        try:
            if resp.status_code == 404:
                raise RegistryError(f"{self.ref.name}:{ref}: manifest unknown (404)" if ":" not in ref else
                                    f"{self.ref.name}@{ref}: manifest unknown (404)")
            if resp.status_code != 200:
                raise RegistryError(f"{self.ref.name}: manifest {ref}: {error_text(resp)}")
            data = read_capped(resp, MAX_MANIFEST, f"manifest {ref}")
            announced = resp.headers.get("Docker-Content-Digest", "")
            header_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
        finally:
            resp.close()
        digest = sha256(data)
        want = ref if ref.startswith("sha256:") else announced if announced.startswith("sha256:") else None
        if want is not None and digest != want:
            raise BadInput(f"manifest {ref} does not match its digest {want} (got {digest})")
        try:
            doc = json.loads(data)
        except ValueError:
            raise BadInput(f"manifest {ref} is not JSON") from None
        if not isinstance(doc, dict):
            raise BadInput(f"manifest {ref} is not a JSON object")
        media = doc.get("mediaType") or header_type
        if doc.get("schemaVersion") == 1 or "prettyjws" in media or media.endswith("manifest.v1+json") and \
                "docker" in media:
            raise BadInput(f"manifest {ref}: Docker schema 1 manifests are not supported")
        if media not in (*LISTS, OCI_MANIFEST, DOCKER_MANIFEST):
            media = OCI_INDEX if "manifests" in doc else OCI_MANIFEST if "layers" in doc else media
        if media not in (*LISTS, OCI_MANIFEST, DOCKER_MANIFEST):
            raise BadInput(f"manifest {ref}: unsupported media type {media!r}")
        return data, media, digest

    def image_manifest(self, platform: Platform) -> tuple[dict, str]:
        """The image manifest for `platform` (through an index when the reference names one) and its digest."""
        data, media, digest = self.manifest(self.ref.ref)
        for _ in range(3):
            if media not in LISTS:
                return json.loads(data), digest
            entries = json.loads(data).get("manifests") or []
            chosen = next((m for m in entries if isinstance(m, dict) and platform.matches(m.get("platform") or {})),
                          None)
            if chosen is None:
                have = sorted({"/".join(x for x in (p.get("os"), p.get("architecture"), p.get("variant")) if x)
                               for m in entries if isinstance(m, dict) for p in [m.get("platform") or {}]})
                raise BadInput(f"{self.ref}: no image for platform {platform} (has {', '.join(have) or 'none'})")
            if not str(chosen.get("digest", "")).startswith("sha256:"):
                raise BadInput(f"{self.ref}: index entry for {platform} has no sha256 digest")
            data, media, digest = self.manifest(chosen["digest"])
        raise BadInput(f"{self.ref}: indexes nested too deep")

    def config(self, desc: dict) -> bytes:
        digest = desc.get("digest", "")
        resp = self._get(f"blobs/{digest}")
        try:
            if resp.status_code != 200:
                raise RegistryError(f"{self.ref.name}: config {digest}: {error_text(resp)}")
            data = read_capped(resp, MAX_CONFIG, f"config {digest}")
        finally:
            resp.close()
        if sha256(data) != digest:
            raise BadInput(f"config blob {digest} does not match its digest (got {sha256(data)})")
        return data


class Cancelled(Exception):
    pass


class BlobStream(io.RawIOBase):
    """A blob's bytes as a file, read from the registry; a broken-off body is resumed where it stopped."""

    def __init__(self, puller: Puller, digest: str, size: int, cancelled: threading.Event,
                 progress: Callable[[int], None] | None) -> None:
        self.puller = puller
        self.digest = digest
        self.size = size
        self.cancelled = cancelled
        self.progress = progress
        self.pos = 0
        self.resp: httpx.Response | None = None
        self.chunks = iter(())
        self.buf = memoryview(b"")
        self.failures = 0
        self.resumes = 0

    def readable(self) -> bool:
        return True

    def _open(self) -> None:
        headers = {"Range": f"bytes={self.pos}-"} if self.pos else None
        resp = self.puller._get(f"blobs/{self.digest}", headers)
        skip = 0
        if resp.status_code == 206 and self.pos:
            if not resp.headers.get("Content-Range", "").startswith(f"bytes {self.pos}-"):
                resp.close()
                raise RegistryError(f"blob {self.digest}: registry resumed at the wrong offset")
        elif resp.status_code == 200:
            skip = self.pos  # the registry ignored Range: read past what we have
        else:
            text = error_text(resp)
            resp.close()
            if resp.status_code == 404:
                raise RegistryError(f"{self.puller.ref.name}: blob {self.digest} unknown to the registry (404)")
            raise RegistryError(f"{self.puller.ref.name}: blob {self.digest}: {text}")
        self.resp = resp
        self.chunks = resp.iter_raw()  # as received: a chunker would lose its partial chunk on an error
        while skip:
            chunk = next(self.chunks, b"")
            if not chunk:
                break
            skip -= len(chunk)
            if skip < 0:
                self.buf = memoryview(chunk)[len(chunk) + skip:]
                skip = 0

    def _next(self) -> bytes | memoryview:
        while True:
            if self.cancelled.is_set():
                raise Cancelled()
            if self.resp is None:
                self._open()
            if self.buf:
                out, self.buf = self.buf, memoryview(b"")
                return out
            try:
                chunk = next(self.chunks, b"")
            except httpx.TransportError as e:
                chunk, err = b"", e
            else:
                err = None
            if chunk:
                self.failures = 0
                return chunk
            if err is None and self.pos >= self.size:
                return b""
            # Broken off (an error, or an end before the manifest's size): resume from self.pos.
            self.resp.close()
            self.resp = None
            self.failures += 1
            self.resumes += 1
            if self.failures >= ATTEMPTS or self.resumes > 50:
                raise RegistryError(f"{self.puller.ref.name}: blob {self.digest}: connection broken off at byte "
                                    f"{self.pos} of {self.size}" + (f" ({err})" if err else ""))
            time.sleep(retry_delay(self.failures - 1))

    def readinto(self, b) -> int:  # type: ignore[override]
        if self.pos >= self.size:
            return 0
        data = self._next()
        n = min(len(b), len(data), self.size - self.pos)
        b[:n] = data[:n]
        if n < len(data):
            self.buf = memoryview(data)[n:]
        self.pos += n
        if self.progress:
            self.progress(n)
        return n

    def close(self) -> None:
        if self.resp is not None:
            self.resp.close()
            self.resp = None
        super().close()


@dataclass
class PullResult:
    image_id: str
    digest: str  # the manifest's (the platform's, when pulled through an index)
    reference: str
    fetched: int  # layers downloaded
    present: int  # layers the store had


def pull(store: Store, client: Client, ref: Reference, platform: Platform, ui) -> PullResult:
    p = Puller(client, ref)
    manifest, digest = p.image_manifest(platform)
    cdesc = manifest.get("config") or {}
    if cdesc.get("mediaType") not in CONFIG_TYPES:
        raise BadInput(f"{ref}: not a container image (config type {cdesc.get('mediaType')!r})")
    config = p.config(cdesc)
    try:
        diff_ids = json.loads(config)["rootfs"]["diff_ids"]
    except (ValueError, KeyError, TypeError):
        raise BadInput(f"{ref}: config has no rootfs.diff_ids") from None
    layers = manifest.get("layers") or []
    if not isinstance(layers, list) or len(layers) != len(diff_ids):
        raise BadInput(f"{ref}: manifest lists {len(layers)} layers, config {len(diff_ids)} DiffIDs")
    for d in layers:
        if not isinstance(d, dict) or d.get("mediaType") not in LAYER_TYPES:
            raise BadInput(f"{ref}: layer {d.get('digest') if isinstance(d, dict) else d}: unknown media type "
                           f"{d.get('mediaType') if isinstance(d, dict) else None!r}")
        if not isinstance(d.get("size"), int) or d["size"] < 0 or not str(d.get("digest", "")).startswith("sha256:"):
            raise BadInput(f"{ref}: layer descriptor without a sha256 digest and a size")
    tags = [normalize_ref(f"{ref.name}:{ref.tag}")] if ref.tag and not ref.digest else []
    info = BlobInfo(str(store.root))
    imp = StreamImport(store)
    with imp.session():
        todo: dict[str, dict] = {}
        for desc, diff_id in zip(layers, diff_ids):
            if imp.have_layer(diff_id):
                ui.layer_done(desc["digest"], "Already exists")
            else:
                todo.setdefault(diff_id, desc)
        cancelled = threading.Event()

        def fetch(diff_id: str, desc: dict) -> None:
            bar = ui.layer_bar(desc["digest"], desc["size"])
            with BlobStream(p, desc["digest"], desc["size"], cancelled, bar.update) as s:
                imp.add_blob(s, desc["digest"], desc["size"], diff_id)
            bar.close("Pull complete")
            info.record(desc["digest"], diff_id, compression_of(desc["mediaType"]), desc["size"], ref.registry,
                        ref.repository)

        with ThreadPoolExecutor(PARALLEL) as pool:
            futures = [pool.submit(fetch, d, desc) for d, desc in todo.items()]
            try:
                done, _ = wait(futures, return_when=FIRST_EXCEPTION)
                failed = [f.exception() for f in done if f.exception() is not None]
                if failed:
                    cancelled.set()  # the others stop at their next read
                    wait(futures)
                    raise next((e for e in failed if not isinstance(e, Cancelled)), failed[0])
            except BaseException:
                cancelled.set()
                raise
        imp.add_image(config, diff_ids, tags)
        (image_id,) = imp.commit()
    info.close()  # layers not downloaded are not recorded: their blobs were never checked against the DiffID
    return PullResult(image_id, digest, str(ref), len(todo), len(layers) - len(todo))
