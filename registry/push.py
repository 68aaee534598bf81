"""`lamina push`: each layer compressed as it is rebuilt from the store (gzip, or zstd) and uploaded unless the
registry has it already (HEAD, by the digest the blob-info cache remembers) or can mount it from another repository
of the same registry (`POST …/blobs/uploads/?mount=&from=`); then the config, then the manifest (OCI), whose
digest is returned. A blob that fits one chunk goes up in one request (POST, then PUT ?digest= with the body);
larger ones in PATCH chunks with Content-Range, closed by PUT ?digest=.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import struct
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import httpx
import zstandard

from store.errors import BadInput, Corrupt
from store.export import OCI_CONFIG, OCI_MANIFEST, layer_bytes
from store.reader import Image
from store.root import Store

from .blobinfo import BlobInfo
from .client import Client, RegistryError, error_text, scope
from .pull import PARALLEL, sha256
from .reference import Reference

CHUNK = 8 << 20
MEDIA = {"gzip": "application/vnd.oci.image.layer.v1.tar+gzip", "zstd": "application/vnd.oci.image.layer.v1.tar+zstd"}


GZIP_LEVEL = 6
GZIP_BLOCK = 1 << 20
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # deflate, no name, mtime 0, OS unknown


def _deflate_block(block: bytes, zdict: bytes, last: bool) -> bytes:
    c = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -15, zdict=zdict) if zdict else \
        zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -15)
    return c.compress(block) + c.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


def parallel_gzip(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """gzip as pigz makes it: 1 MiB blocks deflated on several threads (zlib releases the GIL), each primed with the
    32 KiB before it and ended on a byte boundary, so together they are one deflate stream any gunzip reads. The
    same input always gives the same bytes, whatever the number of threads."""
    workers = min(os.cpu_count() or 1, 8)
    crc, size = 0, 0
    yield _GZIP_HEADER
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        prev_tail = b""
        block: bytes | None = None
        for piece in _pieces(chunks, GZIP_BLOCK):
            if block is not None:
                pending.append(pool.submit(_deflate_block, block, prev_tail, False))
                prev_tail = block[-32768:]
            block = piece
            crc = zlib.crc32(piece, crc)
            size += len(piece)
            while len(pending) > 2 * workers:
                yield pending.popleft().result()
        pending.append(pool.submit(_deflate_block, block or b"", prev_tail, True))
        while pending:
            yield pending.popleft().result()
    yield struct.pack("<II", crc, size & 0xFFFFFFFF)


def compressed(chunks: Iterator[bytes], compression: str, diff_id: str) -> Iterator[bytes]:
    """The layer's tar compressed (deterministically: the same layer gives the same blob), its DiffID checked."""
    sha = hashlib.sha256()

    def hashed() -> Iterator[bytes]:
        for chunk in chunks:
            sha.update(chunk)
            yield chunk
    if compression == "gzip":
        yield from parallel_gzip(hashed())
    else:
        c = zstandard.ZstdCompressor(level=3).compressobj()
        for chunk in hashed():
            out = c.compress(chunk)
            if out:
                yield out
        yield c.flush()
    if "sha256:" + sha.hexdigest() != diff_id:
        raise Corrupt(f"layer {diff_id} does not rebuild to its DiffID: run `lamina fsck`")


def _pieces(chunks: Iterator[bytes], size: int) -> Iterator[bytes]:
    """Re-cuts a byte stream into pieces of `size` (the last shorter)."""
    buf = bytearray()
    for c in chunks:
        buf += c
        while len(buf) >= size:
            yield bytes(buf[:size])
            del buf[:size]
    if buf:
        yield bytes(buf)


class Pusher:
    def __init__(self, client: Client, dest: Reference, info: BlobInfo) -> None:
        self.client = client
        self.dest = dest
        self.repo = dest.repository
        self.info = info
        self.scopes = [scope(self.repo, "pull,push")]
        self.uploaded = 0  # blobs sent (for the caller's report)

    def _req(self, method: str, url: str, scopes: list[str] | None = None, **kw) -> httpx.Response:
        resp = self.client.request(method, url, scopes or self.scopes, **kw)
        resp.read()
        return resp

    def exists(self, digest: str) -> bool:
        resp = self._req("HEAD", f"/v2/{self.repo}/blobs/{digest}")
        if resp.status_code in (200, 404):
            return resp.status_code == 200
        raise RegistryError(f"{self.dest.name}: blob {digest}: HTTP {resp.status_code}")

    def mount(self, digest: str, source: str) -> bool:
        resp = self._req("POST", f"/v2/{self.repo}/blobs/uploads/", [*self.scopes, scope(source, "pull")],
                         params={"mount": digest, "from": source})
        if resp.status_code == 201:
            return True
        if resp.status_code == 202 and resp.headers.get("Location"):  # the registry opened an upload instead
            self._req("DELETE", self._location(resp))
        return False

    def _location(self, resp: httpx.Response) -> str:
        loc = resp.headers.get("Location")
        if not loc:
            raise RegistryError(f"{self.dest.name}: upload answered without a Location")
        return str(resp.url.join(loc))

    def upload(self, pieces: Iterator[bytes]) -> tuple[str, int]:
        """Uploads a blob given as pieces of at most CHUNK bytes; returns (digest, size)."""
        resp = self._req("POST", f"/v2/{self.repo}/blobs/uploads/")
        if resp.status_code != 202:
            raise RegistryError(f"{self.dest.name}: cannot start an upload: {error_text(resp)}")
        url = self._location(resp)
        sha = hashlib.sha256()
        size = 0
        first = next(pieces, b"")
        second = next(pieces, None)
        body = first
        if second is not None:  # more than one chunk: PATCH each, then an empty PUT
            for piece in itertools.chain((first, second), pieces):
                sha.update(piece)
                resp = self._req("PATCH", url, content=piece, headers={
                    "Content-Type": "application/octet-stream", "Content-Length": str(len(piece)),
                    "Content-Range": f"{size}-{size + len(piece) - 1}"})
                if resp.status_code != 202:
                    raise RegistryError(f"{self.dest.name}: upload chunk refused: {error_text(resp)}")
                url = self._location(resp)
                size += len(piece)
            body = b""
        else:
            sha.update(first)
            size = len(first)
        digest = "sha256:" + sha.hexdigest()
        resp = self._req("PUT", url, params={"digest": digest}, content=body,
                         headers={"Content-Type": "application/octet-stream"})
        if resp.status_code != 201:
            raise RegistryError(f"{self.dest.name}: upload of {digest} refused: {error_text(resp)}")
        self.uploaded += 1
        return digest, size

    def layer(self, store: Store, layer_id: int, diff_id: str, compression: str,
              progress: Callable[[int], None]) -> tuple[dict, str]:
        """The layer's descriptor, and what was done: 'Layer already exists', 'Mounted from R' or 'Pushed'."""
        media = MEDIA[compression]
        for cand in self.info.candidates(diff_id, compression, self.dest.registry):
            desc = {"mediaType": media, "digest": cand.digest, "size": cand.size}
            if self.exists(cand.digest):
                status = "Layer already exists"
            else:
                source = next((r for r in cand.repositories if r != self.repo and self.mount(cand.digest, r)), None)
                if source is None:
                    continue
                status = f"Mounted from {source}"
            self.info.record(cand.digest, diff_id, compression, cand.size, self.dest.registry, self.repo)
            return desc, status

        def counted() -> Iterator[bytes]:
            for c in layer_bytes(store, layer_id):
                progress(len(c))
                yield c
        digest, size = self.upload(_pieces(compressed(counted(), compression, diff_id), CHUNK))
        self.info.record(digest, diff_id, compression, size, self.dest.registry, self.repo)
        return {"mediaType": media, "digest": digest, "size": size}, "Pushed"

    def blob(self, data: bytes) -> str:
        digest = sha256(data)
        if not self.exists(digest):
            self.upload(iter([data]))
        return digest

    def manifest(self, manifest: bytes, tag: str) -> str:
        resp = self._req("PUT", f"/v2/{self.repo}/manifests/{tag}", content=manifest,
                         headers={"Content-Type": OCI_MANIFEST})
        if resp.status_code not in (200, 201):
            raise RegistryError(f"{self.dest.name}:{tag}: manifest refused: {error_text(resp)}")
        digest = sha256(manifest)
        announced = resp.headers.get("Docker-Content-Digest")
        if announced and announced != digest:
            raise RegistryError(f"{self.dest.name}:{tag}: registry stored manifest {announced}, sent {digest}")
        return digest


def push(store: Store, client: Client, img: Image, dest: Reference, compression: str, ui) -> tuple[str, int]:
    """Pushes `img` as `dest` (a tag); returns the manifest digest and how many blobs were uploaded."""
    if compression not in MEDIA:
        raise BadInput(f"unknown compression {compression!r} (gzip or zstd)")
    if dest.digest:
        raise BadInput(f"{dest}: push to a tag, not a digest")
    info = BlobInfo(str(store.root))
    p = Pusher(client, dest, info)
    sizes = {lid: store.db.execute("SELECT size FROM layers WHERE id=?", (lid,)).fetchone()[0]
             for lid in img.layer_ids}
    unique = dict(zip(img.diff_ids, img.layer_ids))

    def one(diff_id: str, layer_id: int) -> dict:
        bar = ui.layer_bar(diff_id, sizes[layer_id])
        desc, status = p.layer(store, layer_id, diff_id, compression, bar.update)
        bar.close(status)
        return desc

    try:
        with ThreadPoolExecutor(PARALLEL) as pool:
            descs = dict(zip(unique, pool.map(one, unique, unique.values())))
        config_digest = p.blob(img.config_bytes)
        manifest = {
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(img.config_bytes)},
            "layers": [descs[d] for d in img.diff_ids],
        }
        digest = p.manifest(json.dumps(manifest, separators=(",", ":")).encode(), dest.tag or "latest")
    finally:
        info.close()
    return digest, p.uploaded
