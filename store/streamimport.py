"""An import fed by several threads at once, one layer stream each, as a registry pull delivers its blobs.

Each layer is read on its caller's thread into a stager of its own (its own staging subdirectory and SQLite
connection), checked against its blob digest, size and DiffID while it streams, and handed to the import's main
stager at commit; the commit is `Importer.commit`, all or nothing. A layer that fails is dropped with everything it
staged, so its caller may try it again from the start.
"""
from __future__ import annotations

import io
import itertools
import os
import shutil
import threading
from contextlib import contextmanager
from typing import BinaryIO, Callable, Iterator

from .errors import BadInput
from .importer import ImageSpec, Importer
from .ingest import LayerData, ingest_tar
from .objects import ObjectStager
from .streams import HashingReader, decompressed


class StreamImport(Importer):
    """`Importer` whose `add_blob` may be called from many threads (see the module docstring)."""

    def __init__(self, store, progress: Callable[[int], None] | None = None) -> None:
        super().__init__(store, progress)
        self._lock = threading.Lock()
        self._seq = itertools.count()
        self._done: list[ObjectStager] = []

    @contextmanager
    def session(self) -> Iterator["StreamImport"]:
        with super().session():
            try:
                yield self
            finally:
                for s in self._done:
                    s.close()

    def add_blob(self, f: BinaryIO, digest: str, size: int, diff_id: str,
                 progress: Callable[[int], None] | None = None) -> LayerData:
        """Reads one layer blob (compressed or not) to its end and stages it; refuses it unless its bytes hash to
        `digest`, number `size` and decompress to a tar whose sha256 is `diff_id`."""
        sub = f"{self.staging}/layer-{next(self._seq)}"
        os.mkdir(sub)
        stager = ObjectStager(self.store, sub)  # this thread's connection (Store.db is per thread)
        try:
            h = HashingReader(f)
            try:
                data = ingest_tar(decompressed(io.BufferedReader(h, 1 << 20)), stager, progress)  # type: ignore
            except BadInput:
                # Bad data in a blob that is not the one named (a flipped byte): say so, not what it broke.
                if h.finish() != digest:
                    raise BadInput(f"layer blob {digest} does not match its digest") from None
                raise
            got = h.finish()
            if got != digest:
                raise BadInput(f"layer blob {digest} does not match its digest (got {got})")
            if h.n != size:
                raise BadInput(f"layer blob {digest} has {h.n} bytes, manifest says {size}")
            if data.diff_id != diff_id:
                raise BadInput(f"layer {digest}: DiffID {data.diff_id} does not match config {diff_id}")
        except BaseException:
            stager.close()
            shutil.rmtree(sub, ignore_errors=True)
            raise
        with self._lock:
            self._done.append(stager)
            self.layers.setdefault(data.diff_id, data)
        return data

    def add_image(self, config: bytes, diff_ids: list[str], tags: list[str]) -> None:
        self.images.append(ImageSpec(config, diff_ids, tags))

    def commit(self) -> list[str]:
        for s in self._done:
            self.stager.absorb(s)
        self._done.clear()
        return super().commit()
