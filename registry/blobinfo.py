"""What lamina knows about registry blobs, as containers/image's blob-info cache: which compressed blob (digest,
size, compression) a stored layer (DiffID) was pulled as or pushed as, and in which repositories of which
registries it was seen. Push uses it to skip a blob the registry has (HEAD) or mount it from another repository,
without compressing the layer first. A cache: losing it costs uploads, never correctness.

Kept in `<store root>/registry/blobinfo.db` (SQLite, so concurrent pulls and pushes can record at once).
"""
from __future__ import annotations

import os
import sqlite3
import threading
from dataclasses import dataclass

_SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs (
    digest TEXT PRIMARY KEY,    -- sha256 of the blob as the registry stores it
    diff_id TEXT NOT NULL,      -- sha256 of the uncompressed layer tar
    compression TEXT NOT NULL,  -- gzip, zstd or none
    size INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS blobs_diff_id ON blobs(diff_id);
CREATE TABLE IF NOT EXISTS locations (
    digest TEXT NOT NULL,
    registry TEXT NOT NULL,
    repository TEXT NOT NULL,
    PRIMARY KEY (digest, registry, repository)
);
"""


@dataclass
class Blob:
    digest: str
    compression: str
    size: int
    repositories: list[str]  # where it was seen on the registry asked about


class BlobInfo:
    def __init__(self, store_root: str) -> None:
        d = os.path.join(store_root, "registry")
        os.makedirs(d, exist_ok=True)
        self.db = sqlite3.connect(os.path.join(d, "blobinfo.db"), timeout=60, isolation_level=None,
                                  check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(_SCHEMA)
        self.lock = threading.Lock()  # one connection, used by every download or upload thread

    def record(self, digest: str, diff_id: str, compression: str, size: int, registry: str, repository: str) -> None:
        with self.lock, self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("INSERT OR REPLACE INTO blobs VALUES (?, ?, ?, ?)", (digest, diff_id, compression, size))
            self.db.execute("INSERT OR IGNORE INTO locations VALUES (?, ?, ?)", (digest, registry, repository))

    def candidates(self, diff_id: str, compression: str, registry: str) -> list[Blob]:
        """Known blobs of a layer in that compression, those seen on `registry` first."""
        with self.lock:
            return self._candidates(diff_id, compression, registry)

    def _candidates(self, diff_id: str, compression: str, registry: str) -> list[Blob]:
        out = []
        for digest, comp, size in self.db.execute(
                "SELECT digest, compression, size FROM blobs WHERE diff_id=? AND compression=?", (diff_id, compression)):
            repos = [r for (r,) in self.db.execute(
                "SELECT repository FROM locations WHERE digest=? AND registry=?", (digest, registry))]
            out.append(Blob(digest, comp, size, repos))
        return sorted(out, key=lambda b: not b.repositories)

    def close(self) -> None:
        self.db.close()
