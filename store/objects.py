"""Content objects: staging new contents during an import and publishing them durably into objects/.

Every distinct file content is stored once, named by its XXH3-128. XXH3 is not cryptographic, so a hash hit is
trusted only after the bytes compare equal (as ZFS's dedup=verify does); a mismatch is refused, never merged.
New objects are written to the import's staging directory, moved into objects/ with renameat2(RENAME_NOREPLACE)
(a plain rename would silently replace an object of the same name; this fails instead, and the two are compared),
then made durable, contents and names together, by one syncfs() before the index commit that makes them
reachable (an fsync per file would cap small-file imports at the disk's sync rate).
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
from typing import Iterable, Iterator

import xxhash

from .errors import BadInput, Corrupt
from .schema import INLINE_MAX

SMALL = 1 << 20  # contents up to this size are hashed and compared in memory
CHUNK = 1 << 20

_libc = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def rename_noreplace(src: str, dst: str) -> None:
    """rename(2) that raises FileExistsError instead of replacing dst."""
    if _libc.renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), dst) if e != errno.EEXIST else FileExistsError(e, "exists", dst)


def syncfs(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), path)
    finally:
        os.close(fd)


def hash_bytes(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def same_content(path: str, data: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(data) + 1) == data
    except FileNotFoundError:
        return False


def same_files(a: str, b: str) -> bool:
    try:
        with open(a, "rb") as fa, open(b, "rb") as fb:
            if os.fstat(fa.fileno()).st_size != os.fstat(fb.fileno()).st_size:
                return False
            while True:
                x, y = fa.read(CHUNK), fb.read(CHUNK)
                if x != y:
                    return False
                if not x:
                    return True
    except FileNotFoundError:
        return False


def hash_file(path: str) -> tuple[str, int]:
    h = xxhash.xxh3_128()
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def _write_all(fd: int, data: bytes, offset: int) -> int:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
    return len(data)


HOLE = 64 << 10
_ZEROS = bytes(HOLE)


def _write_sparse(f, chunk: bytes) -> None:
    """Writes `chunk` at f's position, leaving aligned runs of 64 KiB of zeros as holes (seeked over), so a
    sparse file, or any long run of zeros, takes no disk blocks in the store where the filesystem has holes."""
    view = memoryview(chunk)
    for i in range(0, len(view), HOLE):
        part = view[i:i + HOLE]
        if len(part) == HOLE and part == _ZEROS:
            f.seek(HOLE, os.SEEK_CUR)
        else:
            f.write(part)


class ObjectStager:
    """Collects the new objects of one import until `publish()`: contents of up to INLINE_MAX bytes in a spool
    file (they will live in the index), larger ones as files in the staging directory."""

    def __init__(self, store, staging: str) -> None:
        self.store = store
        self.staging = staging
        self.new: dict[str, int] = {}  # hash -> size, file-backed, staged in this import
        self.inline: dict[str, tuple[int, int]] = {}  # hash -> (offset, size) in the spool
        self._spool = os.open(f"{staging}/inline.spool", os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self._spool_end = 0
        self._lookup = store.db.execute
        self._tmp_seq = 0

    def _staged(self, h: str) -> str:
        return f"{self.staging}/{h}"

    def _existing(self, h: str) -> tuple[int, bytes | None] | None:
        return self._lookup("SELECT size, data FROM objects WHERE hash=?", (h,)).fetchone()

    def _spooled(self, h: str) -> bytes:
        off, n = self.inline[h]
        return os.pread(self._spool, n, off)

    def add_bytes(self, data: bytes) -> str:
        h = hash_bytes(data)
        if h in self.new or h in self.inline:
            same = self._spooled(h) == data if h in self.inline else same_content(self._staged(h), data)
            if not same:
                raise BadInput(f"two different contents share XXH3-128 {h}: refusing a hash collision")
            return h
        row = self._existing(h)
        if row is not None:
            same = bytes(row[1]) == data if row[1] is not None else same_content(self.store.object_path(h), data)
            if not same:
                raise Corrupt(f"object {h} differs from incoming content with the same hash "
                              "(damaged store or crafted collision): run `lamina fsck`")
            return h
        if len(data) <= INLINE_MAX:
            self.inline[h] = (self._spool_end, len(data))
            self._spool_end += _write_all(self._spool, data, self._spool_end)
            return h
        fd = os.open(self._staged(h), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
        try:
            _write_all(fd, data, 0)
        finally:
            os.close(fd)
        self.new[h] = len(data)
        return h

    def add_chunks(self, chunks: Iterable[bytes]) -> str:
        """A large content, streamed: written to a temporary name while hashing, then named by its hash."""
        self._tmp_seq += 1
        tmp = f"{self.staging}/part-{self._tmp_seq}"
        hasher = xxhash.xxh3_128()
        n = 0
        with open(tmp, "wb") as f:
            os.fchmod(f.fileno(), 0o444)  # objects are immutable; the mode says so to anyone looking
            for chunk in chunks:
                hasher.update(chunk)
                _write_sparse(f, chunk)
                n += len(chunk)
            f.truncate(n)  # a content that ends in a hole
        h = hasher.hexdigest()
        if h in self.new or self._existing(h) is not None:
            other = self._staged(h) if h in self.new else self.store.object_path(h)
            ok = same_files(tmp, other)
            os.unlink(tmp)
            if not ok:
                raise BadInput(f"two different contents share XXH3-128 {h}: refusing a hash collision")
            return h
        os.rename(tmp, self._staged(h))
        self.new[h] = n
        return h

    def add_file(self, path: str) -> str:
        if os.path.getsize(path) <= SMALL:
            with open(path, "rb") as f:
                return self.add_bytes(f.read())

        def chunks() -> Iterable[bytes]:
            with open(path, "rb") as f:
                while c := f.read(CHUNK):
                    yield c
        return self.add_chunks(chunks())

    def publish(self) -> list[tuple[str, int]]:
        """Make staged files durable and visible under objects/; returns their rows (see `inline_rows` for the
        others).

        The list of moved names is written first, so recovery can remove them if the index commit never comes.
        """
        if not self.new:
            return []
        # Recovery reads this list to remove what was moved but never committed (store/root.py). It needs no
        # fsync: after a power loss rather than a kill, such orphans are found by gc's scan of objects/.
        with open(f"{self.staging}/linked.json", "w") as f:
            json.dump(list(self.new), f)
        made_dirs: set[str] = set()
        for h in self.new:
            dst = self.store.object_path(h)
            d = dst[: dst.rfind("/")]
            if d not in made_dirs:
                os.makedirs(d, exist_ok=True)
                made_dirs.add(d)
            try:
                rename_noreplace(self._staged(h), dst)
            except FileExistsError:
                # Moved in meanwhile by a concurrent import, or left by a crash: keep it only if identical.
                if not same_files(self._staged(h), dst):
                    raise BadInput(f"two different contents share XXH3-128 {h}: refusing a hash collision")
        syncfs(str(self.store.objects_dir))
        return list(self.new.items())

    def inline_rows(self) -> Iterator[tuple[str, int, bytes]]:
        """(hash, size, content) of the inlined contents, read back from the spool one at a time."""
        for h in self.inline:
            yield h, self.inline[h][1], self._spooled(h)

    def close(self) -> None:
        os.close(self._spool)

    def absorb(self, other: "ObjectStager") -> None:
        """Takes over the objects another stager of the same import staged (a layer read on another thread), so
        that one `publish` and one recovery list cover them all. `other` is closed and emptied."""
        for h, size in other.new.items():
            if h in self.new or self._existing(h) is not None:
                mine = self._staged(h) if h in self.new else self.store.object_path(h)
                if not same_files(other._staged(h), mine):
                    raise BadInput(f"two different contents share XXH3-128 {h}: refusing a hash collision")
                continue
            os.rename(other._staged(h), self._staged(h))
            self.new[h] = size
        for _, _, data in other.inline_rows():
            self.add_bytes(data)
        other.new.clear()
        other.inline.clear()
        other.close()
