"""Importing images: format detection, OCI layouts, `docker save` archives, tars and directories.

An import is all-or-nothing: every layer is read, checked against its digests and staged first; then the staged
objects are published and every row (objects, layers, entries, images, tags) commits in one transaction. A
failure or a kill before that commit leaves the index untouched, and the staged or linked objects are removed by
recovery (store/root.py). Layers already in the store (by DiffID) are not read again.
"""
from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import io
import json
import os
import platform
import re
import shutil
import tarfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import zstandard

from .dirtar import write_dir_tar
from .entries import FILE
from .errors import BadInput, NotFound, StoreError
from .ingest import (P_GID, P_IMPLICIT, P_KIND, P_LEADER, P_LINK, P_MODE, P_MTIME, P_OBJ, P_OPAQUE, P_RDEV,
                     P_SIZE, P_UID, P_XATTRS, LayerData, ingest_tar, split)
from .objects import ObjectStager
from .refs import normalize_ref
from .root import Store

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
CONFIG_TYPES = {"application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json"}
LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar", "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar", "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
}
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def host_arch() -> str:
    m = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(m, m)


class _Hashing(io.RawIOBase):
    """Passes reads through while computing sha256 of the raw (possibly compressed) bytes."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.sha = hashlib.sha256()
        self.n = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        data = self.f.read(len(b))
        b[: len(data)] = data
        self.sha.update(data)
        self.n += len(data)
        return len(data)

    def finish(self) -> str:
        while data := self.f.read(1 << 20):
            self.sha.update(data)
            self.n += len(data)
        return "sha256:" + self.sha.hexdigest()


class _Decompressed(io.RawIOBase):
    """A decompressing reader that reports corrupt or truncated data as BadInput with the format named."""

    def __init__(self, raw: BinaryIO, kind: str) -> None:
        self.kind = kind
        if kind == "gzip":
            self.f = gzip.GzipFile(fileobj=raw, mode="rb")
        else:
            self.f = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        try:
            return self.f.read(n)
        except (OSError, EOFError, zlib.error, zstandard.ZstdError) as e:
            raise BadInput(f"corrupt or truncated {self.kind} data: {e}") from None

    def readinto(self, b) -> int:  # type: ignore[override]
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


def decompressed(f: BinaryIO) -> BinaryIO:
    """Sniffs gzip (1f8b) and zstd (28b52ffd) magic; anything else is read as an uncompressed tar."""
    buf = f if hasattr(f, "peek") else io.BufferedReader(f, 1 << 20)  # type: ignore[arg-type]
    head = buf.peek(4)[:4]  # type: ignore[union-attr]
    if head.startswith(GZIP_MAGIC):
        return _Decompressed(buf, "gzip")
    if head == ZSTD_MAGIC:
        return _Decompressed(buf, "zstd")
    return buf


@dataclass
class ImageSpec:
    config: bytes
    diff_ids: list[str]
    tags: list[str] = field(default_factory=list)


class Importer:
    """One import: a registered staging area, the layers read so far, and the final all-or-nothing commit."""

    def __init__(self, store: Store, progress: Callable[[int], None] | None = None) -> None:
        self.store = store
        self.progress = progress
        self.layers: dict[str, LayerData] = {}
        self.images: list[ImageSpec] = []

    @contextmanager
    def session(self) -> Iterator["Importer"]:
        st = self.store
        with st.shared():
            with st.write() as db:
                cur = db.execute("INSERT INTO imports(pid, started, staging) VALUES (?, ?, '')",
                                 (os.getpid(), now_iso()))
                self.id = cur.lastrowid
                rel = f"tmp/import-{self.id}"
                db.execute("UPDATE imports SET staging=? WHERE id=?", (rel, self.id))
            self.staging = str(st.root / rel)
            os.makedirs(self.staging)
            self.stager = ObjectStager(st, self.staging)
            try:
                yield self
            finally:
                self.stager.close()
                shutil.rmtree(self.staging, ignore_errors=True)
                with st.write() as db:
                    db.execute("DELETE FROM imports WHERE id=?", (self.id,))

    def have_layer(self, diff_id: str) -> bool:
        if diff_id in self.layers:
            return True
        return self.store.db.execute("SELECT 1 FROM layers WHERE diff_id=?", (diff_id,)).fetchone() is not None

    def add_layer_stream(self, f: BinaryIO) -> LayerData:
        data = ingest_tar(decompressed(f), self.stager, self.progress)
        self.layers.setdefault(data.diff_id, data)
        return data

    def commit(self) -> list[str]:
        """Publishes staged objects and commits every row in one transaction. Returns the image ids."""
        new_objects = self.stager.publish()
        ids = []
        with self.store.write() as db:
            db.executemany("INSERT OR IGNORE INTO objects(hash, size) VALUES (?, ?)", new_objects)
            for h, size, data in self.stager.inline_rows():
                before = db.total_changes
                db.execute("INSERT OR IGNORE INTO objects(hash, size, data) VALUES (?, ?, ?)", (h, size, data))
                # Committed meanwhile by a concurrent import: keep it only if it is the same content.
                if db.total_changes == before and self.store.inline_data(h) not in (data, None):
                    raise BadInput(f"two different contents share XXH3-128 {h}: refusing a hash collision")
            for data in self.layers.values():
                if db.execute("SELECT 1 FROM layers WHERE diff_id=?", (data.diff_id,)).fetchone() is None:
                    _insert_layer(db, data)
            for img in self.images:
                image_id = "sha256:" + hashlib.sha256(img.config).hexdigest()
                if db.execute("SELECT 1 FROM images WHERE id=?", (image_id,)).fetchone() is None:
                    db.execute("INSERT INTO images(id, config, created) VALUES (?, ?, ?)",
                               (image_id, img.config, now_iso()))
                    for pos, d in enumerate(img.diff_ids):
                        (lid,) = db.execute("SELECT id FROM layers WHERE diff_id=?", (d,)).fetchone()
                        db.execute("INSERT INTO image_layers VALUES (?, ?, ?)", (image_id, pos, lid))
                for t in img.tags:
                    db.execute("INSERT OR REPLACE INTO tags(name, image_id) VALUES (?, ?)", (t, image_id))
                ids.append(image_id)
        return ids


def _insert_layer(db, data: LayerData) -> None:
    cur = db.execute(
        "INSERT INTO layers(diff_id, size, content_size, tarsplit, n_entries, created) VALUES (?,?,?,?,?,?)",
        (data.diff_id, data.size, data.content_size, data.tarsplit, len(data.rows), now_iso()))
    layer_id = cur.lastrowid
    (base,) = db.execute("SELECT coalesce(max(ino), 0) + 1 FROM entries").fetchone()
    ino_of = {path: base + i for i, path in enumerate(data.rows)}
    nlink: dict[str, int] = {}
    for row in data.rows.values():
        if row[P_LEADER]:
            nlink[row[P_LEADER]] = nlink.get(row[P_LEADER], 1) + 1

    def rows():
        for path, r in data.rows.items():
            parent, name = split(path)
            leader = r[P_LEADER] or None
            n = nlink.get(leader or path, 1)
            yield (ino_of[path], layer_id, parent, name, r[P_KIND], r[P_MODE], r[P_UID], r[P_GID], r[P_MTIME],
                   r[P_SIZE], r[P_OBJ], r[P_LINK], r[P_RDEV], ino_of[leader] if leader else None, n,
                   r[P_XATTRS], r[P_OPAQUE], r[P_IMPLICIT])

    db.executemany("INSERT INTO entries VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", rows())


# -- sources ------------------------------------------------------------------------------------------------------

def _iso_ns(ns: int) -> str:
    return dt.datetime.fromtimestamp(ns // 1_000_000_000, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _new_config(layer: LayerData, created_by: str, changes: dict) -> bytes:
    """The config of a one-layer image made from a tar or directory. Its times are the newest mtime in the layer,
    not the clock, so importing the same content with the same changes twice gives the same image id (docker
    import stamps the current time and makes a new image each time; a content-addressed store should not)."""
    diff_ids = [layer.diff_id]
    t = _iso_ns(max((r[P_MTIME] for r in layer.rows.values()), default=0))
    cfg = {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]}
    cfg.update(changes)
    config = {"created": t, "architecture": host_arch(), "os": "linux", "config": cfg,
              "rootfs": {"type": "layers", "diff_ids": diff_ids},
              "history": [{"created": t, "created_by": created_by}]}
    return json.dumps(config, separators=(",", ":")).encode()


class _Blobs:
    """Read access to a layout or archive, directory or tar alike."""

    def __init__(self, src: str) -> None:
        self.src = src
        self.tar: tarfile.TarFile | None = None
        self.names: dict[str, tarfile.TarInfo] = {}
        if os.path.isfile(src):
            self.tar = tarfile.open(src, mode="r:")
            for m in self.tar.getmembers():
                self.names[m.name.lstrip("./") if m.name.startswith("./") else m.name] = m

    def exists(self, name: str) -> bool:
        if self.tar is not None:
            return name in self.names
        return os.path.isfile(os.path.join(self.src, name))

    @contextmanager
    def open(self, name: str) -> Iterator[BinaryIO]:
        if "\x00" in name or name.startswith("/") or ".." in name.split("/"):
            raise BadInput(f"archive refers to a path outside itself: {name!r}")
        if self.tar is not None:
            m = self.names.get(name)
            f = self.tar.extractfile(m) if m is not None else None
            if f is None:
                raise BadInput(f"archive is missing {name}")
            with f:
                yield f  # type: ignore[misc]
        else:
            try:
                f = open(os.path.join(self.src, name), "rb")
            except FileNotFoundError:
                raise BadInput(f"layout is missing {name}") from None
            with f:
                yield f

    def read(self, name: str) -> bytes:
        with self.open(name) as f:
            return f.read()

    def json(self, name: str, data: bytes | None = None):
        try:
            return json.loads(data if data is not None else self.read(name))
        except ValueError as e:
            raise BadInput(f"{name} is not valid JSON: {e}") from None

    def blob_name(self, digest: str) -> str:
        algo, _, hexd = digest.partition(":")
        if algo != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hexd):
            raise BadInput(f"unsupported or malformed digest {digest!r}")
        return f"blobs/sha256/{hexd}"

    def blob(self, desc: dict) -> bytes:
        digest = desc.get("digest", "")
        data = self.read(self.blob_name(digest))
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise BadInput(f"blob {digest} does not match its digest")
        return data


def _check_config(cfg_bytes: bytes, where: str) -> dict:
    try:
        cfg = json.loads(cfg_bytes)
        diff_ids = cfg["rootfs"]["diff_ids"]
        assert isinstance(diff_ids, list)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise BadInput(f"{where}: not an image config (no rootfs.diff_ids)") from None
    return cfg


class Source:
    """Detects what SOURCE is and feeds it to an Importer."""

    def __init__(self, importer: Importer, path: str, tags: list[str], changes: dict) -> None:
        self.imp = importer
        self.path = path
        self.tags = tags
        self.changes = changes

    def run(self) -> None:
        p = self.path
        if p == "-":
            return self._layer_tar(io.BufferedReader(io.FileIO(0, closefd=False)), "stdin")
        if os.path.isdir(p):
            if os.path.exists(os.path.join(p, "index.json")) or os.path.exists(os.path.join(p, "oci-layout")) \
                    or os.path.exists(os.path.join(p, "manifest.json")):
                return self._archive(_Blobs(p))
            return self._directory(p)
        if not os.path.exists(p):
            raise NotFound(f"{p}: no such file or directory")
        with open(p, "rb") as f:
            head = f.read(512)
        if head.startswith(GZIP_MAGIC) or head.startswith(ZSTD_MAGIC):
            with open(p, "rb") as f:
                return self._layer_tar(f, p)
        if not _looks_like_archive(p):
            with open(p, "rb") as f:
                return self._layer_tar(f, p)
        try:
            blobs = _Blobs(p)
        except (tarfile.ReadError, EOFError) as e:
            if head[257:262] == b"ustar":
                raise BadInput(f"{p}: corrupt or truncated tar ({e})") from None
            raise BadInput(f"{p}: not a directory, tar, OCI layout or docker save archive ({e})") from None
        if any(n in blobs.names for n in ("index.json", "oci-layout", "manifest.json")):
            return self._archive(blobs)
        with open(p, "rb") as f:
            return self._layer_tar(f, p)

    def _single_image(self, layer: LayerData, created_by: str) -> None:
        cfg = _new_config(layer, created_by, self.changes)
        self.imp.images.append(ImageSpec(cfg, [layer.diff_id], self.tags))

    def _layer_tar(self, f: BinaryIO, name: str) -> None:
        data = self.imp.add_layer_stream(f)
        self._single_image(data, f"lamina import {os.path.basename(name)}")

    def _directory(self, p: str) -> None:
        tmp = f"{self.imp.staging}/dir.tar"
        try:
            with open(tmp, "wb") as out:
                write_dir_tar(p, out)
        except OSError as e:
            raise BadInput(f"{p}: {e.strerror or e}") from None
        with open(tmp, "rb") as f:
            data = self.imp.add_layer_stream(f)
        os.unlink(tmp)
        self._single_image(data, f"lamina import {os.path.basename(os.path.abspath(p))}")

    # -- OCI layout and docker save -------------------------------------------------------------------------------
    def _archive(self, b: _Blobs) -> None:
        try:
            self._read_archive(b)
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            # index, manifest or config JSON of the wrong shape (a list where an object belongs, and so on)
            raise BadInput(f"{self.path}: malformed image metadata ({type(e).__name__}: {e})") from None

    def _read_archive(self, b: _Blobs) -> None:
        found: list[tuple[bytes, list[tuple[dict, str | None]], list[str]]] = []
        if b.exists("index.json"):
            if b.exists("oci-layout"):
                layout = b.json("oci-layout")
                if not isinstance(layout, dict) or "imageLayoutVersion" not in layout:
                    raise BadInput("oci-layout: no imageLayoutVersion")
            docker_tags = self._docker_tags(b) if b.exists("manifest.json") else {}
            index = b.json("index.json")
            for desc in index.get("manifests", []) if isinstance(index, dict) else []:
                found.extend(self._from_descriptor(b, desc, docker_tags))
            if not found:
                raise BadInput("index.json lists no image manifests")
        elif b.exists("manifest.json"):
            found.extend(self._from_docker_manifest(b))
        else:
            raise BadInput(f"{self.path}: neither index.json nor manifest.json")
        if self.tags and len(found) > 1:
            raise BadInput(f"{self.path} holds {len(found)} images: -t applies to exactly one")
        for cfg_bytes, layers, tags in found:
            diff_ids = _check_config(cfg_bytes, "config")["rootfs"]["diff_ids"]
            if len(diff_ids) != len(layers):
                raise BadInput(f"config lists {len(diff_ids)} layers, manifest {len(layers)}")
            for (desc, name), want in zip(layers, diff_ids):
                if self.imp.have_layer(want):
                    continue
                self._archive_layer(b, desc, name, want)
            self.imp.images.append(ImageSpec(cfg_bytes, list(diff_ids), self.tags or tags))

    def _archive_layer(self, b: _Blobs, desc: dict, name: str | None, want: str) -> None:
        mt = desc.get("mediaType")
        if mt is not None and mt not in LAYER_TYPES:
            raise BadInput(f"layer {desc.get('digest', name)}: unknown media type {mt!r}")
        blob_name = name if name is not None else b.blob_name(desc.get("digest", ""))
        with b.open(blob_name) as raw:
            h = _Hashing(raw)
            data = self.imp.add_layer_stream(io.BufferedReader(h, 1 << 20))  # type: ignore[arg-type]
            digest = h.finish()
        if "digest" in desc and digest != desc["digest"]:
            raise BadInput(f"layer blob {desc['digest']} does not match its digest (got {digest})")
        if "size" in desc and h.n != desc["size"]:
            raise BadInput(f"layer blob {desc.get('digest')} has {h.n} bytes, manifest says {desc['size']}")
        if data.diff_id != want:
            raise BadInput(f"layer {desc.get('digest', name)}: DiffID {data.diff_id} does not match config {want}")

    def _from_descriptor(self, b: _Blobs, desc: dict, docker_tags: dict, depth: int = 0):
        mt = desc.get("mediaType")
        ref = (desc.get("annotations") or {}).get("io.containerd.image.name") or \
            (desc.get("annotations") or {}).get("org.opencontainers.image.ref.name")
        if mt in (OCI_INDEX, DOCKER_LIST):
            if depth > 4:
                raise BadInput("image index nested too deeply")
            sub = b.json("index", b.blob(desc))
            manifests = sub.get("manifests", [])
            want = host_arch()
            chosen = [m for m in manifests if (m.get("platform") or {}).get("architecture") == want] or manifests[:1]
            out = []
            for m in chosen[:1]:
                if ref and "annotations" not in m:
                    m = dict(m, annotations={"org.opencontainers.image.ref.name": ref})
                out.extend(self._from_descriptor(b, m, docker_tags, depth + 1))
            return out
        if mt not in (OCI_MANIFEST, DOCKER_MANIFEST):
            raise BadInput(f"manifest {desc.get('digest')}: unknown media type {mt!r}")
        man = b.json("manifest", b.blob(desc))
        cdesc = man.get("config") or {}
        if cdesc.get("mediaType") not in CONFIG_TYPES:
            raise BadInput(f"config {cdesc.get('digest')}: unknown media type {cdesc.get('mediaType')!r}")
        cfg = b.blob(cdesc)
        tags = docker_tags.get(cdesc["digest"]) or _ref_tags(ref)
        return [(cfg, [(d, None) for d in man.get("layers", [])], tags)]

    def _docker_tags(self, b: _Blobs) -> dict[str, list[str]]:
        out = {}
        man = b.json("manifest.json")
        for item in man if isinstance(man, list) else []:
            cfg = item.get("Config", "")
            hexd = cfg.rsplit("/", 1)[-1].removesuffix(".json")
            out["sha256:" + hexd] = [normalize_ref(t) for t in item.get("RepoTags") or []]
        return out

    def _from_docker_manifest(self, b: _Blobs):
        man = b.json("manifest.json")
        if not isinstance(man, list):
            raise BadInput("manifest.json is not a list of images")
        out = []
        for item in man:
            cfg_name = item.get("Config")
            if not isinstance(cfg_name, str):
                raise BadInput("manifest.json entry without Config")
            cfg = b.read(cfg_name)
            hexd = cfg_name.rsplit("/", 1)[-1].removesuffix(".json")
            if re.fullmatch(r"[0-9a-f]{64}", hexd) and hashlib.sha256(cfg).hexdigest() != hexd:
                raise BadInput(f"config {cfg_name} does not match its digest")
            layers = [({}, name) for name in item.get("Layers") or []]
            out.append((cfg, layers, [normalize_ref(t) for t in item.get("RepoTags") or []]))
        return out


_ARCHIVE_TOP = re.compile(r"^(?:\./)?(?:oci-layout|index\.json|manifest\.json|repositories|blobs(?:/.*)?|"
                          r"[0-9a-f]{64}(?:\.json|\.tar|/.*)?)/?$")


def _looks_like_archive(path: str) -> bool:
    """Whether a tar's first member is one an image archive starts with, as opposed to a root filesystem's
    ("./", "bin/"...). Saves reading every header of a large layer twice."""
    try:
        with tarfile.open(path, mode="r:") as tf:
            first = tf.next()
            while first is not None and first.name in (".", "./"):
                first = tf.next()
    except (tarfile.ReadError, EOFError):
        return True  # let the full open report what is wrong
    return first is not None and bool(_ARCHIVE_TOP.match(first.name))


def _ref_tags(ref: str | None) -> list[str]:
    # An OCI ref.name may be a bare tag ("latest") or a full reference; either is taken as the image's name
    # (skopeo's oci:DIR:NAME writes NAME there). One that is no valid reference is not a reason to refuse.
    try:
        return [normalize_ref(ref)] if ref else []
    except BadInput:
        return []


def commit_layer(store: Store, parent_id: str, upper: str, created_by: str, tags: list[str] | None = None,
                 exclude: frozenset[str] = frozenset()) -> str:
    """A new image: the parent image plus one layer made from an overlayfs upper directory (its 0/0 whiteouts and
    opaque markers become OCI whiteouts). This is `lamina commit`. Returns the new image id."""
    from .reader import load_image
    parent = load_image(store, parent_id)
    imp = Importer(store)
    with imp.session():
        tmp = f"{imp.staging}/upper.tar"
        with open(tmp, "wb") as out:
            write_dir_tar(upper, out, overlay_upper=True, exclude=exclude)
        with open(tmp, "rb") as f:
            data = imp.add_layer_stream(f)
        os.unlink(tmp)
        cfg = json.loads(parent.config_bytes)
        t = now_iso()
        diff_ids = [*parent.diff_ids, data.diff_id]
        cfg["created"] = t
        cfg.setdefault("rootfs", {"type": "layers"})["diff_ids"] = diff_ids
        cfg.setdefault("history", []).append({"created": t, "created_by": created_by})
        imp.images.append(ImageSpec(json.dumps(cfg, separators=(",", ":")).encode(), diff_ids,
                                    [normalize_ref(t_) for t_ in tags or []]))
        return imp.commit()[0]


def import_source(store: Store, source: str, tag: str | None = None, changes: dict | None = None,
                  progress: Callable[[int], None] | None = None) -> list[str]:
    tags = [normalize_ref(tag)] if tag else []
    imp = Importer(store, progress)
    with imp.session():
        Source(imp, source, tags, changes or {}).run()
        return imp.commit()
