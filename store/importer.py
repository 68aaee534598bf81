"""Importing images: what a SOURCE is (directory, tar, image archive), and the all-or-nothing import.

Archive formats are read by store/archives.py; this module stores what they hold. Every layer is read, checked
against its digests and staged first; then the staged objects are published and every row (objects, layers,
entries, images, tags) commits in one transaction. A failure or a kill before that commit leaves the index
untouched, and the staged or moved objects are removed by recovery (store/root.py). Layers already in the store
(by DiffID) are not read again.
"""
from __future__ import annotations

import datetime as dt
import errno
import hashlib
import io
import json
import os
import shutil
import sqlite3
import tarfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Iterator

from .archives import LAYER_TYPES, Blobs, LayerRef, host_arch, is_archive_dir, looks_like_archive, read_images
from .dirtar import write_dir_tar
from .errors import BadInput, NotFound, StoreError
from .ingest import LayerData, ingest_tar
from .objects import ObjectStager
from .refs import normalize_ref
from .root import Store, index_error
from .streams import GZIP_MAGIC, ZSTD_MAGIC, HashingReader, decompressed


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


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
        """The import's registration and staging area. Any failure leaves the store as it was: a full disk or an
        index that cannot be written is reported as one StoreError naming it, and objects already moved into
        objects/ for a commit that failed are removed by recovery once this importer's lock is released."""
        st = self.store
        self.stager = None
        clean = False
        try:
            with st.shared():
                with _store_errors(st):
                    with st.write() as db:
                        cur = db.execute("INSERT INTO imports(pid, started, staging) VALUES (?, ?, '')",
                                         (os.getpid(), now_iso()))
                        self.id = cur.lastrowid
                        rel = f"tmp/import-{self.id}"
                        db.execute("UPDATE imports SET staging=? WHERE id=?", (rel, self.id))
                self.staging = str(st.root / rel)
                try:
                    with _store_errors(st):
                        os.makedirs(self.staging)
                        self.stager = ObjectStager(st, self.staging)
                        yield self
                    clean = True
                finally:
                    if self.stager is not None:
                        self.stager.close()
                    # Objects moved into objects/ and never committed: recovery removes them (below).
                    if clean or not os.path.exists(f"{self.staging}/linked.json"):
                        shutil.rmtree(self.staging, ignore_errors=True)
                        try:
                            with st.write() as db:
                                db.execute("DELETE FROM imports WHERE id=?", (self.id,))
                        except sqlite3.Error:
                            clean = False  # the row stays for recovery; the error that brought us here matters
                        else:
                            clean = True
        finally:
            if not clean:
                try:
                    st.recover()
                except (StoreError, sqlite3.Error, OSError):
                    pass  # left to the next open, gc or fsck, which recover first

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


@contextmanager
def _store_errors(store: Store) -> Iterator[None]:
    """A full disk or a failing index, anywhere in an import, as one StoreError that says so."""
    try:
        yield
    except sqlite3.Error as e:
        raise index_error(store.db_path, e) from None
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise StoreError(f"no space left on {store.root} ({e.filename or e.strerror})") from None


def _insert_layer(db, data: LayerData) -> None:
    cur = db.execute(
        "INSERT INTO layers(diff_id, size, content_size, tarsplit, n_entries, created) VALUES (?,?,?,?,?,?)",
        (data.diff_id, data.size, data.content_size, data.tarsplit, data.n_entries, now_iso()))
    layer_id = cur.lastrowid
    (base,) = db.execute("SELECT coalesce(max(ino), 0) + 1 FROM entries").fetchone()
    db.executemany("INSERT INTO entries VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", data.entry_rows(layer_id, base))
    db.executemany("INSERT INTO skeleton_objects VALUES (?, ?)", [(layer_id, h) for h in data.unnamed_objects()])


# -- sources ------------------------------------------------------------------------------------------------------

def _iso_ns(ns: int) -> str:
    # a file may be dated in any 64-bit second; a config's date is RFC 3339, years 0001-9999
    sec = min(max(ns // 1_000_000_000, -62135596800), 253402300799)
    t = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(seconds=sec)
    return t.isoformat(timespec="seconds").replace("+00:00", "Z")


def _new_config(layer: LayerData, created_by: str, changes: dict) -> bytes:
    """The config of a one-layer image made from a tar or directory. Its times are the newest mtime in the layer,
    not the clock, so importing the same content with the same changes twice gives the same image id (docker
    import stamps the current time and makes a new image each time; a content-addressed store should not)."""
    diff_ids = [layer.diff_id]
    t = _iso_ns(layer.max_mtime_ns)
    cfg = {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]}
    cfg.update(changes)
    config = {"created": t, "architecture": host_arch(), "os": "linux", "config": cfg,
              "rootfs": {"type": "layers", "diff_ids": diff_ids},
              "history": [{"created": t, "created_by": created_by}]}
    return json.dumps(config, separators=(",", ":")).encode()


class Source:
    """Detects what SOURCE is and feeds it to an Importer."""

    def __init__(self, importer: Importer, path: str, tags: list[str], changes: dict,
                 archive_only: bool = False) -> None:
        self.imp = importer
        self.path = path
        self.tags = tags
        self.changes = changes
        self.archive_only = archive_only  # `load`: an image archive, not a tar or directory to make one of

    def run(self) -> None:
        p = self.path
        if p == "-":
            return self._layer_tar(io.BufferedReader(io.FileIO(0, closefd=False)), "stdin")
        if os.path.isdir(p):
            return self._archive(Blobs(p)) if is_archive_dir(p) else self._directory(p)
        if not os.path.exists(p):
            raise NotFound(f"{p}: no such file or directory")
        with open(p, "rb") as f:
            head = f.read(512)
        if head.startswith(GZIP_MAGIC) or head.startswith(ZSTD_MAGIC) or not looks_like_archive(p):
            with open(p, "rb") as f:
                return self._layer_tar(f, p)
        try:
            blobs = Blobs(p)
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

    def _not_archive(self, name: str) -> None:
        if self.archive_only:
            raise BadInput(f"{name}: not an image archive (an OCI layout or a docker save archive)")

    def _layer_tar(self, f: BinaryIO, name: str) -> None:
        self._not_archive(name)
        data = self.imp.add_layer_stream(f)
        self._single_image(data, f"lamina import {os.path.basename(name)}")

    def _directory(self, p: str) -> None:
        self._not_archive(p)
        tmp = f"{self.imp.staging}/dir.tar"
        try:
            with open(tmp, "wb") as out:
                write_dir_tar(p, out)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise  # writing the staging copy, not reading the source
            raise BadInput(f"{p}: {e.strerror or e}") from None
        with open(tmp, "rb") as f:
            data = self.imp.add_layer_stream(f)
        os.unlink(tmp)
        self._single_image(data, f"lamina import {os.path.basename(os.path.abspath(p))}")

    def _archive(self, b: Blobs) -> None:
        images = read_images(b, self.path)
        if self.tags and len(images) > 1:
            raise BadInput(f"{self.path} holds {len(images)} images: -t applies to exactly one")
        for img in images:
            for layer, want in zip(img.layers, img.diff_ids):
                self._archive_layer(b, layer, want)
            self.imp.images.append(ImageSpec(img.config, img.diff_ids, self.tags or img.tags))

    def _archive_layer(self, b: Blobs, layer: LayerRef, want: str) -> None:
        """Reads one layer blob and checks it against its descriptor and DiffID. A layer the store already holds
        is not stored again, but its blob is checked all the same: an archive with a corrupt, empty or missing
        blob is refused whatever the store holds, as a fresh store refuses it."""
        desc = layer.desc
        mt = desc.get("mediaType")
        if mt is not None and mt not in LAYER_TYPES:
            raise BadInput(f"layer {desc.get('digest', layer.name)}: unknown media type {mt!r}")
        blob_name = layer.name if layer.name is not None else b.blob_name(desc.get("digest", ""))
        known = self.imp.have_layer(want)
        with b.open(blob_name) as raw:
            h = HashingReader(raw)
            src = io.BufferedReader(h, 1 << 20)  # type: ignore[arg-type]
            diff_id = _diff_id(src) if known else self.imp.add_layer_stream(src).diff_id
            digest = h.finish()
        if "digest" in desc and digest != desc["digest"]:
            raise BadInput(f"layer blob {desc['digest']} does not match its digest (got {digest})")
        if "size" in desc and h.n != desc["size"]:
            raise BadInput(f"layer blob {desc.get('digest')} has {h.n} bytes, manifest says {desc['size']}")
        if diff_id != want:
            raise BadInput(f"layer {desc.get('digest', layer.name)}: DiffID {diff_id} does not match "
                           f"config {want}")


def _diff_id(src: BinaryIO) -> str:
    """The DiffID of a (possibly compressed) layer blob, read to its end without storing anything."""
    sha = hashlib.sha256()
    f = decompressed(src)
    while chunk := f.read(1 << 20):
        sha.update(chunk)
    return "sha256:" + sha.hexdigest()


def commit_layer(store: Store, parent_id: str, write: Callable[[BinaryIO], None], created_by: str,
                 tags: list[str] | None = None, config: dict | None = None) -> str:
    """A new image: the parent image plus one layer, the tar `write` writes into the file it is given (for
    `lamina commit`, `unionfs.changes.write_layer` of a container's upper directory). `config`, when given, replaces
    the parent's runtime config (Env, Cmd, WorkingDir...), as docker commit writes the container's. Returns the new
    image id."""
    return commit_image(store, parent_id, write, {"created_by": created_by}, tags, config)


def commit_image(store: Store, parent_id: str | None, write: Callable[[BinaryIO], None] | None, history: dict,
                 tags: list[str] | None = None, config: dict | None = None) -> str:
    """A new image: the parent's (None: an empty image, `FROM scratch`) plus the layer `write` writes, or no layer
    when `write` is None (then `history` gets `empty_layer`, as docker's metadata steps do). `history`: the new
    history entry (created_by, comment...), stamped with the time here. Returns the new image id."""
    from .reader import load_image
    if parent_id is not None:
        parent = load_image(store, parent_id)
        cfg, diff_ids = json.loads(parent.config_bytes), list(parent.diff_ids)
    else:
        cfg, diff_ids = {"architecture": host_arch(), "os": "linux", "config": {}}, []
    imp = Importer(store)
    with imp.session():
        if write is not None:
            tmp = f"{imp.staging}/layer.tar"
            with open(tmp, "wb") as out:
                write(out)
            with open(tmp, "rb") as f:
                data = imp.add_layer_stream(f)
            os.unlink(tmp)
            diff_ids.append(data.diff_id)
        t = now_iso()
        cfg["created"] = t
        if config is not None:
            cfg["config"] = config
        cfg.setdefault("rootfs", {"type": "layers"})["diff_ids"] = diff_ids
        entry = {"created": t, **history}
        if write is None:
            entry["empty_layer"] = True
        cfg.setdefault("history", []).append(entry)
        imp.images.append(ImageSpec(json.dumps(cfg, separators=(",", ":")).encode(), diff_ids,
                                    [normalize_ref(t_) for t_ in tags or []]))
        return imp.commit()[0]


def import_source(store: Store, source: str, tag: str | None = None, changes: dict | None = None,
                  progress: Callable[[int], None] | None = None) -> list[str]:
    return [image_id for image_id, _ in import_images(store, source, tag, changes, progress)]


def import_images(store: Store, source: str, tag: str | None = None, changes: dict | None = None,
                  progress: Callable[[int], None] | None = None,
                  archive_only: bool = False) -> list[tuple[str, list[str]]]:
    """Imports SOURCE; returns each image's id with the tags this import gave it (-t, or the archive's own).
    `archive_only` (load): SOURCE must be an image archive, not a tar or directory to make an image of."""
    tags = [normalize_ref(tag)] if tag else []
    imp = Importer(store, progress)
    with imp.session():
        Source(imp, source, tags, changes or {}, archive_only).run()
        ids = imp.commit()
    return [(image_id, img.tags) for image_id, img in zip(ids, imp.images)]
