"""Opening a store root: where it lives, its SQLite connections, its lock, and crash recovery.

Concurrency model: SQLite in WAL mode lets readers run beside one writer. Importers do their heavy work
(decompressing, hashing, staging objects) outside any write transaction and commit a layer in one short
transaction, so two imports run at once and readers are never blocked. A file lock (`lock`) is held shared
by importers for their whole run and exclusively by gc, fsck and recovery, which must not see an import's
staged or linked-but-uncommitted objects as garbage.
"""
from __future__ import annotations

import fcntl
import io
import json
import os
import re
import shutil
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

from .errors import Corrupt, StoreError
from .schema import MIGRATIONS, SCHEMA, SCHEMA_VERSION


def default_root() -> str:
    """$LAMINA_ROOT, else /var/lib/lamina for root, else $XDG_DATA_HOME/lamina."""
    env = os.environ.get("LAMINA_ROOT")
    if env:
        return env
    if os.geteuid() == 0:
        return "/var/lib/lamina"
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(xdg, "lamina")


def connect(path: str, readonly: bool = False) -> sqlite3.Connection:
    uri = f"file:{path}?mode=ro" if readonly else f"file:{path}"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=120)
    conn.execute("PRAGMA busy_timeout=120000")
    if not readonly:
        conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def inline_data(conn: sqlite3.Connection, h: str) -> bytes | None:
    """An object's content when it is inlined in the index, else None (a file under objects/, or gone)."""
    row = conn.execute("SELECT data FROM objects WHERE hash=?", (h,)).fetchone()
    return None if row is None or row[0] is None else bytes(row[0])


def _full(path: str) -> bool:
    """Whether the filesystem holding path has (almost) no free block left: SQLite reports a write that ran out
    of space in its WAL or shared-memory file as a mere I/O error."""
    try:
        st = os.statvfs(os.path.dirname(path))
    except OSError:
        return False
    return st.f_bfree * st.f_frsize < (64 << 10)


def index_error(db_path: str, e: sqlite3.Error) -> StoreError:
    """The one-line error for an SQLite failure on the index, named by its cause."""
    name = getattr(e, "sqlite_errorname", "")
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
        return Corrupt(f"index {db_path} is damaged ({e}): restore it from a backup")
    if name in ("SQLITE_FULL", "SQLITE_IOERR_SHMSIZE") or (name.startswith("SQLITE_IOERR") and _full(db_path)):
        return StoreError(f"no space left on {os.path.dirname(db_path)} (index.db: {e})")
    if name.startswith("SQLITE_READONLY"):
        return StoreError(f"index {db_path} cannot be written ({e})")
    if name.startswith("SQLITE_CANTOPEN"):
        return StoreError(f"index {db_path} cannot be opened ({e})")
    return StoreError(f"index {db_path}: {e}")


class Store:
    """A store root on disk. Cheap to open; one instance per process is enough (connections are per thread)."""

    def __init__(self, root: str | None = None, *, recover: bool = True) -> None:
        self.root = Path(root or default_root()).absolute()
        self.objects_dir = self.root / "objects"
        self.tmp_dir = self.root / "tmp"
        self.db_path = str(self.root / "index.db")
        try:
            for d in (self.root, self.objects_dir, self.tmp_dir):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create store at {self.root}: {e.strerror}") from None
        try:
            # Private, an existing store too (CVE-2021-41091): below lie containers' root filesystems and layers,
            # with images' setuid-root files and device nodes that no host user may reach.
            if self.root.stat().st_mode & 0o077:
                os.chmod(self.root, 0o700)
        except OSError:
            pass  # not ours to change (another user's store opened to read): its owner's open does it
        self._local = threading.local()
        os.close(os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        self._init_schema()
        if recover:
            self.recover()

    # -- connections ------------------------------------------------------------------------------------------
    @property
    def db(self) -> sqlite3.Connection:
        """This thread's connection (sqlite3 connections must not be shared between threads)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.db_path)
            self._local.conn = conn
        return conn

    def close(self) -> None:
        """Closes this thread's connection. A process that forks and then closes inherited fds (a daemonizing
        supervisor) must close its stores first: SQLite shares one open file per database among a process's
        connections, and a connection opened later would reuse a descriptor that is gone ("disk I/O error")."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _version(self) -> int | None:
        """The index's schema version; None for an index with no tables yet (a new store)."""
        try:
            row = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        except sqlite3.DatabaseError as e:
            if str(e) != "no such table: meta":
                raise index_error(self.db_path, e) from None
            if self.db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone() is not None:
                raise StoreError(f"index {self.db_path} is not a lamina index (it has no schema version)") from None
            return None
        return None if row is None else int(row[0])

    def _has_objects(self) -> bool:
        with os.scandir(self.objects_dir) as subdirs:
            for d in subdirs:
                if d.is_dir(follow_symlinks=False) and any(os.scandir(d.path)):
                    return True
        return False

    def _init_schema(self) -> None:
        try:
            fresh = os.stat(self.db_path).st_size == 0
        except FileNotFoundError:
            fresh = True
        # A new store has no index and no objects. An index lost while objects remain (deleted, truncated to
        # zero bytes) must not be taken for a new one: gc would delete every object no index row names.
        if fresh and self._has_objects():
            state = "empty" if os.path.exists(self.db_path) else "missing"
            raise StoreError(f"store {self.root}: index.db is {state} but objects/ holds contents: refusing to "
                             "treat it as a new store (restore index.db from a backup)")
        version = self._version()
        if version == SCHEMA_VERSION:
            return  # the common case costs one read and never waits for a writer
        if version is not None and version > SCHEMA_VERSION:
            raise StoreError(f"store {self.root} has schema {version}, newer than this lamina ({SCHEMA_VERSION})")
        if self.db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            # Imported only for a new store: sqlite_utils imports numpy when it is installed (~0.2 s per command).
            import sqlite_utils  # noqa: PLC0415
            sqlite_utils.Database(self.db).enable_wal()
        with self.write():
            if version is not None and self._version() == SCHEMA_VERSION:
                return  # migrated by another process while this one waited for the write lock
            for v in range((version or SCHEMA_VERSION) + 1, SCHEMA_VERSION + 1):
                for stmt in MIGRATIONS.get(v, []):
                    self.db.execute(stmt)
            # Statement by statement (executescript would COMMIT); all are idempotent (IF NOT EXISTS).
            code = re.sub(r"--[^\n]*", "", SCHEMA)
            for stmt in code.split(";"):
                if stmt.strip():
                    self.db.execute(stmt)
            if version is not None and version < 3:
                self._fill_skeleton_objects()
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    def _fill_skeleton_objects(self) -> None:
        """Schema 3: record, for every stored layer, the objects its skeleton uses that no entry names (older
        lamina's gc deleted them). A skeleton that cannot be read is left for fsck to report."""
        from .tarsplit import payloads  # noqa: PLC0415 - zstandard, for this one-time step only
        db = self.db
        for lid, tarsplit in db.execute("SELECT id, tarsplit FROM layers").fetchall():
            named = {o for (o,) in db.execute("SELECT object FROM entries WHERE layer_id=? AND object IS NOT NULL",
                                              (lid,))}
            try:
                with self.open_object(tarsplit) as skel:
                    extra = set(payloads(skel)) - named
            except (StoreError, OSError):
                continue
            db.executemany("INSERT OR IGNORE INTO skeleton_objects VALUES (?, ?)", [(lid, h) for h in extra])

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE, so the write lock is taken up front, not on first write)."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            # SQLite rolls back by itself after some errors (a full disk): a ROLLBACK then would fail and hide
            # the error that matters.
            if db.in_transaction:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            raise

    # -- locking ----------------------------------------------------------------------------------------------
    @contextmanager
    def shared(self) -> Iterator[None]:
        # A fresh open file description per holder: flock locks belong to descriptions, not processes.
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    @contextmanager
    def exclusive(self, wait: bool = True) -> Iterator[bool]:
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CLOEXEC)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    # -- objects ----------------------------------------------------------------------------------------------
    def object_path(self, h: str) -> str:
        """Where a file-backed object lives (inlined ones have no file)."""
        return f"{self.objects_dir}/{h[:2]}/{h[2:]}"

    def inline_data(self, h: str) -> bytes | None:
        return inline_data(self.db, h)

    def open_object(self, h: str) -> BinaryIO:
        """A content object for reading, file-backed or inlined alike. FileNotFoundError when it is gone."""
        try:
            return open(self.object_path(h), "rb")
        except FileNotFoundError:
            data = self.inline_data(h)
            if data is None:
                raise
            return io.BytesIO(data)

    # -- recovery ---------------------------------------------------------------------------------------------
    def recover(self) -> None:
        """Roll back imports that died: delete objects they linked but never committed, and their staging.

        Runs only when no importer holds the lock (then every `imports` row is dead); otherwise it is left
        to a later open.
        """
        if self.db.execute("SELECT 1 FROM imports LIMIT 1").fetchone() is None and not any(self.tmp_dir.iterdir()):
            return
        with self.exclusive(wait=False) as got:
            if got:
                self.recover_locked()

    def recover_locked(self) -> None:
        rows = self.db.execute("SELECT id, staging FROM imports").fetchall()
        for import_id, staging in rows:
            linked = self.root / staging / "linked.json"
            if linked.exists():
                try:
                    hashes = json.loads(linked.read_text())
                except ValueError:
                    hashes = []
                known = self.db.execute
                for h in hashes:
                    if known("SELECT 1 FROM objects WHERE hash=?", (h,)).fetchone() is None:
                        try:
                            os.unlink(self.object_path(h))
                        except FileNotFoundError:
                            pass
            with self.write() as db:
                db.execute("DELETE FROM imports WHERE id=?", (import_id,))
        for leftover in self.tmp_dir.iterdir():
            shutil.rmtree(leftover, ignore_errors=True)
