"""A layer of lamina's store as a union layer: entries come from `store.reader.StoreReader`, content from objects.

The store hands out `Entry` rows; this module turns them into `layers.Record`s (whiteouts and opaque directories
included) and opens object files for content. A missing object, or one whose size disagrees with its entry, gives
EIO for that file alone and a log line, so that one damaged object never takes the mount down.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import stat
import threading

from store.entries import DIR, WHITEOUT, Entry
from store.reader import StoreReader
from store.schema import INLINE_MAX

from .layers import Record, is_private_xattr

log = logging.getLogger("lamina.fs")
# Store inode numbers live in their own range so they never meet the upper directory's.
STORE_INO_TAG = 1 << 60
# Directories whose entries are kept, and how many entries all of them may hold (~10 MB at most; 8k entries saved
# 2.5 MB of the daemon's 56 MB after a 100,000-file walk but left a 10,000-entry listing to 10,000 queries);
# a directory is looked into whole when it has at most _PREFETCH_MAX entries, else name by name.
_LISTED_DIRS = 64
_LISTED_ENTRIES = 32768
_PREFETCH_MAX = 1024
# Inlined contents read ahead, per directory: the _READ_AHEAD_AT-th open of an inlined file in a directory reads
# those of all its inlined files in one query when they total _CONTENTS_DIR_MAX bytes at most, and the last
# directories' are kept up to _CONTENTS_MAX bytes in all. One query per open ties a worker up (SQLite's read
# transaction and page reads, releasing and retaking the GIL): 4 readers of 5,000 files of 1.5 KiB took 370-390 ms
# so, 320-375 ms with read-ahead (interleaved runs), 270 ms with contents from memory; the rest is SQLite reading
# the objects' overflow pages, ~8 us per content either way. A single query is ~12 us (more under load), so a
# directory only a few of whose files are opened reads them singly rather than all.
_READ_AHEAD_AT = 8
_CONTENTS_DIR_MAX = 512 << 10
_CONTENTS_MAX = 2 << 20
_CONTENTS_DIRS = 64
_OPENED_DIRS = 64
# What an object name may be: a hex digest (an index naming "../.." must never open a file outside the store)
_OBJECT_NAME = re.compile(r"[0-9a-f]{16,128}")


class StoreLayer:
    def __init__(self, reader: StoreReader, layer_id: int, name: str | None = None) -> None:
        self.reader = reader
        self.layer_id = layer_id
        self.name = name or f"layer {layer_id}"
        # The entries of the last few directories looked into or listed, whole: layers never change, and a name is
        # looked up in a directory whose siblings follow (a listing answering READDIRPLUS, a walk, a PATH or
        # sys.path search, whose misses every layer of the stack answers), so one query answers them all.
        self._listed: dict[str, dict[str, Entry]] = {}
        self._listed_n = 0
        self._listed_mu = threading.Lock()
        self._big: set[str] = set()  # directories above _PREFETCH_MAX: looked up name by name
        self._contents: dict[str, dict[str, bytes] | None] = {}  # directory -> object hash -> inlined content
        self._contents_n = 0
        self._opened: dict[str, int] = {}  # directory -> opens of its inlined files so far (the last _OPENED_DIRS)

    def _remember(self, path: str, children: dict[str, Entry]) -> None:
        if len(children) > _LISTED_ENTRIES:
            return
        with self._listed_mu:
            if path in self._listed:
                return
            while self._listed and (len(self._listed) >= _LISTED_DIRS or
                                    self._listed_n + len(children) > _LISTED_ENTRIES):
                self._listed_n -= len(self._listed.pop(next(iter(self._listed))))
            self._listed[path] = children
            self._listed_n += len(children)

    def _entry(self, path: str) -> Entry | None:
        if path == "/":
            return self.reader.lookup(self.layer_id, path)
        head, _, name = path.rpartition("/")
        head = head or "/"
        listed = self._listed.get(head)
        if listed is None and head not in self._big:
            rows = self.reader.children(self.layer_id, head, limit=_PREFETCH_MAX + 1)
            if len(rows) > _PREFETCH_MAX:
                self._big.add(head)
            else:
                listed = dict(rows)
                self._remember(head, listed)
        if listed is not None:
            return listed.get(name)
        return self.reader.lookup(self.layer_id, path)

    def _record(self, e: Entry) -> Record:
        if e.kind == WHITEOUT:
            return Record(mode=stat.S_IFCHR, ino=0, whiteout=True)
        size = len(os.fsencode(e.linkname)) if e.linkname is not None and stat.S_ISLNK(e.mode) else e.size
        return Record(
            mode=e.mode, ino=e.ino | STORE_INO_TAG, nlink=e.nlink or 1, uid=e.uid, gid=e.gid, size=size,
            atime_ns=e.mtime_ns, mtime_ns=e.mtime_ns, ctime_ns=e.mtime_ns, rdev=e.rdev,
            blocks=(e.size + 511) // 512, opaque=bool(e.opaque),
        )

    def lookup(self, path: str) -> Record | None:
        e = self._entry(path)
        if e is None:
            if path == "/":  # a layer that never mentions its root still has one
                return Record(mode=stat.S_IFDIR | 0o755, ino=STORE_INO_TAG | 1, nlink=2)
            return None
        return self._record(e)

    def listdir(self, path: str) -> list[tuple[str, int, int, bool]]:
        out = []
        children = self.reader.children(self.layer_id, path)
        self._remember(path, dict(children))
        for name, e in children:
            if e.kind == WHITEOUT:
                out.append((name, stat.S_IFCHR, 0, True))
            else:
                out.append((name, stat.S_IFMT(e.mode), e.ino | STORE_INO_TAG, False))
        return out

    def dir_nlink(self, path: str) -> int:
        """A directory's link count as a filesystem would give it: 2 plus its subdirectories."""
        listed = self._listed.get(path)
        if listed is None:
            # a listing's READDIRPLUS asks this of every subdirectory: building their entries took a store mount's
            # first `ls /` 10 ms for 50 subdirectories of 100 entries each
            return 2 + self.reader.subdirs(self.layer_id, path)
        return 2 + sum(1 for e in listed.values() if e.kind == DIR)

    def open_read(self, path: str) -> int:
        e = self._entry(path)
        if e is None:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        if e.object is None:
            if e.size == 0:
                return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            log.error("%s: %s has no content object", self.name, path)
            raise OSError(errno.EIO, os.strerror(errno.EIO), path)
        if not _OBJECT_NAME.fullmatch(e.object):
            log.error("%s: %s: %r is no object name", self.name, path, e.object)
            raise OSError(errno.EIO, os.strerror(errno.EIO), path)
        try:
            fd = self.reader.open_object(e.object)
        except FileNotFoundError:
            log.error("%s: %s: object %s is missing", self.name, path, e.object)
            raise OSError(errno.EIO, os.strerror(errno.EIO), path) from None
        size = os.fstat(fd).st_size
        if size != e.size:
            os.close(fd)
            raise self._corrupt(path, e, size)
        return fd

    def _corrupt(self, path: str, e: Entry, size: int) -> OSError:
        log.error("%s: %s: object %s is corrupt (%d bytes, expected %d)", self.name, path, e.object, size, e.size)
        return OSError(errno.EIO, os.strerror(errno.EIO), path)

    def read_small(self, path: str) -> bytes | None:
        """The whole content of a file inlined in the index (INLINE_MAX bytes at most), else None (open_read it).

        The union serves such a file from these bytes while it is open: no memfd to build, no fd to read."""
        e = self._entry(path)
        if e is None or e.size > INLINE_MAX:
            return None
        if e.object is None:
            return b"" if e.size == 0 else None  # (open_read says why the content is missing)
        head = path.rpartition("/")[0] or "/"
        got = self._contents.get(head)
        if got is None and head not in self._contents:
            got = self._read_ahead(head)
        data = None if got is None else got.get(e.object)
        if data is None:
            data = self.reader.inline(e.object)
        if data is not None and len(data) != e.size:
            raise self._corrupt(path, e, len(data))
        return data

    def _read_ahead(self, head: str) -> dict[str, bytes] | None:
        """The inlined contents of directory `head`'s files by object hash, read in one query and kept, at the
        _READ_AHEAD_AT-th call for `head` (see _CONTENTS_DIR_MAX); None where each open reads its own."""
        with self._listed_mu:
            n = self._opened.pop(head, 0) + 1
            if n < _READ_AHEAD_AT:
                self._opened[head] = n
                while len(self._opened) > _OPENED_DIRS:
                    del self._opened[next(iter(self._opened))]
                return None
            # (this call reads ahead; opens meanwhile read their own rather than the same)
        listed = self._listed.get(head)
        if listed is None:
            return None  # a directory looked up name by name (or just forgotten): nothing to count on
        want = {e.object: e.size for e in listed.values()
                if e.object is not None and 0 < e.size <= INLINE_MAX and stat.S_ISREG(e.mode)}
        total = sum(want.values())
        got = self.reader.inline_many(list(want)) if total <= _CONTENTS_DIR_MAX else None
        size = 0 if got is None else sum(map(len, got.values()))
        with self._listed_mu:
            if head not in self._contents:
                while self._contents and (len(self._contents) >= _CONTENTS_DIRS or
                                          self._contents_n + size > _CONTENTS_MAX):
                    old = self._contents.pop(next(iter(self._contents)))
                    self._contents_n -= 0 if old is None else sum(map(len, old.values()))
                self._contents[head] = got  # None: too much to read ahead, each open reads its own
                self._contents_n += size
        return got

    def readlink(self, path: str) -> str:
        e = self._entry(path)
        if e is None or e.linkname is None:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)
        return e.linkname

    def listxattr(self, path: str) -> list[str]:
        e = self._entry(path)
        return [n for n in (e.xattrs or {}) if not is_private_xattr(n)] if e else []

    def getxattr(self, path: str, name: str) -> bytes:
        e = self._entry(path)
        if e is None or not e.xattrs or name not in e.xattrs:
            raise OSError(errno.ENODATA, os.strerror(errno.ENODATA), path)
        return e.xattrs[name]

    def statvfs(self) -> os.statvfs_result:
        return os.statvfs(self.reader.store.root)
