"""Turning one layer tar into store rows: entries, content objects and the tar skeleton.

This is where OCI's layer rules are enforced (image-spec layer.md): paths are normalised and must stay inside the
layer, no path appears twice, no entry is written through a symlink or other non-directory of the same layer,
hardlinks point at an earlier non-directory of the same layer, and whiteouts (`.wh.<name>`, `.wh..wh..opq`) are
recorded as whiteout entries and opaque directories. The store never extracts anything to disk by path, so no
input can make it write outside its root.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import sqlite3
import stat
import tarfile
from dataclasses import dataclass, field
from decimal import ROUND_FLOOR, Decimal
from typing import BinaryIO, Callable, Iterator

from .entries import (BLOCK, CHAR, DIR, FIFO, FILE, KIND_TO_IFMT, SYMLINK, WHITEOUT, mtime_from_db, mtime_to_db,
                      split)
from .errors import BadInput
from .objects import SMALL, ObjectStager
from .tarsplit import HEADERS_MAX, SkeletonWriter, StrictTarInfo, TarStream, show

WH_PREFIX = ".wh."
WH_OPAQUE = ".wh..wh..opq"

_TYPES = {
    tarfile.REGTYPE: FILE, tarfile.AREGTYPE: FILE, tarfile.CONTTYPE: FILE,
    tarfile.DIRTYPE: DIR, tarfile.SYMTYPE: SYMLINK, tarfile.CHRTYPE: CHAR,
    tarfile.BLKTYPE: BLOCK, tarfile.FIFOTYPE: FIFO,
}
_KIND_NAMES = {FILE: "file", DIR: "directory", SYMLINK: "symlink", CHAR: "character device",
               BLOCK: "block device", FIFO: "fifo", WHITEOUT: "whiteout"}

# Row layout while importing (a list per path, kept in a scratch table until the commit: `_Layer`).
(P_KIND, P_MODE, P_UID, P_GID, P_MTIME, P_SIZE, P_OBJ, P_LINK, P_RDEV, P_LEADER, P_XATTRS, P_OPAQUE,
 P_IMPLICIT) = range(13)


# What the kernel takes: a path argument of PATH_MAX bytes with its NUL, names of NAME_MAX bytes, 32-bit ids (the
# last, (uid_t)-1, meaning "no change" to chown), 64-bit seconds, xattr values of XATTR_SIZE_MAX bytes, device
# numbers of 12 + 20 bits. A layer
# path (relative to the layer's root) or symlink target beyond these could never be made or used by a container;
# refused, they also bound the index: a 16,000-component name in a 40 KB tar made 550 MB of parent rows.
PATH_MAX = 4096
NAME_MAX = 255
ID_MAX = 2**32 - 2
TIME_MIN, TIME_MAX = -(2**63), 2**63 - 1
XATTR_SIZE_MAX = 65536
# PAX header records hold decimal numbers ("mtime" with a fraction); anything else is refused, as Go's archive/tar
# (which docker and podman use) refuses it, rather than read as 0 as Python's tarfile does.
_PAX_INT = re.compile(r"[+-]?[0-9]{1,30}")
_PAX_TIME = re.compile(r"[+-]?[0-9]{1,30}(?:\.[0-9]*)?")
def normalize(name: str, what: str = "path") -> str:
    """Tar member name -> absolute layer path ('/' is the root). Refuses absolute and escaping names, and names
    the kernel could not take (longer than PATH_MAX, a component longer than NAME_MAX)."""
    if name.startswith("/"):
        raise BadInput(f"absolute {what} in layer: {show(name)}")
    if len(name) >= PATH_MAX * 4:  # cannot fit in PATH_MAX bytes whatever it holds: spare splitting it
        raise BadInput(f"{what} longer than PATH_MAX ({PATH_MAX} bytes) in layer: {show(name)}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise BadInput(f"{what} escapes the layer: {show(name)}")
    try:
        joined = "/".join(parts)
        size = len(joined.encode("utf-8"))
    except UnicodeEncodeError:
        raise BadInput(f"non-UTF-8 {what} in layer: {show(name)}") from None
    if size >= PATH_MAX:
        raise BadInput(f"{what} longer than PATH_MAX ({PATH_MAX} bytes) in layer: {show(name)} ({size} bytes)")
    if size > NAME_MAX and any(len(p.encode("utf-8")) > NAME_MAX for p in parts):
        raise BadInput(f"{what} has a name longer than NAME_MAX ({NAME_MAX} bytes) in layer: {show(name)}")
    return "/" + joined


def _pax_int(ti: tarfile.TarInfo, key: str) -> None:
    raw = ti.pax_headers.get(key)
    if raw is not None and not _PAX_INT.fullmatch(raw):
        raise BadInput(f"{show(ti.name)}: bad PAX {key} {show(raw)}")


def _mtime_ns(ti: tarfile.TarInfo) -> int:
    """The exact time in nanoseconds: PAX `mtime` (decimal seconds, any sign and fraction) over the header's."""
    raw = ti.pax_headers.get("mtime")
    if raw is not None:
        if not _PAX_TIME.fullmatch(raw):
            raise BadInput(f"{show(ti.name)}: bad PAX mtime {show(raw)}")
        t = Decimal(raw)
        if not TIME_MIN <= t < TIME_MAX + 1:
            raise BadInput(f"{show(ti.name)}: PAX mtime {show(raw)} is outside 64-bit seconds")
        return int(t.scaleb(9).to_integral_value(ROUND_FLOOR))  # a timespec's: the second below, then ns
    if not TIME_MIN <= ti.mtime <= TIME_MAX:
        raise BadInput(f"{show(ti.name)}: mtime {ti.mtime} is outside 64-bit seconds")
    return int(ti.mtime) * 1_000_000_000


def _check_numbers(ti: tarfile.TarInfo) -> None:
    """Owners, device numbers and sizes within what the kernel (and the index's 64-bit integers) can hold."""
    for key in ("uid", "gid", "size"):
        _pax_int(ti, key)
    for what, v in (("uid", ti.uid), ("gid", ti.gid)):
        if not 0 <= v <= ID_MAX:
            raise BadInput(f"{show(ti.name)}: {what} {v} is outside 0-{ID_MAX}")
    if ti.type in (tarfile.CHRTYPE, tarfile.BLKTYPE) and not (0 <= ti.devmajor < 1 << 12 and
                                                              0 <= ti.devminor < 1 << 20):
        # mknod(2) takes a 32-bit device number: 12 bits of major, 20 of minor
        raise BadInput(f"{show(ti.name)}: device {ti.devmajor}:{ti.devminor} is beyond Linux's (12-bit major, "
                       "20-bit minor)")
    if not 0 <= ti.size <= TIME_MAX:
        raise BadInput(f"{show(ti.name)}: size {ti.size} is out of range")


def _xattrs(ti: tarfile.TarInfo) -> str | None:
    found = {}
    for k, v in ti.pax_headers.items():
        if k.startswith("SCHILY.xattr."):
            name = k[len("SCHILY.xattr."):]
            value = v.encode("utf-8", "surrogateescape")
            if not 0 < len(name.encode("utf-8", "surrogateescape")) <= NAME_MAX or len(value) > XATTR_SIZE_MAX:
                raise BadInput(f"{show(ti.name)}: xattr {show(name)} has a name or value the kernel refuses")
            found[name] = value.hex()
    return json.dumps(found, sort_keys=True) if found else None


@dataclass
class LayerData:
    """What one ingested layer contributes to the index; committed by `store.importer`. Its rows wait in a scratch
    SQLite file (`rows_db`) rather than in memory: a 9 MB gzip of a million empty files took 0.95 GB as lists."""

    diff_id: str
    size: int
    content_size: int
    tarsplit: str
    rows_db: str
    n_entries: int
    max_mtime_ns: int
    # Contents the skeleton holds that no row names: whiteout files' (store/schema.py, skeleton_objects)
    skeleton_objects: set[str] = field(default_factory=set, repr=False)

    def entry_rows(self, layer_id: int, first_ino: int) -> Iterator[tuple]:
        """The layer's `entries` rows in tar order, numbered from `first_ino`: hardlinks name their leader's number
        and share its link count."""
        db = sqlite3.connect(self.rows_db)
        try:
            for r in db.execute("SELECT r.seq, r.parent, r.name, r.kind, r.mode, r.uid, r.gid, r.mtime, r.size, "
                                "r.obj, r.link, r.rdev, r.leader, coalesce(l.nlink, r.nlink), r.xattrs, r.opaque, "
                                "r.implicit FROM r LEFT JOIN r AS l ON l.seq = r.leader ORDER BY r.seq"):
                base = first_ino - 1
                yield (base + r[0], layer_id, *r[1:12], base + r[12] if r[12] else None, *r[13:])
        finally:
            db.close()

    def unnamed_objects(self) -> set[str]:
        """The skeleton's objects that no row names (see `skeleton_objects`)."""
        out = set(self.skeleton_objects)
        hashes = sorted(out)
        db = sqlite3.connect(self.rows_db)
        try:
            for i in range(0, len(hashes), 500):
                part = hashes[i:i + 500]
                out.difference_update(h for (h,) in db.execute(
                    f"SELECT DISTINCT obj FROM r WHERE obj IN ({','.join('?' * len(part))})", part))
        finally:
            db.close()
        return out


# The scratch table: one row per path as `entries` will hold it, in tar order (seq); `leader` is the seq of the
# first name of a hardlinked file, whose `nlink` counts the names.
_SCRATCH = """
CREATE TABLE r (seq INTEGER PRIMARY KEY, parent TEXT NOT NULL, name TEXT NOT NULL, kind TEXT NOT NULL,
                mode INTEGER NOT NULL, uid INTEGER NOT NULL, gid INTEGER NOT NULL, mtime NOT NULL,
                size INTEGER NOT NULL, obj TEXT, link TEXT, rdev INTEGER NOT NULL, leader INTEGER, xattrs TEXT,
                opaque INTEGER NOT NULL, implicit INTEGER NOT NULL, nlink INTEGER NOT NULL DEFAULT 1,
                UNIQUE (parent, name));
"""
_FIELDS = "kind, mode, uid, gid, mtime, size, obj, link, rdev, leader, xattrs, opaque, implicit"  # P_* order
_DIRS_CACHED = 1 << 14
_layer_seq = itertools.count()


def _implicit_dir(opaque: int = 0) -> list:
    return [DIR, stat.S_IFDIR | 0o755, 0, 0, 0, 0, None, None, 0, None, None, opaque, 1]


class _Layer:
    """The rows of the layer being read, in a scratch SQLite file: memory stays bounded whatever the entry count,
    and the checks (parents, duplicates, hardlink targets) are indexed lookups."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None)
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "cache_size=-16384"):
            self.db.execute(f"PRAGMA {pragma}")
        self.db.executescript(_SCRATCH)
        self.db.execute("BEGIN")
        self.n = 0
        self.max_mtime = 0
        # Paths known to be directories: a directory of the layer stays one (a later entry of the same path is
        # refused, or merged into it), so the cache is never stale. Bounded: cleared when full.
        self.dirs: set[str] = set()
        self._insert("/", _implicit_dir())

    def close(self) -> None:
        self.db.commit()
        self.db.close()

    def get(self, path: str) -> list | None:
        """The row at `path` as [seq, *P_* fields], or None."""
        parent, name = split(path)
        r = self.db.execute(f"SELECT seq, {_FIELDS} FROM r WHERE parent=? AND name=?", (parent, name)).fetchone()
        return None if r is None else list(r)

    def _insert(self, path: str, row: list) -> None:
        parent, name = split(path)
        values = list(row)
        values[P_MTIME] = mtime_to_db(row[P_MTIME])
        self.db.execute(f"INSERT INTO r(parent, name, {_FIELDS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                        (parent, name, *values))
        self.n += 1
        if row[P_MTIME] > self.max_mtime:
            self.max_mtime = row[P_MTIME]
        if row[P_KIND] == DIR:
            self._dir(path)

    def _replace(self, seq: int, path: str, row: list) -> None:
        """A row for `path` in place of the one it had, keeping its place in tar order (and its inode number)."""
        values = list(row)
        values[P_MTIME] = mtime_to_db(row[P_MTIME])
        sets = ", ".join(f"{f.strip()}=?" for f in _FIELDS.split(","))
        self.db.execute(f"UPDATE r SET {sets}, nlink=1 WHERE seq=?", (*values, seq))
        if row[P_MTIME] > self.max_mtime:
            self.max_mtime = row[P_MTIME]
        if row[P_KIND] == DIR:
            self._dir(path)

    def _dir(self, path: str) -> None:
        if len(self.dirs) >= _DIRS_CACHED:
            self.dirs.clear()
        self.dirs.add(path)

    def _set_opaque(self, seq: int) -> None:
        self.db.execute("UPDATE r SET opaque=1 WHERE seq=?", (seq,))

    def ensure_parents(self, path: str, member: str) -> None:
        if path == "/":
            return  # the root entry ("./") has no parent
        parent = split(path)[0]
        if parent in self.dirs:
            return
        missing = []
        while (row := self.get(parent)) is None:
            missing.append(parent)
            parent = split(parent)[0]
        kind = row[1 + P_KIND]
        if kind == WHITEOUT:  # .wh.d then d/x: d is re-created, hiding what was below
            self._replace(row[0], parent, _implicit_dir(opaque=1))
        elif kind != DIR:
            raise BadInput(f"{show(member)}: parent {parent} is a {_KIND_NAMES[kind]} in this layer, "
                           "not a directory")
        else:
            self._dir(parent)
        for p in reversed(missing):
            self._insert(p, _implicit_dir())

    def add(self, path: str, row: list, member: str) -> None:
        self.ensure_parents(path, member)
        try:
            self._insert(path, row)
            return
        except sqlite3.IntegrityError:  # the path has a row already (one statement where most have none)
            pass
        seq, *old = self.get(path)  # type: ignore[misc]
        if old[P_KIND] == WHITEOUT:
            if row[P_KIND] == DIR:
                row[P_OPAQUE] = 1
        elif old[P_IMPLICIT] and row[P_KIND] == DIR:
            row[P_OPAQUE] |= old[P_OPAQUE]
        elif old[P_IMPLICIT]:
            raise BadInput(f"{show(member)}: is a {_KIND_NAMES[row[P_KIND]]} but has entries below it")
        else:
            raise BadInput(f"duplicate entry in layer: {show(member)}")
        self._replace(seq, path, row)

    def whiteout(self, path: str, member: str) -> None:
        self.ensure_parents(path, member)
        old = self.get(path)
        if old is None:
            self._insert(path, [WHITEOUT, stat.S_IFCHR, 0, 0, 0, 0, None, None, 0, None, None, 0, 0])
        elif old[1 + P_KIND] == DIR:
            self._set_opaque(old[0])  # whiteout plus a directory of the same layer: an opaque directory
        elif old[1 + P_KIND] == WHITEOUT:
            raise BadInput(f"duplicate whiteout in layer: {show(member)}")
        # A whiteout beside a non-directory of the same layer: the file hides the lower one anyway.

    def opaque(self, dirpath: str, member: str) -> None:
        old = self.get(dirpath)
        if old is None:
            self.ensure_parents(dirpath, member)
            self._insert(dirpath, _implicit_dir(opaque=1))
        elif old[1 + P_KIND] == WHITEOUT:
            self._replace(old[0], dirpath, _implicit_dir(opaque=1))
        elif old[1 + P_KIND] != DIR:
            raise BadInput(f"{show(member)}: opaque marker inside a {_KIND_NAMES[old[1 + P_KIND]]}")
        else:
            self._set_opaque(old[0])

    def hardlink(self, path: str, target: str, member: str, linkname: str) -> None:
        trow = self.get(target)
        if trow is None or trow[1 + P_IMPLICIT]:
            raise BadInput(f"hardlink {show(member)} -> {show(linkname)}: target is not in this layer")
        seq, row = trow[0], trow[1:]
        if row[P_KIND] in (DIR, WHITEOUT):
            raise BadInput(f"hardlink {show(member)} -> {show(linkname)}: target is a {_KIND_NAMES[row[P_KIND]]}")
        leader = row[P_LEADER] or seq
        row[P_LEADER] = leader
        row[P_MTIME] = mtime_from_db(row[P_MTIME])
        self.add(path, row, member)
        self.db.execute("UPDATE r SET nlink = nlink + 1 WHERE seq=?", (leader,))


TRAILER_MAX = 16 << 20


def _next(tf: tarfile.TarFile, stream: TarStream) -> tarfile.TarInfo | None:
    """The next member, within bounds, or None at a proper end (end-of-archive blocks, or the input's end)."""
    stream.limit(HEADERS_MAX, f"a member's headers exceed {HEADERS_MAX >> 20} MiB")
    try:
        ti = tf.next()
    except tarfile.ReadError as e:
        raise BadInput(f"corrupt or truncated tar: {e}") from None
    except EOFError:
        raise BadInput("tar is truncated") from None
    except (ValueError, OverflowError) as e:  # what else tarfile lets out of a malformed header
        raise BadInput(f"malformed tar header at byte {tf.offset}: {e}") from None
    finally:
        stream.limit(None)
    if ti is None:
        _check_end(stream)
    return ti


def _check_end(stream: TarStream) -> None:
    if stream.last_block.count(0) != len(stream.last_block):
        # tarfile ends the archive at a header it cannot read (bad checksum, cut short) as if it were the end;
        # the members after it would be lost without a word
        raise BadInput(f"corrupt or truncated tar header at byte {stream.pos - len(stream.last_block)}")


def ingest_tar(src: BinaryIO, stager: ObjectStager, progress: Callable[[int], None] | None = None) -> LayerData:
    """Reads an uncompressed tar stream to its end; stages its objects; returns its rows and identities."""
    skel_path = f"{stager.staging}/skeleton-{id(src)}"
    layer = _Layer(f"{stager.staging}/rows-{next(_layer_seq)}.db")
    content_size = 0
    unnamed: set[str] = set()
    with open(skel_path, "wb") as skel_file:
        skel = SkeletonWriter(skel_file)
        stream = TarStream(src, skel)
        stream.limit(HEADERS_MAX, f"a member's headers exceed {HEADERS_MAX >> 20} MiB")
        try:
            tf = tarfile.open(fileobj=stream, mode="r:", encoding="utf-8", errors="surrogateescape",
                              tarinfo=StrictTarInfo)
        except tarfile.ReadError as e:
            raise BadInput(f"not a valid tar: {e}") from None
        except EOFError:
            raise BadInput("tar is truncated") from None
        except (ValueError, OverflowError) as e:
            raise BadInput(f"malformed tar header: {e}") from None
        if tf.firstmember is None:
            _check_end(stream)
        seen_pos = 0
        while True:
            ti = _next(tf, stream)
            if ti is None:
                break
            member = ti.name
            path = normalize(member)
            _check_numbers(ti)
            base = path.rsplit("/", 1)[1]
            kind = _TYPES.get(ti.type)
            if ti.type == tarfile.LNKTYPE:
                kind = "hardlink"
            elif kind is None or ti.sparse is not None:
                raise BadInput(f"{member}: unsupported tar entry type {ti.type!r}")
            if kind == FILE:
                if ti.size <= SMALL:
                    obj = stager.add_bytes(b"".join(stream.payload(ti.size)))
                else:
                    obj = stager.add_chunks(stream.payload(ti.size))
                skel.payload(obj, ti.size)
            if base.startswith(WH_PREFIX) and path != "/":
                if kind == FILE:
                    unnamed.add(obj)
                parent = split(path)[0]
                if base == WH_OPAQUE:
                    layer.opaque(parent, member)
                elif base.startswith(WH_PREFIX + WH_PREFIX):
                    pass  # aufs bookkeeping (.wh..wh.plnk etc.): kept in the tar, not a path of the layer
                else:
                    hidden = base[len(WH_PREFIX):]
                    if hidden in (".", ".."):
                        raise BadInput(f"whiteout escapes its directory: {member!r}")
                    layer.whiteout(parent.rstrip("/") + "/" + hidden, member)
                continue
            if kind == "hardlink":
                layer.hardlink(path, normalize(ti.linkname, "hardlink target"), member, ti.linkname)
                continue
            mode = KIND_TO_IFMT[kind] | (ti.mode & 0o7777)
            row = [kind, mode, ti.uid, ti.gid, _mtime_ns(ti), 0, None, None, 0, None, _xattrs(ti), 0, 0]
            if kind == FILE:
                row[P_SIZE] = ti.size
                row[P_OBJ] = obj
                content_size += ti.size
            elif kind == SYMLINK:
                try:
                    size = len(ti.linkname.encode("utf-8"))
                except UnicodeEncodeError:
                    # refused as non-UTF-8 paths are (normalize): the index keeps text
                    raise BadInput(f"non-UTF-8 symlink target in layer: {show(member)} -> "
                                   f"{show(ti.linkname)}") from None
                if size >= PATH_MAX:
                    raise BadInput(f"symlink target longer than PATH_MAX ({PATH_MAX} bytes) in layer: "
                                   f"{show(member)}")
                row[P_LINK] = ti.linkname
            elif kind in (CHAR, BLOCK):
                row[P_RDEV] = os.makedev(ti.devmajor, ti.devminor)
            layer.add(path, row, member)
            if progress is not None:
                progress(stream.pos - seen_pos)
                seen_pos = stream.pos
            tf.members.clear()  # tarfile keeps every member it read; nothing here looks back
        stream.drain(TRAILER_MAX)
        skel.close()
    layer.close()
    tarsplit = stager.add_file(skel_path)
    os.unlink(skel_path)
    if progress is not None:
        progress(stream.pos - seen_pos)
    return LayerData(diff_id="sha256:" + stream.sha.hexdigest(), size=stream.pos, content_size=content_size,
                     tarsplit=tarsplit, rows_db=layer.path, n_entries=layer.n, max_mtime_ns=layer.max_mtime,
                     skeleton_objects=unnamed)
