"""Exporting images: OCI image layout archives and `docker save` archives, with byte-identical layers.

Layers are written uncompressed, rebuilt from their tar skeleton (store/tarsplit.py), so each exported layer
hashes to the DiffID it was imported with and its blob digest equals that DiffID. Configs are written verbatim,
so image ids are kept. The archive is written to a temporary name and renamed into place when complete.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from typing import BinaryIO, Callable, Iterator

from .errors import Corrupt, StoreError
from .reader import Image
from .root import Store
from .tarsplit import reassemble

OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def layer_bytes(store: Store, layer_id: int) -> Iterator[bytes]:
    """The exact tar of a stored layer."""
    row = store.db.execute("SELECT tarsplit FROM layers WHERE id=?", (layer_id,)).fetchone()
    if row is None:
        raise StoreError(f"no such layer: {layer_id}")

    def open_object(h: str) -> BinaryIO:
        try:
            return store.open_object(h)
        except FileNotFoundError:
            raise Corrupt(f"object {h} is missing: run `lamina fsck`") from None

    with open_object(row[0]) as skel:
        yield from reassemble(skel, open_object)


class _IterReader(io.RawIOBase):
    def __init__(self, it: Iterator[bytes]) -> None:
        self.it = it
        self.buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        while not self.buf:
            try:
                self.buf = next(self.it)
            except StopIteration:
                return 0
        n = min(len(b), len(self.buf))
        b[:n] = self.buf[:n]
        self.buf = self.buf[n:]
        return n


def _add_bytes(tf: tarfile.TarFile, name: str, data: bytes, mtime: int) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mtime = mtime
    ti.mode = 0o644
    tf.addfile(ti, io.BytesIO(data))


def _add_layer(tf: tarfile.TarFile, name: str, store: Store, layer_id: int, mtime: int,
               progress: Callable[[int], None] | None) -> None:
    (size, diff_id) = store.db.execute("SELECT size, diff_id FROM layers WHERE id=?", (layer_id,)).fetchone()
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = mtime
    ti.mode = 0o644
    sha = hashlib.sha256()

    def counted() -> Iterator[bytes]:
        for chunk in layer_bytes(store, layer_id):
            sha.update(chunk)
            if progress:
                progress(len(chunk))
            yield chunk

    tf.addfile(ti, io.BufferedReader(_IterReader(counted()), 1 << 20))
    if "sha256:" + sha.hexdigest() != diff_id:
        raise Corrupt(f"layer {diff_id} does not rebuild to its DiffID: run `lamina fsck`")


def _blob(digest: str) -> str:
    return "blobs/sha256/" + digest.split(":", 1)[1]


def save(store: Store, images: list[Image], out: str, fmt: str = "oci",
         progress: Callable[[int], None] | None = None) -> None:
    tmp = f"{out}.lamina-tmp-{os.getpid()}"
    mtime = int(time.time())
    try:
        with open(tmp, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tf:
            if fmt == "oci":
                _save_oci(tf, store, images, mtime, progress)
            elif fmt == "docker":
                _save_docker(tf, store, images, mtime, progress)
            else:
                raise StoreError(f"unknown format {fmt!r} (oci or docker)")
        os.replace(tmp, out)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _save_oci(tf, store, images, mtime, progress) -> None:
    _add_bytes(tf, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}', mtime)
    written: set[str] = set()
    manifests = []
    for img in images:
        for lid, diff_id in zip(img.layer_ids, img.diff_ids):
            if diff_id not in written:
                _add_layer(tf, _blob(diff_id), store, lid, mtime, progress)
                written.add(diff_id)
        if img.id not in written:
            _add_bytes(tf, _blob(img.id), img.config_bytes, mtime)
            written.add(img.id)
        sizes = dict(store.db.execute(
            f"SELECT diff_id, size FROM layers WHERE id IN ({','.join('?' * len(img.layer_ids))})",
            img.layer_ids).fetchall()) if img.layer_ids else {}
        manifest = {
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": img.id, "size": len(img.config_bytes)},
            "layers": [{"mediaType": OCI_LAYER, "digest": d, "size": sizes[d]} for d in img.diff_ids],
        }
        mb = json.dumps(manifest, separators=(",", ":")).encode()
        md = "sha256:" + hashlib.sha256(mb).hexdigest()
        if md not in written:
            _add_bytes(tf, _blob(md), mb, mtime)
            written.add(md)
        for name in img.tags or [None]:
            desc = {"mediaType": OCI_MANIFEST, "digest": md, "size": len(mb)}
            if name:
                desc["annotations"] = {"org.opencontainers.image.ref.name": name,
                                       "io.containerd.image.name": name}
            manifests.append(desc)
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
    _add_bytes(tf, "index.json", json.dumps(index, separators=(",", ":")).encode(), mtime)


def _save_docker(tf, store, images, mtime, progress) -> None:
    written: set[str] = set()
    manifest = []
    repositories: dict[str, dict[str, str]] = {}
    for img in images:
        cfg_name = img.id.split(":", 1)[1] + ".json"
        if cfg_name not in written:
            _add_bytes(tf, cfg_name, img.config_bytes, mtime)
            written.add(cfg_name)
        layer_names = []
        for lid, diff_id in zip(img.layer_ids, img.diff_ids):
            name = diff_id.split(":", 1)[1] + "/layer.tar"
            if name not in written:
                _add_layer(tf, name, store, lid, mtime, progress)
                written.add(name)
            layer_names.append(name)
        manifest.append({"Config": cfg_name, "RepoTags": img.tags or None, "Layers": layer_names})
        for t in img.tags:
            repo, tag = t.rsplit(":", 1)
            if layer_names:
                repositories.setdefault(repo, {})[tag] = layer_names[-1].split("/")[0]
    _add_bytes(tf, "manifest.json", json.dumps(manifest, separators=(",", ":")).encode(), mtime)
    if repositories:
        _add_bytes(tf, "repositories", json.dumps(repositories).encode(), mtime)
