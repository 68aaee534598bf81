"""The read-side record of one path in one stored layer, shared by the store and its consumers.

The union filesystem and the runtime see a layer only through `Entry` rows handed out by
`store.reader.StoreReader`; they never touch SQLite or the object directory layout themselves.
"""
from __future__ import annotations

import stat
from typing import NamedTuple

# Entry kinds, one letter each as stored in the `entries.kind` column.
FILE, DIR, SYMLINK, CHAR, BLOCK, FIFO, WHITEOUT = "f", "d", "l", "c", "b", "p", "w"

KIND_TO_IFMT = {
    FILE: stat.S_IFREG,
    DIR: stat.S_IFDIR,
    SYMLINK: stat.S_IFLNK,
    CHAR: stat.S_IFCHR,
    BLOCK: stat.S_IFBLK,
    FIFO: stat.S_IFIFO,
    # A whiteout is presented in overlay's own form: a 0/0 character device.
    WHITEOUT: stat.S_IFCHR,
}


class Entry(NamedTuple):
    """One path of one layer. Paths are absolute within the layer: '/' is its root, '/etc/passwd' a file."""

    ino: int  # stable and unique across the store; hardlinked entries of a layer share it
    kind: str  # one of FILE, DIR, SYMLINK, CHAR, BLOCK, FIFO, WHITEOUT
    mode: int  # full st_mode: type bits | permission bits
    uid: int
    gid: int
    mtime_ns: int
    size: int  # content size for files, len(target) for symlinks, 0 otherwise
    object: str | None  # hex XXH3-128 of a regular file's content
    linkname: str | None  # a symlink's target
    rdev: int  # os.makedev(major, minor) for device nodes
    nlink: int  # hardlink count within the layer (1 for most files)
    xattrs: dict[str, bytes] | None
    opaque: bool  # a directory that hides everything below it (OCI .wh..wh..opq)


_NS_MAX = 2**63


def mtime_to_db(ns: int) -> int | str:
    """A time as `entries.mtime_ns` holds it: an integer of nanoseconds where SQLite's 64 bits hold it (the years
    1677-2262), else exactly as text, "<ns>ns" (a file may be dated anywhere in 64-bit seconds)."""
    return ns if -_NS_MAX <= ns < _NS_MAX else f"{ns}ns"


def mtime_from_db(v: int | str) -> int:
    return v if type(v) is int else int(v[:-2])  # type: ignore[index]


def split(path: str) -> tuple[str, str]:
    """A layer path as the index keys it: (parent, name); the root is ('', '')."""
    if path == "/":
        return "", ""
    parent, _, name = path.rpartition("/")
    return parent or "/", name
