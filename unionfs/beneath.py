"""Directory file descriptors beneath one layer root: how the union reaches its layers' files without joining paths.

Every directory of a layer is opened with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`
from the root or from its parent's descriptor, so no path component that is a symlink, no `..` and no crafted
xattr can lead out of the root (overlayfs itself walks its layers one component at a time, never following a
link). Files are then reached by `*at` calls on their parent's descriptor, so the only length limit is the union
path's own: a layer root of 300 bytes does not shorten what may be created below the mount (fuse-overlayfs works
the same way). Descriptors of directories are kept in a bounded cache; `forget` drops those a rename or rmdir
made stale (the union calls it for its upper directory, the only layer that changes).
"""
from __future__ import annotations

import ctypes
import errno
import os
import threading

RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
_SYS_OPENAT2 = 437  # the same number on every architecture (the generic syscall table)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PATH_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# openat2 refuses a path of PATH_MAX bytes or more: longer walks go by pieces of at most this many bytes
_PIECE = 4000


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def openat2(dirfd: int, path: str, flags: int, resolve: int = _RESOLVE) -> int:
    how = _OpenHow(flags, 0, resolve)
    fd = _libc.syscall(_SYS_OPENAT2, ctypes.c_int(dirfd), os.fsencode(path), ctypes.byref(how),
                       ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path)
    return fd


def check_name(name: str) -> None:
    """A layer path's component: never empty, `.` or `..` (EACCES, as the kernel's lookup_one answers)."""
    if name in ("", ".", ".."):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES), name)


class Dir:
    """A held directory descriptor. `readable`: opened O_RDONLY (else O_PATH: a directory the daemon may not
    read, whose xattrs go through /proc/self/fd)."""

    __slots__ = ("fd", "refs", "cached", "readable")

    def __init__(self, fd: int, readable: bool, cached: bool) -> None:
        self.fd = fd
        self.refs = 1
        self.cached = cached
        self.readable = readable

    def listxattr(self) -> list[str]:
        return os.listxattr(self.fd if self.readable else self.proc())

    def getxattr(self, key: str) -> bytes:
        return os.getxattr(self.fd if self.readable else self.proc(), key)

    def proc(self) -> str:
        """A path naming this directory, for calls that take no descriptor (or none opened O_PATH)."""
        return f"/proc/self/fd/{self.fd}"


def _open_dir(dirfd: int, rel: str) -> tuple[int, bool]:
    try:
        return openat2(dirfd, rel, _DIR_FLAGS), True
    except PermissionError:
        return openat2(dirfd, rel, _PATH_FLAGS), False


class Tree:
    """The directories of one layer root by layer path ("/" is the root), opened beneath it and cached."""

    def __init__(self, root: str, most: int = 128) -> None:
        try:
            self.root = Dir(os.open(root, _DIR_FLAGS & ~os.O_NOFOLLOW), True, True)
        except PermissionError:
            self.root = Dir(os.open(root, _PATH_FLAGS & ~os.O_NOFOLLOW), False, True)
        self.most = most
        self._fds: dict[str, Dir] = {}
        self._mu = threading.Lock()
        self._gen = 0

    def hold(self, path: str) -> Dir:
        """The directory at layer path `path`, held until `release`. OSError (ENOENT, ENOTDIR, ELOOP for a
        symlink, EACCES for `..`) if there is none there."""
        if path == "/":
            return self.root
        with self._mu:
            d = self._fds.get(path)
            if d is not None:
                d.refs += 1
                return d
            gen = self._gen
        fd, readable = self._open(path)
        d = Dir(fd, readable, False)
        with self._mu:
            if gen == self._gen and path not in self._fds:
                while len(self._fds) >= self.most:
                    old = self._fds.pop(next(iter(self._fds)))
                    old.cached = False
                    if old.refs == 0:
                        os.close(old.fd)
                d.cached = True
                self._fds[path] = d
        return d

    def release(self, d: Dir) -> None:
        if d is self.root:
            return
        with self._mu:
            d.refs -= 1
            if d.refs == 0 and not d.cached:
                os.close(d.fd)

    def _open(self, path: str) -> tuple[int, bool]:
        head, _, name = path.rpartition("/")
        check_name(name)
        head = head or "/"
        with self._mu:
            parent = self._fds.get(head)
            if parent is not None:
                parent.refs += 1
        if parent is not None:
            try:
                return _open_dir(parent.fd, name)
            finally:
                self.release(parent)
        parts = path[1:].split("/")
        for p in parts:
            check_name(p)
        rel = path[1:]
        if len(rel) < _PIECE:
            return _open_dir(self.root.fd, rel)
        # a path past PATH_MAX: walk it by pieces, each beneath the last
        at = self.root.fd
        try:
            while rel:
                if len(rel) < _PIECE:
                    piece, rel = rel, ""
                else:
                    cut = rel.rfind("/", 0, _PIECE)
                    if cut <= 0:
                        raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), path)
                    piece, rel = rel[:cut], rel[cut + 1:]
                nxt, readable = _open_dir(at, piece) if not rel else (openat2(at, piece, _PATH_FLAGS), False)
                if at != self.root.fd:
                    os.close(at)
                at = nxt
            return at, readable
        except BaseException:
            if at != self.root.fd:
                os.close(at)
            raise

    def forget(self, path: str) -> None:
        """Drop the descriptors of `path` and every directory below it (it was removed or moved)."""
        pre = path + "/"
        with self._mu:
            self._gen += 1
            for k in [k for k in self._fds if k == path or k.startswith(pre)]:
                d = self._fds.pop(k)
                d.cached = False
                if d.refs == 0:
                    os.close(d.fd)


class At:
    """`with At(tree, path) as (fd, name)`: the held parent directory of layer path `path` (not "/": callers handle
    the root) and its last name."""

    __slots__ = ("tree", "path", "d")

    def __init__(self, tree: Tree, path: str) -> None:
        self.tree = tree
        self.path = path
        self.d: Dir | None = None

    def __enter__(self) -> tuple[int, str]:
        head, _, name = self.path.rpartition("/")
        self.d = self.tree.hold(head or "/")
        return self.d.fd, name

    def __exit__(self, *exc: object) -> None:
        self.tree.release(self.d)  # type: ignore[arg-type]
