"""Turning one layer tar into store rows: entries, content objects and the tar skeleton.

This is where OCI's layer rules are enforced (image-spec layer.md): paths are normalised and must stay inside the
layer, no path appears twice, no entry is written through a symlink or other non-directory of the same layer,
hardlinks point at an earlier non-directory of the same layer, and whiteouts (`.wh.<name>`, `.wh..wh..opq`) are
recorded as whiteout entries and opaque directories. The store never extracts anything to disk by path, so no
input can make it write outside its root.
"""
from __future__ import annotations

import json
import os
import stat
import tarfile
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import BinaryIO, Callable

from .entries import BLOCK, CHAR, DIR, FIFO, FILE, KIND_TO_IFMT, SYMLINK, WHITEOUT, split
from .errors import BadInput
from .objects import SMALL, ObjectStager
from .tarsplit import SkeletonWriter, TarStream

WH_PREFIX = ".wh."
WH_OPAQUE = ".wh..wh..opq"

_TYPES = {
    tarfile.REGTYPE: FILE, tarfile.AREGTYPE: FILE, tarfile.CONTTYPE: FILE,
    tarfile.DIRTYPE: DIR, tarfile.SYMTYPE: SYMLINK, tarfile.CHRTYPE: CHAR,
    tarfile.BLKTYPE: BLOCK, tarfile.FIFOTYPE: FIFO,
}
_KIND_NAMES = {FILE: "file", DIR: "directory", SYMLINK: "symlink", CHAR: "character device",
               BLOCK: "block device", FIFO: "fifo", WHITEOUT: "whiteout"}

# Row layout while importing (a list per path, turned into `entries` rows at commit).
(P_KIND, P_MODE, P_UID, P_GID, P_MTIME, P_SIZE, P_OBJ, P_LINK, P_RDEV, P_LEADER, P_XATTRS, P_OPAQUE,
 P_IMPLICIT) = range(13)


def normalize(name: str, what: str = "path") -> str:
    """Tar member name -> absolute layer path ('/' is the root). Refuses absolute and escaping names."""
    if name.startswith("/"):
        raise BadInput(f"absolute {what} in layer: {name!r}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise BadInput(f"{what} escapes the layer: {name!r}")
    try:
        joined = "/".join(parts)
        joined.encode("utf-8")
    except UnicodeEncodeError:
        raise BadInput(f"non-UTF-8 {what} in layer: {name!r}") from None
    return "/" + joined


def _mtime_ns(ti: tarfile.TarInfo) -> int:
    raw = ti.pax_headers.get("mtime")
    if raw is not None:
        try:
            return int(Decimal(raw) * 1_000_000_000)
        except InvalidOperation:
            raise BadInput(f"{ti.name}: bad PAX mtime {raw!r}") from None
    return int(ti.mtime) * 1_000_000_000


def _xattrs(ti: tarfile.TarInfo) -> str | None:
    found = {}
    for k, v in ti.pax_headers.items():
        if k.startswith("SCHILY.xattr."):
            found[k[len("SCHILY.xattr."):]] = v.encode("utf-8", "surrogateescape").hex()
    return json.dumps(found, sort_keys=True) if found else None


@dataclass
class LayerData:
    """What one ingested layer contributes to the index; committed by `store.importer`."""

    diff_id: str
    size: int
    content_size: int
    tarsplit: str
    rows: dict[str, list] = field(repr=False)  # path -> row (see P_* above), in tar order
    # Contents the skeleton holds that no row names: whiteout files' (store/schema.py, skeleton_objects)
    skeleton_objects: set[str] = field(default_factory=set, repr=False)


def _implicit_dir() -> list:
    return [DIR, stat.S_IFDIR | 0o755, 0, 0, 0, 0, None, None, 0, None, None, 0, 1]


class _Layer:
    def __init__(self) -> None:
        self.rows: dict[str, list] = {"/": _implicit_dir()}

    def ensure_parents(self, path: str, member: str) -> None:
        if path == "/":
            return  # the root entry ("./") has no parent
        parent = split(path)[0]
        missing = []
        while parent not in self.rows:
            missing.append(parent)
            parent = split(parent)[0]
        row = self.rows[parent]
        if row[P_KIND] == WHITEOUT:  # .wh.d then d/x: d is re-created, hiding what was below
            self.rows[parent] = row = _implicit_dir()
            row[P_OPAQUE] = 1
        if row[P_KIND] != DIR:
            raise BadInput(f"{member}: parent {parent} is a {_KIND_NAMES[row[P_KIND]]} in this layer, not a directory")
        for p in reversed(missing):
            self.rows[p] = _implicit_dir()

    def add(self, path: str, row: list, member: str) -> None:
        self.ensure_parents(path, member)
        old = self.rows.get(path)
        if old is not None:
            if old[P_KIND] == WHITEOUT:
                if row[P_KIND] == DIR:
                    row[P_OPAQUE] = 1
            elif old[P_IMPLICIT] and row[P_KIND] == DIR:
                row[P_OPAQUE] |= old[P_OPAQUE]
            elif old[P_IMPLICIT]:
                raise BadInput(f"{member}: is a {_KIND_NAMES[row[P_KIND]]} but has entries below it")
            else:
                raise BadInput(f"duplicate entry in layer: {member}")
        self.rows[path] = row

    def whiteout(self, path: str, member: str) -> None:
        self.ensure_parents(path, member)
        old = self.rows.get(path)
        if old is None:
            self.rows[path] = [WHITEOUT, stat.S_IFCHR, 0, 0, 0, 0, None, None, 0, None, None, 0, 0]
        elif old[P_KIND] == DIR:
            old[P_OPAQUE] = 1  # whiteout plus a directory of the same layer: an opaque directory
        elif old[P_KIND] == WHITEOUT:
            raise BadInput(f"duplicate whiteout in layer: {member}")
        # A whiteout beside a non-directory of the same layer: the file hides the lower one anyway.

    def opaque(self, dirpath: str, member: str) -> None:
        if dirpath not in self.rows:
            self.ensure_parents(dirpath, member)
            self.rows[dirpath] = _implicit_dir()
        row = self.rows[dirpath]
        if row[P_KIND] == WHITEOUT:
            self.rows[dirpath] = row = _implicit_dir()
        if row[P_KIND] != DIR:
            raise BadInput(f"{member}: opaque marker inside a {_KIND_NAMES[row[P_KIND]]}")
        row[P_OPAQUE] = 1


def ingest_tar(src: BinaryIO, stager: ObjectStager, progress: Callable[[int], None] | None = None) -> LayerData:
    """Reads an uncompressed tar stream to its end; stages its objects; returns its rows and identities."""
    skel_path = f"{stager.staging}/skeleton-{id(src)}"
    layer = _Layer()
    content_size = 0
    unnamed: set[str] = set()
    with open(skel_path, "wb") as skel_file:
        skel = SkeletonWriter(skel_file)
        stream = TarStream(src, skel)
        try:
            tf = tarfile.open(fileobj=stream, mode="r:", encoding="utf-8", errors="surrogateescape")
        except tarfile.ReadError as e:
            raise BadInput(f"not a valid tar: {e}") from None
        except EOFError:
            raise BadInput("tar is truncated") from None
        seen_pos = 0
        while True:
            try:
                ti = tf.next()
            except tarfile.ReadError as e:
                raise BadInput(f"corrupt or truncated tar: {e}") from None
            except EOFError:
                raise BadInput("tar is truncated") from None
            if ti is None:
                break
            member = ti.name
            path = normalize(member)
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
                target = normalize(ti.linkname, "hardlink target")
                trow = layer.rows.get(target)
                if trow is None or trow[P_IMPLICIT]:
                    raise BadInput(f"hardlink {member} -> {ti.linkname}: target is not in this layer")
                if trow[P_KIND] in (DIR, WHITEOUT):
                    raise BadInput(f"hardlink {member} -> {ti.linkname}: target is a {_KIND_NAMES[trow[P_KIND]]}")
                leader = trow[P_LEADER] or target
                row = list(trow)
                row[P_LEADER] = leader
                lrow = layer.rows[leader]
                if lrow[P_LEADER] is None:
                    lrow[P_LEADER] = ""  # marks a group leader (it has members)
                layer.add(path, row, member)
                continue
            mode = KIND_TO_IFMT[kind] | (ti.mode & 0o7777)
            row = [kind, mode, ti.uid, ti.gid, _mtime_ns(ti), 0, None, None, 0, None, _xattrs(ti), 0, 0]
            if kind == FILE:
                row[P_SIZE] = ti.size
                row[P_OBJ] = obj
                content_size += ti.size
            elif kind == SYMLINK:
                try:
                    ti.linkname.encode("utf-8")
                except UnicodeEncodeError:
                    # refused as non-UTF-8 paths are (normalize): the index keeps text
                    raise BadInput(f"non-UTF-8 symlink target in layer: {member} -> {ti.linkname!r}") from None
                row[P_LINK] = ti.linkname
            elif kind in (CHAR, BLOCK):
                row[P_RDEV] = os.makedev(ti.devmajor, ti.devminor)
            layer.add(path, row, member)
            if progress is not None:
                progress(stream.pos - seen_pos)
                seen_pos = stream.pos
        stream.drain()
        skel.close()
    tarsplit = stager.add_file(skel_path)
    os.unlink(skel_path)
    if progress is not None:
        progress(stream.pos - seen_pos)
    return LayerData(diff_id="sha256:" + stream.sha.hexdigest(), size=stream.pos,
                     content_size=content_size, tarsplit=tarsplit, rows=layer.rows, skeleton_objects=unnamed)
