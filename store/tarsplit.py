"""Byte-exact layer tars: the skeleton of a tar (every byte that is not file content) and its reassembly.

A layer is stored as its entries and content objects, but its DiffID is the sha256 of the exact tar bytes, which
depend on header details (PAX records, GNU long names, padding, end-of-archive blocks) no canonical writer can
reproduce. Like containers/storage's tar-split, lamina keeps those bytes aside: at import the tar stream is split
into raw segments and file payloads; export interleaves them again, so `save` reproduces the DiffID.

Skeleton format (zstd-compressed, stored as an ordinary object):
    b"LTS1" then records:  b"R" u32-le length, bytes      raw tar bytes
                           b"P" 16-byte XXH3-128, u64-le size   a payload: that object's content
                           b"E"                           end
"""
from __future__ import annotations

import hashlib
import io
import re
import struct
import tarfile
from typing import BinaryIO, Callable, Iterator

import zstandard

from .errors import BadInput, Corrupt

MAGIC = b"LTS1"
# Go's archive/tar (docker's, podman's) takes at most 1 MiB per PAX header, GNU long name or sparse map; a member's
# headers together get a few of those.
HEADERS_MAX = 4 << 20
_NUMBER_MAX = 2**63 - 1
_SHOW = 120


def show(name: str) -> str:
    """A member name for a one-line message: repr, cut to a readable length."""
    r = repr(name)
    return r if len(r) <= _SHOW else f"{r[:_SHOW]}... ({len(name)} characters)"

_RAW_FLUSH = 1 << 16


class SkeletonWriter:
    """Streams skeleton records into a zstd-compressed file."""

    def __init__(self, out: BinaryIO) -> None:
        self._z = zstandard.ZstdCompressor(level=3).stream_writer(out, closefd=False)
        self._z.write(MAGIC)
        self._raw = bytearray()

    def raw(self, data: bytes) -> None:
        self._raw += data
        if len(self._raw) >= _RAW_FLUSH:
            self._flush_raw()

    def _flush_raw(self) -> None:
        if self._raw:
            self._z.write(b"R" + struct.pack("<I", len(self._raw)))
            self._z.write(self._raw)
            self._raw = bytearray()

    def payload(self, obj: str, size: int) -> None:
        self._flush_raw()
        self._z.write(b"P" + bytes.fromhex(obj) + struct.pack("<Q", size))

    def close(self) -> None:
        self._flush_raw()
        self._z.write(b"E")
        self._z.flush(zstandard.FLUSH_FRAME)
        self._z.close()


def _exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise Corrupt("tar skeleton is truncated")
    return data


def _records(skeleton: BinaryIO) -> Iterator[tuple[bytes, bytes, int]]:
    """The skeleton's records in order: (b"R", raw bytes, 0) or (b"P", 16-byte hash, size)."""
    f = zstandard.ZstdDecompressor().stream_reader(skeleton, read_across_frames=True)
    if _exact(f, 4) != MAGIC:
        raise Corrupt("not a lamina tar skeleton")
    while True:
        tag = _exact(f, 1)
        if tag == b"R":
            (n,) = struct.unpack("<I", _exact(f, 4))
            yield tag, _exact(f, n), 0
        elif tag == b"P":
            rec = _exact(f, 24)
            yield tag, rec[:16], struct.unpack("<Q", rec[16:])[0]
        elif tag == b"E":
            return
        else:
            raise Corrupt("tar skeleton has an unknown record")


def payloads(skeleton: BinaryIO) -> Iterator[str]:
    """The objects (hex hashes) whose contents the skeleton interleaves, in order, repeats included."""
    for tag, data, _ in _records(skeleton):
        if tag == b"P":
            yield data.hex()


def reassemble(skeleton: BinaryIO, open_object: Callable[[str], BinaryIO],
               chunk: int = 1 << 20) -> Iterator[bytes]:
    """Yields the layer tar's bytes, reading payloads through `open_object(hash)`."""
    for tag, data, size in _records(skeleton):
        if tag == b"R":
            yield data
            continue
        obj = data.hex()
        with open_object(obj) as o:
            left = size
            while left:
                got = o.read(min(chunk, left))
                if not got:
                    raise Corrupt(f"object {obj} is shorter than its {size} bytes")
                left -= len(got)
                yield got


class TarStream(io.RawIOBase):
    """A forward-only view of an uncompressed tar for `tarfile` (mode "r:"): every byte read is hashed into the
    DiffID and recorded in the skeleton, except payloads, which the importer pulls with `payload()`."""

    def __init__(self, src: BinaryIO, skeleton: SkeletonWriter) -> None:
        self.src = src
        self.skel = skeleton
        self.sha = hashlib.sha256()
        self.pos = 0
        # What `tarfile` may still read before the importer takes over again (see `limit`); None: no limit.
        self.budget: int | None = None
        self.budget_what = ""
        self.last_block = b""  # the last 512-byte read: the header block tarfile saw last

    def limit(self, budget: int | None, what: str = "") -> None:
        """Bounds what tarfile reads from now on (a member's headers, the bytes after the end of the archive):
        tarfile reads a PAX header, a GNU long name or a sparse map whole into memory, at the size the input
        claims, so a small compressed input could otherwise claim gigabytes."""
        self.budget, self.budget_what = budget, what

    def readable(self) -> bool:
        return True

    def _pull(self, n: int) -> bytes:
        parts = []
        while n > 0:
            data = self.src.read(n)
            if not data:
                break
            parts.append(data)
            n -= len(data)
        return b"".join(parts)

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            parts = []
            while data := self._pull(1 << 20):
                parts.append(data)
            data = b"".join(parts)
        else:
            if self.budget is not None and n > self.budget:
                raise BadInput(f"{self.budget_what} at byte {self.pos}")
            data = self._pull(n)
            if n == 512:
                self.last_block = data
        if self.budget is not None:
            self.budget -= len(data)
        self.sha.update(data)
        self.skel.raw(data)
        self.pos += len(data)
        return data

    def tell(self) -> int:
        return self.pos

    def seekable(self) -> bool:
        return True  # forward only; tarfile only ever skips ahead over padding

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 1:
            offset += self.pos
        elif whence != 0:
            raise io.UnsupportedOperation("tar stream: seek from end")
        if offset < self.pos:
            raise io.UnsupportedOperation("tar stream: backward seek")
        while offset > self.pos:
            if not self.read(min(offset - self.pos, 1 << 20)):
                break
        return self.pos

    def payload(self, size: int, chunk: int = 1 << 20) -> Iterator[bytes]:
        left = size
        while left:
            data = self._pull(min(chunk, left))
            if not data:
                raise BadInput("tar is truncated inside a file's content")
            self.sha.update(data)
            self.pos += len(data)
            left -= len(data)
            yield data

    def drain(self, most: int) -> None:
        """Reads (and records) whatever follows the end-of-archive blocks: up to `most` bytes (real tars pad to
        their record size, 10 KiB by default), so that a stream of zeros is refused rather than read forever."""
        left = most
        while data := self.read(min(1 << 20, left + 1)):
            left -= len(data)
            if left < 0:
                raise BadInput(f"more than {most} bytes follow the tar's end-of-archive blocks")


class StrictTarInfo(tarfile.TarInfo):
    """tarfile's member, with GNU sparse maps and sizes read strictly: tarfile lets a malformed number escape as a
    bare ValueError, and reads a version 1.0 map in quadratic time for as long as the input claims entries."""

    def _apply_pax_info(self, pax_headers, encoding, errors):  # type: ignore[override]
        for key in ("GNU.sparse.size", "GNU.sparse.realsize"):  # tarfile's int() of these raised ValueError
            if key in pax_headers:
                _sparse_numbers([pax_headers[key]], self)
        super()._apply_pax_info(pax_headers, encoding, errors)

    def _proc_gnusparse_01(self, next, pax_headers):  # type: ignore[override]
        next.sparse = _sparse_pairs(pax_headers["GNU.sparse.map"].split(","), next)

    def _proc_gnusparse_10(self, next, pax_headers, tarfile_):  # type: ignore[override]
        f = tarfile_.fileobj
        buf = b""

        def line() -> bytes:
            nonlocal buf
            while b"\n" not in buf:
                if len(buf) > 20:  # a number of more than 20 digits is none (tarfile read on until memory ran out)
                    raise BadInput(f"{show(next.name)}: malformed GNU sparse map")
                block = f.read(tarfile.BLOCKSIZE)
                if not block:
                    raise BadInput(f"{show(next.name)}: truncated GNU sparse map")
                buf += block
            out, buf = buf.split(b"\n", 1)
            return out

        (count,) = _sparse_numbers([line()], next)
        if count * 4 > next.size:  # each entry takes 4 bytes at least ("0\n0\n")
            raise BadInput(f"{show(next.name)}: malformed GNU sparse map ({count} entries in {next.size} bytes)")
        numbers = _sparse_numbers([line() for _ in range(2 * count)], next)
        next.offset_data = f.tell()
        next.sparse = list(zip(numbers[::2], numbers[1::2]))


def _sparse_numbers(texts: list, ti: tarfile.TarInfo) -> list[int]:
    out = []
    for t in texts:
        t = t.decode("ascii", "replace") if isinstance(t, bytes) else t
        if not re.fullmatch(r"[0-9]{1,20}", t) or int(t) > _NUMBER_MAX:
            raise BadInput(f"{show(ti.name)}: malformed GNU sparse map (entry {show(t)})")
        out.append(int(t))
    return out


def _sparse_pairs(texts: list, ti: tarfile.TarInfo) -> list[tuple[int, int]]:
    numbers = _sparse_numbers(texts, ti)
    if len(numbers) % 2:
        raise BadInput(f"{show(ti.name)}: malformed GNU sparse map (odd number of entries)")
    return list(zip(numbers[::2], numbers[1::2]))
