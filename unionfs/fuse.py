"""The FUSE front end: translates libfuse (high-level API, via mfusepy) calls into `overlay.Overlay` calls.

The only module that imports mfusepy. It adds nothing of its own except FUSE-level settings (timeouts, caching,
inode numbers, thread model) and the caller's identity for new files; errors are the core's OSErrors, which mfusepy
turns into negative errno replies. libfuse 3 is used (mfusepy would pick libfuse 2 when both are installed) because
only FUSE 3 passes rename flags (RENAME_NOREPLACE, RENAME_EXCHANGE) and has the `fuse_config` init hook.
"""
from __future__ import annotations

import ctypes
import errno
import itertools
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

# libfuse 3.18 as scripts/build-libfuse.sh builds it beside the interpreter (FUSE passthrough, io_uring), else the
# system's libfuse 3 by its soname. Naming the library spares mfusepy's find_library(), which runs ldconfig in a
# subprocess (several milliseconds of every mount, and of every `lamina run`).
_BUILT_LIBFUSE = os.path.join(sys.prefix, "lib", "lamina", "libfuse3.so.4")
os.environ.setdefault("FUSE_LIBRARY_PATH", _BUILT_LIBFUSE if os.path.exists(_BUILT_LIBFUSE) else "libfuse3.so.3")

import mfusepy as fuse  # noqa: E402

from .overlay import Overlay  # noqa: E402
from .passthrough import Backings  # noqa: E402

_lib = fuse._libfuse
_lib.fuse_invalidate_path.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_lib.fuse_invalidate_path.restype = ctypes.c_int
_lib.fuse_get_session.argtypes = [ctypes.c_void_p]
_lib.fuse_get_session.restype = ctypes.c_void_p
_lib.fuse_session_fd.argtypes = [ctypes.c_void_p]
_lib.fuse_session_fd.restype = ctypes.c_int

# Passthrough needs libfuse >= 3.16 (fuse_file_info.backing_id, FUSE_CAP_PASSTHROUGH) and the kernel's consent at INIT.
HAS_PASSTHROUGH_API = (fuse.fuse_version_major, fuse.fuse_version_minor) >= (3, 16)
HAS_IO_URING_OPTION = (fuse.fuse_version_major, fuse.fuse_version_minor) >= (3, 18)
FUSE_CAP_PASSTHROUGH = 1 << 29
# struct fuse_file_info (3.16+): ... uint32_t poll_events; int32_t backing_id; — mfusepy's struct stops short of it
_BACKING_ID_OFFSET = fuse.fuse_file_info.fh.offset + 20
_STAT_SIZE = ctypes.sizeof(fuse.c_stat)
MAX_THREADS = 2  # libfuse workers (serve() says why)
PASSTHROUGH_MIN = 64 << 10  # lower files smaller than this are served through the page cache (see _opened)

log = logging.getLogger("lamina.fs")

# Every change passes through the daemon, so the kernel may trust its caches for as long as it likes.
FOREVER = 86400.0 * 365
IO_SIZE = 1 << 20
FUSE_READDIR_PLUS = 1  # enum fuse_readdir_flags
FUSE_FILL_DIR_PLUS = 2  # enum fuse_fill_dir_flags


_pinned_threads: set[int] = set()
_NS = 10**9


def _fill_stat(st: Any, a: dict[str, Any]) -> None:
    """Overlay attributes into a zeroed struct stat, field by field: mfusepy's generic set_st_attrs (a getattr()
    per key) was a quarter of the daemon's time on lookups and listings."""
    st.st_mode = a["st_mode"]
    st.st_ino = a["st_ino"]
    if len(a) == 2:  # ".." in a listing: its kind and number only
        return
    st.st_nlink = a["st_nlink"]
    st.st_uid = a["st_uid"]
    st.st_gid = a["st_gid"]
    st.st_size = a["st_size"]
    st.st_rdev = a["st_rdev"]
    st.st_blocks = a["st_blocks"]
    st.st_blksize = a["st_blksize"]
    st.st_atimespec.tv_sec, st.st_atimespec.tv_nsec = divmod(a["st_atime"], _NS)
    st.st_mtimespec.tv_sec, st.st_mtimespec.tv_nsec = divmod(a["st_mtime"], _NS)
    st.st_ctimespec.tv_sec, st.st_ctimespec.tv_nsec = divmod(a["st_ctime"], _NS)


class _FUSE(fuse.FUSE):
    """mfusepy's FUSE with rename flags passed through and libfuse's worker threads kept known to Python."""

    def _wrapper(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        # ctypes gives a foreign thread a fresh Python thread state for every callback and drops it afterwards,
        # which costs more than the operation itself and empties threading.local (the store's per-thread SQLite
        # connections). One extra PyGILState_Ensure per libfuse worker keeps its thread state for good.
        tid = threading.get_ident()  # pthread_self(): get_native_id() is a gettid system call per request
        if tid not in _pinned_threads:
            _pinned_threads.add(tid)
            ctypes.pythonapi.PyGILState_Ensure()
        return super()._wrapper(func, *args, **kwargs)

    def getattr_fuse_3(self, path: bytes | None, buf: Any, fip: Any) -> int:
        ctypes.memset(buf, 0, _STAT_SIZE)
        fh = fip.contents.fh if fip else None
        _fill_stat(buf.contents, self.operations.ov.getattr(
            None if path is None else path.decode(self.encoding, self.errors), fh))
        return 0

    def open(self, path: bytes, fip: Any) -> int:
        fi = fip.contents
        p = path.decode(self.encoding, self.errors)
        ops: LaminaOperations = self.operations
        if fi.flags & (os.O_ACCMODE | os.O_TRUNC):
            ops.check_writable(p)  # before the open copies up or truncates
        fi.fh = ops.open(p, fi.flags)
        self._opened(fi)
        return 0

    def create(self, path: bytes, mode: int, fip: Any) -> int:
        fi = fip.contents
        p = path.decode(self.encoding, self.errors)
        ops: LaminaOperations = self.operations
        ops.check_writable(p)  # an existing file: created = opened for writing
        fi.fh = ops.create(p, mode, fi.flags)
        self._opened(fi)
        return 0

    def _opened(self, fi: Any) -> None:
        fi.noflush = 1  # writes reach the upper file at once: close() has nothing left to flush
        ops: LaminaOperations = self.operations
        if ops.backings is None:
            fi.keep_cache = 1  # every change passes through the daemon, which invalidates what it changes
            return
        h = ops.ov.handles[fi.fh]
        try:
            # Lower files below PASSTHROUGH_MIN stay on the page cache: read once, they cost the daemon a READ
            # instead of two ioctls, and their readers never keep a writer out (check_writable).
            # So do the names of a multiply-linked file: each is its own kernel inode, whose caches the daemon
            # refreshes on each write (Overlay.changed), which writes bypassing it could not do. Unless the file is
            # open by passthrough already (linked since): the kernel refuses a second mode on one inode.
            passthrough = not h.linked and (h.upper or (h.rec is not None and h.rec.size >= PASSTHROUGH_MIN))
            mode = ops.backings.open(fi.fh, h.ino, h.upper, passthrough)
        except BaseException:
            ops.ov.release(fi.fh)
            raise
        if mode > 0:
            # (the kernel refuses passthrough beside any open flag but DIRECT_IO and NOFLUSH: no keep_cache here)
            ctypes.c_int32.from_address(ctypes.addressof(fi) + _BACKING_ID_OFFSET).value = mode
        else:
            fi.keep_cache = 1

    def opendir(self, path: bytes, fip: Any) -> int:
        fip.contents.fh = self.operations.opendir(path.decode(self.encoding, self.errors))
        # the kernel may keep listings (where libfuse passes these flags on): every change to a directory passes
        # through it and resets its cache
        fip.contents.cache_readdir = 1
        fip.contents.keep_cache = 1
        return 0

    def readdir_fuse_3(self, path: bytes | None, buf: Any, filler: Any, offset: int, fip: Any, flags: int) -> int:
        """Entries with offsets: libfuse passes readdirplus attributes on only when the filesystem gives offsets, so
        the merged listing is kept with the open directory handle and each call continues where the last stopped.

        READDIRPLUS gets every entry's full attributes (the kernel then needs no LOOKUP per entry). A plain READDIR
        (the kernel asks for plus only at a listing's start or when lookups follow it) needs just the d_ino and
        type the layers' listings already hold, and costs no lookup per entry (Overlay.readdir_entries).
        """
        ops: LaminaOperations = self.operations
        h = ops._dirs.get(fip.contents.fh)
        if h is None:
            return -errno.EBADF
        if path is not None:
            h[0] = path.decode(self.encoding, self.errors)  # the directory may have moved since opendir
        if offset == 0 or h[1] is None:
            try:
                h[1] = ops.ov.readdir_entries(h[0])
            except OSError as e:
                return -(e.errno or errno.EIO)
        entries: list[tuple[str, int, int]] = h[1]
        plus = bool(flags & FUSE_READDIR_PLUS)
        st = fuse.c_stat()
        size = ctypes.sizeof(st)
        child_attrs = ops.ov.child_attrs
        enc, errs = self.encoding, self.errors
        for i in range(offset, len(entries)):
            name, fmt, ino = entries[i]
            if plus or not ino:
                try:
                    attrs = child_attrs(h[0], name)
                except OSError:
                    # listed, but its lookup fails (a refused redirect): a plain entry, as overlayfs lists it
                    attrs = {"st_mode": fmt, "st_ino": ino or 1}  # (d_ino 0 would hide the name)
                    plus_ok = False
                else:
                    plus_ok = True
                if attrs is None:
                    continue
                ctypes.memset(ctypes.byref(st), 0, size)
                _fill_stat(st, attrs)
            else:  # libfuse takes only st_ino and the type from a plain entry
                plus_ok = False
                st.st_ino = ino
                st.st_mode = fmt
            fill = FUSE_FILL_DIR_PLUS if plus and plus_ok and i >= 2 else 0
            if filler(buf, name.encode(enc, errs), st, i + 1, fill) != 0:
                break
        return 0

    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        return self.operations.rename(
            old.decode(self.encoding, self.errors), new.decode(self.encoding, self.errors), flags)


class LaminaOperations(fuse.Operations):
    use_ns = True
    # No ioctl callback: libfuse answers ENOSYS itself, which the kernel turns into ENOTTY, what mfusepy's default
    # answered from Python. Every buffered open() of Python asks isatty() (TCGETS), one IOCTL per file opened.
    ioctl = None

    def __init__(self, ov: Overlay, on_ready: Callable[[], None] | None = None) -> None:
        self.ov = ov
        ov.notify = self._invalidate
        self.on_ready = on_ready
        self._dirs: dict[int, list[Any]] = {}
        self._next_dir = itertools.count(1 << 40)  # never equal to a file handle (an fd number)
        self.backings: Backings | None = None  # set at INIT when the kernel takes passthrough

    def init_with_config(self, conn: Any, config: Any) -> None:
        if config is not None:
            config.entry_timeout = FOREVER
            config.attr_timeout = FOREVER
            config.negative_timeout = FOREVER
            config.use_ino = 1
            config.readdir_ino = 0
            # hard_remove would make fstat() of an open, unlinked file fail (ESTALE): let libfuse rename it to
            # .fuse_hidden*, which the core parks in the work dir, out of the upper dir and of every listing.
            config.hard_remove = 0
            config.kernel_cache = 0  # keep_cache is chosen per open (_FUSE._opened): passthrough forbids it
        if conn is not None:
            conn.max_write = IO_SIZE
            conn.max_read = IO_SIZE
            conn.max_readahead = IO_SIZE
            if HAS_PASSTHROUGH_API and conn.capable & FUSE_CAP_PASSTHROUGH and os.environ.get(
                    "LAMINA_FS_PASSTHROUGH", "1") != "0":
                conn.want |= FUSE_CAP_PASSTHROUGH
                # backing files may sit on one stacked filesystem (an overlay mount, say), as with passthrough_hp
                conn.max_backing_stack_depth = 1
                f = _lib.fuse_get_context().contents.fuse
                self.backings = Backings(_lib.fuse_session_fd(_lib.fuse_get_session(f)))
        if self.on_ready is not None:
            self.on_ready()

    def check_writable(self, path: str) -> None:
        """ETXTBSY if the data of the file at `path` may not change now (passthrough.Backings.check_writable)."""
        if self.backings is None or not self.backings.lower_open:
            return  # nothing open from a lower layer by passthrough: no lookup on every write-open and create
        n = self.ov.resolve(path)
        if n is not None:
            self.backings.check_writable(n.ino)

    @staticmethod
    def _invalidate(paths: list[str]) -> None:
        """Drop the kernel's cached attributes and pages of other names of a changed file."""
        f = _lib.fuse_get_context().contents.fuse
        if not f:
            return
        for p in paths:
            _lib.fuse_invalidate_path(ctypes.c_void_p(f), os.fsencode(p))

    @staticmethod
    def _owner() -> tuple[int, int]:
        uid, gid, _ = fuse.fuse_get_context()
        return uid, gid

    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, Any]:
        return self.ov.getattr(path, fh)

    def readlink(self, path: str) -> str:
        return self.ov.readlink(path)

    def opendir(self, path: str) -> int:
        fh = next(self._next_dir)  # [path, merged names once read]: merging happens in readdir
        self._dirs[fh] = [path, None]
        return fh

    def readdir(self, path: str | None, fh: int) -> list[tuple[str, dict[str, int], int]]:
        # registers the callback with mfusepy; _FUSE.readdir_fuse_3 does the work
        raise fuse.FuseOSError(errno.ENOSYS)

    def releasedir(self, path: str | None, fh: int) -> int:
        self._dirs.pop(fh, None)
        return 0

    def fsyncdir(self, path: str | None, datasync: int, fh: int) -> int:
        return 0

    def mknod(self, path: str, mode: int, dev: int) -> int:
        self.ov.mknod(path, mode, dev, self._owner())
        return 0

    def mkdir(self, path: str, mode: int) -> int:
        self.ov.mkdir(path, mode, self._owner())
        return 0

    def unlink(self, path: str) -> int:
        self.ov.unlink(path)
        return 0

    def rmdir(self, path: str) -> int:
        self.ov.rmdir(path)
        return 0

    def symlink(self, target: str, source: str) -> int:
        self.ov.symlink(target, source, self._owner())
        return 0

    def rename(self, old: str, new: str, flags: int = 0) -> int:
        self.ov.rename(old, new, flags)
        return 0

    def link(self, target: str, source: str) -> int:
        self.ov.link(source, target)
        return 0

    def chmod(self, path: str | None, mode: int) -> int:
        self.ov.chmod(self._path(path), mode)
        return 0

    def chown(self, path: str | None, uid: int, gid: int) -> int:
        self.ov.chown(self._path(path), uid, gid)
        return 0

    def utimens(self, path: str | None, times: tuple[int, int] | None = None) -> int:
        self.ov.utimens(self._path(path), times)
        return 0

    @staticmethod
    def _path(path: str | None) -> str:
        if path is None:
            raise fuse.FuseOSError(fuse.errno.ENOENT)
        return path

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        if fh is None and path is not None:
            self.check_writable(path)
        self.ov.truncate(path, length, fh)
        return 0

    def open(self, path: str, flags: int) -> int:
        return self.ov.open(path, flags)

    def create(self, path: str, mode: int, flags: int) -> int:
        return self.ov.create(path, mode, flags, self._owner())

    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        return self.ov.read(fh, size, offset)

    def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
        return self.ov.write(fh, data, offset)

    def flush(self, path: str | None, fh: int) -> int:
        self.ov.flush(fh)
        return 0

    def release(self, path: str | None, fh: int) -> int:
        if self.backings is not None:
            self.backings.release(fh)  # before the fd closes: its number is the key, and may be reused at once
        self.ov.release(fh)
        return 0

    def fsync(self, path: str | None, datasync: int, fh: int) -> int:
        self.ov.fsync(fh, bool(datasync))
        return 0

    def fallocate(self, path: str | None, mode: int, offset: int, size: int, fh: int) -> int:
        self.ov.fallocate(fh, mode, offset, size)
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        return self.ov.statfs(path)

    def access(self, path: str, amode: int) -> int:
        self.ov.access(path, amode)
        return 0

    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        return self.ov.getxattr(path, name)

    def listxattr(self, path: str) -> list[str]:
        return self.ov.listxattr(path)

    def setxattr(self, path: str, name: str, value: bytes, options: int, position: int = 0) -> int:
        self.ov.setxattr(path, name, value, options)
        return 0

    def removexattr(self, path: str, name: str) -> int:
        self.ov.removexattr(path, name)
        return 0


def serve(ov: Overlay, mountpoint: str, *, read_only: bool = False, debug: bool = False,
          fsname: str = "lamina-fs", on_ready: Callable[[], None] | None = None) -> None:
    """Mount and serve until unmounted (blocks). `on_ready` runs once the kernel has the mount."""
    # Two libfuse workers. Every callback holds the GIL, so more only hand it back and forth (futex wake-ups and
    # context switches dominated the daemon's profile: 4 processes opening 2,000 store files took 150 ms with 1 or 2
    # workers, 200-350 ms with 4 or 16). One worker did better still there (5,000 files: 550 against 660-1,010 ms)
    # but worse wherever a single caller waits on each reply, its RELEASEs and FORGETs queued behind its requests
    # (full benchmark: stat of 20,000 files 0.89 -> 1.19 s, untar 1.22 -> 1.36 s). The second worker also serves
    # everyone else while one blocks in a copy-up or an fsync.
    opts: dict[str, Any] = dict(
        foreground=True, nothreads=False, debug=debug, fsname=fsname, subtype="lamina-fs",
        allow_other=True, default_permissions=True, use_ino=True, max_read=IO_SIZE,
        # idle workers are kept rather than ended, so their pinned thread states stay in use
        max_idle_threads=64,
    )
    if HAS_PASSTHROUGH_API:
        opts["max_threads"] = MAX_THREADS  # (libfuse 3.14, without passthrough, takes no cap: as many as it likes)
    if os.geteuid() == 0:
        opts.update(dev=True, suid=True)  # a container root filesystem needs device nodes and setuid binaries
    if read_only:
        opts["ro"] = True
    if HAS_IO_URING_OPTION and os.environ.get("LAMINA_FS_IO_URING", "1") != "0":
        # FUSE-over-io-uring where the kernel offers it (fuse.enable_uring), else /dev/fuse as before: one ring per
        # CPU, each served by a libfuse thread pinned there, so a request and its reply stay on the caller's CPU
        # (stat of 5,000 files on a fresh mount 210 -> 115 ms on 2 CPUs; fuse-overlayfs 195 ms). These threads serve
        # their ring's requests one at a time: a caller on a CPU whose thread is in a long copy-up or fsync waits
        # for it (callers on the other CPUs do not), and libfuse does not pass interrupts on from a ring.
        opts["io_uring"] = True
    logging.getLogger("mfusepy").setLevel(logging.WARNING)
    _FUSE(LaminaOperations(ov, on_ready), mountpoint, **opts)
