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
import struct
from typing import BinaryIO, Callable, Iterator

import zstandard

from .errors import BadInput, Corrupt

MAGIC = b"LTS1"
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
            data = self._pull(n)
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

    def drain(self) -> None:
        """Reads (and records) whatever follows the end-of-archive blocks."""
        while self.read(1 << 20):
            pass
