"""Readers the importer stacks on its input: sha256 over the raw bytes (blob digests), and gzip/zstd
decompression sniffed from magic numbers, with corrupt or truncated data reported as bad input."""
from __future__ import annotations

import gzip
import hashlib
import io
import zlib
from typing import BinaryIO

import zstandard

from .errors import BadInput

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class HashingReader(io.RawIOBase):
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
