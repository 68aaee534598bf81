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
import threading
from collections.abc import Callable
from typing import Any

# libfuse 3 by its soname: naming the library spares mfusepy's find_library(), which runs ldconfig
# in a subprocess (several milliseconds of every mount, and of every `lamina run`).
os.environ.setdefault("FUSE_LIBRARY_PATH", "libfuse3.so.3")

import mfusepy as fuse  # noqa: E402

from .overlay import Overlay  # noqa: E402

fuse._libfuse.fuse_invalidate_path.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
fuse._libfuse.fuse_invalidate_path.restype = ctypes.c_int

log = logging.getLogger("lamina.fs")

# Every change passes through the daemon, so the kernel may trust its caches for as long as it likes.
FOREVER = 86400.0 * 365
IO_SIZE = 1 << 20
FUSE_READDIR_PLUS = 1  # enum fuse_readdir_flags
FUSE_FILL_DIR_PLUS = 2  # enum fuse_fill_dir_flags


_pinned_threads: set[int] = set()


class _FUSE(fuse.FUSE):
    """mfusepy's FUSE with rename flags passed through and libfuse's worker threads kept known to Python."""

    def _wrapper(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        # ctypes gives a foreign thread a fresh Python thread state for every callback and drops it afterwards,
        # which costs more than the operation itself and empties threading.local (the store's per-thread SQLite
        # connections). One extra PyGILState_Ensure per libfuse worker keeps its thread state for good.
        tid = threading.get_native_id()
        if tid not in _pinned_threads:
            _pinned_threads.add(tid)
            ctypes.pythonapi.PyGILState_Ensure()
        return super()._wrapper(func, *args, **kwargs)

    def open(self, path: bytes, fip: Any) -> int:
        r = super().open(path, fip)
        fip.contents.noflush = 1  # writes reach the upper file at once: close() has nothing left to flush
        return r

    def create(self, path: bytes, mode: int, fip: Any) -> int:
        r = super().create(path, mode, fip)
        fip.contents.noflush = 1
        return r

    def opendir(self, path: bytes, fip: Any) -> int:
        fip.contents.fh = self.operations.opendir(path.decode(self.encoding, self.errors))
        # the kernel may keep listings (where libfuse passes these flags on): every change to a directory passes
        # through it and resets its cache
        fip.contents.cache_readdir = 1
        fip.contents.keep_cache = 1
        return 0

    def readdir_fuse_3(self, path: bytes | None, buf: Any, filler: Any, offset: int, fip: Any, flags: int) -> int:
        """Entries with offsets and full attributes: with READDIRPLUS the kernel then needs no LOOKUP per entry.

        libfuse passes readdirplus attributes on only when the filesystem gives offsets, so the merged name list
        is kept with the open directory handle and each call continues where the last one stopped.
        """
        ops: LaminaOperations = self.operations
        h = ops._dirs.get(fip.contents.fh)
        if h is None:
            return -errno.EBADF
        if path is not None:
            h[0] = path.decode(self.encoding, self.errors)  # the directory may have moved since opendir
        if offset == 0 or h[1] is None:
            try:
                h[1] = ops.ov.readdir_names(h[0])
            except OSError as e:
                return -(e.errno or errno.EIO)
        names: list[str] = h[1]
        plus = bool(flags & FUSE_READDIR_PLUS)
        st = fuse.c_stat()
        size = ctypes.sizeof(st)
        for i in range(offset, len(names)):
            name = names[i]
            try:
                attrs = ops.ov.child_attrs(h[0], name)
            except OSError:
                attrs = None
            if attrs is None:
                continue
            ctypes.memset(ctypes.byref(st), 0, size)
            fuse.set_st_attrs(st, attrs, use_ns=True)
            fill = FUSE_FILL_DIR_PLUS if plus and i >= 2 else 0
            if filler(buf, name.encode(self.encoding, self.errors), st, i + 1, fill) != 0:
                break
        return 0

    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        return self.operations.rename(
            old.decode(self.encoding, self.errors), new.decode(self.encoding, self.errors), flags)


class LaminaOperations(fuse.Operations):
    use_ns = True

    def __init__(self, ov: Overlay, on_ready: Callable[[], None] | None = None) -> None:
        self.ov = ov
        ov.notify = self._invalidate
        self.on_ready = on_ready
        self._dirs: dict[int, list[Any]] = {}
        self._next_dir = itertools.count(1 << 40)  # never equal to a file handle (an fd number)

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
            config.kernel_cache = 1
        if conn is not None:
            conn.max_write = IO_SIZE
            conn.max_read = IO_SIZE
            conn.max_readahead = IO_SIZE
        if self.on_ready is not None:
            self.on_ready()

    @staticmethod
    def _invalidate(paths: list[str]) -> None:
        """Drop the kernel's cached attributes and pages of other names of a changed file."""
        f = fuse._libfuse.fuse_get_context().contents.fuse
        if not f:
            return
        for p in paths:
            fuse._libfuse.fuse_invalidate_path(ctypes.c_void_p(f), os.fsencode(p))

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
    opts: dict[str, Any] = dict(
        foreground=True, nothreads=False, debug=debug, fsname=fsname, subtype="lamina-fs",
        allow_other=True, default_permissions=True, use_ino=True, max_read=IO_SIZE,
        # idle workers are kept rather than ended, so their pinned thread states stay in use
        max_idle_threads=64,
    )
    if os.geteuid() == 0:
        opts.update(dev=True, suid=True)  # a container root filesystem needs device nodes and setuid binaries
    if read_only:
        opts["ro"] = True
    logging.getLogger("mfusepy").setLevel(logging.WARNING)
    _FUSE(LaminaOperations(ov, on_ready), mountpoint, **opts)
