"""The read side of the store for the union filesystem and the runtime: images, layer entries, object paths.

Hot paths (lookup, children) are single prepared statements on the `entries_path` index; one SQLite
connection per thread, since FUSE calls arrive on many threads.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import threading
from dataclasses import dataclass

from .entries import Entry, mtime_from_db, split
from .errors import NotFound
from .refs import normalize_ref
from .root import Store, connect, inline_data

# Page cache of each reader connection, in KiB (SQLite's default is 2 MiB): a daemon has one connection per worker
# thread, and a 100,000-file walk left ~4 MB of pages on them. Lookups reuse the few interior pages of the entries
# index, which a small cache keeps; a listing reads its leaf pages once.
_CACHE_KIB = 256
_COLS = "ino, kind, mode, uid, gid, mtime_ns, size, object, linkname, rdev, link_ino, nlink, xattrs, opaque, name"


def _entry(r: tuple) -> Entry:
    xattrs = {k: bytes.fromhex(v) for k, v in json.loads(r[12]).items()} if r[12] else None
    mtime = r[5] if type(r[5]) is int else mtime_from_db(r[5])
    return Entry(r[10] or r[0], r[1], r[2], r[3], r[4], mtime, r[6], r[7], r[8], r[9], r[11], xattrs, bool(r[13]))


@dataclass
class Image:
    id: str
    config: dict
    config_bytes: bytes
    layer_ids: list[int]
    diff_ids: list[str]
    tags: list[str]


def resolve(store: Store, ref: str) -> str:
    """NAME[:TAG], a full or short image id (docker accepts a unique prefix of 4+ hex digits) -> image id."""
    return resolve_name(store, ref)[0]


def resolve_name(store: Store, ref: str) -> tuple[str, str | None]:
    """Like `resolve`, also returning the tag that matched (None when REF named an id)."""
    db = store.db
    hexpart = ref.removeprefix("sha256:")
    if len(hexpart) >= 4 and all(c in "0123456789abcdef" for c in hexpart):
        rows = db.execute("SELECT id FROM images WHERE id >= ? AND id < ? LIMIT 2",
                          ("sha256:" + hexpart, "sha256:" + hexpart + "g")).fetchall()
        if len(rows) == 1:
            return rows[0][0], None
    try:
        name = normalize_ref(ref)
    except Exception:
        raise NotFound(f"no such image: {ref}") from None
    for candidate in (name, "localhost/" + name):  # podman names local images localhost/NAME
        row = db.execute("SELECT image_id FROM tags WHERE name=?", (candidate,)).fetchone()
        if row is not None:
            return row[0], candidate
    raise NotFound(f"no such image: {ref}")


def load_image(store: Store, image_id: str) -> Image:
    db = store.db
    row = db.execute("SELECT config FROM images WHERE id=?", (image_id,)).fetchone()
    if row is None:
        raise NotFound(f"no such image: {image_id}")
    layers = db.execute("SELECT l.id, l.diff_id FROM image_layers il JOIN layers l ON l.id=il.layer_id "
                        "WHERE il.image_id=? ORDER BY il.position", (image_id,)).fetchall()
    tags = [t for (t,) in db.execute("SELECT name FROM tags WHERE image_id=? ORDER BY name", (image_id,))]
    return Image(image_id, json.loads(row[0]), bytes(row[0]), [l for l, _ in layers], [d for _, d in layers], tags)


class StoreReader:
    """Thread-safe lookups of layer entries (a read-only connection per thread)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._local = threading.local()

    def _db(self):
        c = getattr(self._local, "c", None)
        if c is None:
            c = self._local.c = connect(self.store.db_path, readonly=True)
            c.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
        return c

    def close(self) -> None:
        """Closes this thread's connection (before a fork: no SQLite connection may cross one)."""
        c = getattr(self._local, "c", None)
        if c is not None:
            c.close()
            self._local.c = None

    def lookup(self, layer_id: int, path: str) -> Entry | None:
        parent, name = split(path)
        r = self._db().execute(f"SELECT {_COLS} FROM entries WHERE layer_id=? AND parent=? AND name=?",
                               (layer_id, parent, name)).fetchone()
        return None if r is None else _entry(r)

    def children(self, layer_id: int, path: str, limit: int = -1) -> list[tuple[str, Entry]]:
        """The entries of directory `path` in the layer (at most `limit` of them when it is not -1)."""
        if path == "":
            return []
        rows = self._db().execute(
            f"SELECT {_COLS} FROM entries WHERE layer_id=? AND parent=? AND name != '' LIMIT ?",
            (layer_id, path, limit)).fetchall()
        return [(r[14], _entry(r)) for r in rows]

    def subdirs(self, layer_id: int, path: str) -> int:
        """How many directories directory `path` of the layer holds (counted in SQLite: no row reaches Python)."""
        return self._db().execute(
            "SELECT count(*) FROM entries WHERE layer_id=? AND parent=? AND name != '' AND kind='d'",
            (layer_id, path)).fetchone()[0]

    def layer_rows(self, layer_id: int) -> list[tuple]:
        """Every entry of the layer, raw, a directory before what it holds (ordered by parent path, then name):
        (parent, name, kind, mode, uid, gid, mtime_ns, size, object, linkname, rdev, ino, link_ino, xattrs JSON,
        opaque, inlined content or None). For tools that materialise a whole layer."""
        return self._db().execute(
            "SELECT e.parent, e.name, e.kind, e.mode, e.uid, e.gid, e.mtime_ns, e.size, e.object, e.linkname, "
            "e.rdev, e.ino, e.link_ino, e.xattrs, e.opaque, o.data FROM entries e "
            "LEFT JOIN objects o ON o.hash = e.object WHERE e.layer_id=? ORDER BY e.parent, e.name",
            (layer_id,)).fetchall()

    def object_path(self, obj: str) -> str:
        """The file of a file-backed object (contents of up to 4 KiB are inlined and have none: `open_object`)."""
        return self.store.object_path(obj)

    def inline(self, obj: str) -> bytes | None:
        """An inlined content (see `object_path`), or None when `obj` is a file-backed object or unknown."""
        return inline_data(self._db(), obj)

    def inline_many(self, objs: list[str]) -> dict[str, bytes]:
        """The inlined contents among `objs`, by hash, in one query (file-backed and unknown objects are left out)."""
        if not objs:
            return {}
        marks = ",".join("?" * len(objs))
        rows = self._db().execute(f"SELECT hash, data FROM objects WHERE hash IN ({marks}) AND data IS NOT NULL",
                                  objs).fetchall()
        return {h: bytes(d) for h, d in rows}

    def open_object(self, obj: str) -> int:
        """A read-only fd on a content object. An inlined content comes as a sealed memfd, so callers can treat
        both alike (read, pread, copy_file_range). FileNotFoundError when the object is gone."""
        try:
            return os.open(self.store.object_path(obj), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            pass
        data = inline_data(self._db(), obj)
        if data is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), self.store.object_path(obj))
        return self._memfd(data)

    @staticmethod
    def _memfd(data: bytes) -> int:
        fd = os.memfd_create("lamina-object", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.lseek(fd, 0, os.SEEK_SET)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW |
                        fcntl.F_SEAL_WRITE)
        except BaseException:
            os.close(fd)
            raise
        return fd


class OpenStore:
    """What `open_store()` returns: an opened store with image resolution and a reader."""

    def __init__(self, root: str | None) -> None:
        self.store = Store(root)
        self._readers: list[StoreReader] = []

    @property
    def root(self) -> str:
        return str(self.store.root)

    def image(self, ref: str) -> Image:
        return load_image(self.store, resolve(self.store, ref))

    def reader(self) -> StoreReader:
        r = StoreReader(self.store)
        self._readers.append(r)
        return r

    def close(self) -> None:
        """Closes this thread's connections, its readers' too: a reader's connection left to the garbage collector
        may still be open when the process forks (a build's next RUN step), and none may cross a fork."""
        for r in self._readers:
            r.close()
        self.store.close()

    def __enter__(self) -> "OpenStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_store(root: str | None = None) -> OpenStore:
    return OpenStore(root)
