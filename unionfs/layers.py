"""Read-only layer sources of the union: the `Layer` protocol, its `Record`, and `DirLayer` (a plain directory).

A layer answers lookups by path (its root is "/") and hands out records that already say whether a name is a
whiteout, whether a directory is opaque and whether it redirects (overlayfs `redirect_dir`). `DirLayer` reads every
on-disk form overlayfs and fuse-overlayfs write, so that an upper directory rotated into a lower reads back as it was:
char 0/0 whiteouts, `.wh.<name>` files, zero-size files with `trusted.overlay.whiteout`, `trusted.overlay.opaque`,
`user.overlay.opaque`, `user.fuseoverlayfs.opaque` and `.wh..wh..opq`.
"""
from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from typing import Protocol

from .beneath import At, Dir, Tree

WH_PREFIX = ".wh."
WH_OPQ = ".wh..wh..opq"
OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque", "user.fuseoverlayfs.opaque")
REDIRECT_XATTRS = ("trusted.overlay.redirect", "user.overlay.redirect")
WHITEOUT_XATTRS = ("trusted.overlay.whiteout", "user.overlay.whiteout")
# xattrs that belong to the union's bookkeeping and are never shown through the mount or copied up.
PRIVATE_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.", "user.fuseoverlayfs.", "trusted.lamina.")
# Under the kernel's own private namespace ("trusted.overlay."), which kernel overlayfs never shows through its mount,
# so an upper lamina wrote shows no trace of lamina when the kernel mounts it (the kernel ignores keys it does not
# know). Uppers written before this name (trusted.lamina.origin) keep working; their copied-up files get new numbers.
ORIGIN_XATTR = "trusted.overlay.lamina.origin"
_XWH_MAX = 4096


# Like kernel overlayfs (6.7+), a user's own "trusted.overlay.X" is stored escaped as "trusted.overlay.overlay.X".
ESCAPED_PREFIX = "trusted.overlay.overlay."
OVL_PREFIX = "trusted.overlay."


def is_private_xattr(name: str) -> bool:
    return name.startswith(PRIVATE_XATTR_PREFIXES) and not name.startswith(ESCAPED_PREFIX)


def xattr_to_layer(name: str) -> str | None:
    """The stored name of a user-visible xattr name; None for names the union keeps for itself."""
    if name.startswith(OVL_PREFIX):
        return ESCAPED_PREFIX + name[len(OVL_PREFIX):]
    return None if name.startswith(PRIVATE_XATTR_PREFIXES) else name


def xattr_from_layer(name: str) -> str | None:
    """The user-visible name of a stored xattr; None for the union's own bookkeeping."""
    if name.startswith(ESCAPED_PREFIX):
        return OVL_PREFIX + name[len(ESCAPED_PREFIX):]
    return None if name.startswith(PRIVATE_XATTR_PREFIXES) else name


@dataclass(frozen=True, slots=True)
class Record:
    """What a layer holds at one path. `ino` is already the union-wide inode number (layer tag applied)."""

    mode: int
    ino: int
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    size: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    rdev: int = 0
    blocks: int = 0
    whiteout: bool = False
    opaque: bool = False
    redirect: str | None = None

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


class Layer(Protocol):
    """A read-only layer. Paths are absolute inside the layer ("/" is its root)."""

    name: str

    def lookup(self, path: str) -> Record | None: ...

    def listdir(self, path: str) -> list[tuple[str, int, int, bool]]:
        """Raw entries of a directory as (name, st_mode type bits, ino, is_whiteout); markers already decoded."""
        ...

    def open_read(self, path: str) -> int:
        """An O_RDONLY file descriptor for a regular file's content (OSError EIO if the content is lost)."""
        ...

    def readlink(self, path: str) -> str: ...

    def listxattr(self, path: str) -> list[str]: ...

    def getxattr(self, path: str, name: str) -> bytes: ...

    def statvfs(self) -> os.statvfs_result: ...


def _is_whiteout_stat(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _join(dirpath: str, name: str) -> str:
    return dirpath + name if dirpath.endswith("/") else dirpath + "/" + name


class DirLayer:
    """A plain directory as a layer (a lower dir, or the upper dir seen read-only). Every access goes through
    `beneath.Tree`: relative to a directory descriptor opened beneath the root, never by a joined path."""

    def __init__(self, root: str, ino_tag: int = 0, name: str | None = None) -> None:
        self.root = os.path.realpath(root)  # podman passes lowerdirs as symlinks (overlay/l/<short id>)
        self.ino_tag = ino_tag
        self.name = name or self.root
        self.tree = Tree(self.root)
        self._xwh: dict[str, bool] = {}

    def real(self, path: str) -> str:
        return self.root if path == "/" else self.root + path

    def at(self, path: str) -> At:
        """`with layer.at(path) as (dirfd, name)`: the parent directory of `path` (not "/") and its last name."""
        return At(self.tree, path)

    def _dir_xattr(self, d: Dir, wanted: tuple[str, ...]) -> bytes | None:
        """The first of the `wanted` xattrs directory `d` carries."""
        try:
            names = d.listxattr()
        except OSError:
            return None
        return self._pick(d, names, wanted)

    def _dir_markers(self, path: str) -> tuple[bool, str | None]:
        """(opaque, redirect) of the directory at `path`."""
        try:
            d = self.tree.hold(path)
        except OSError:
            return False, None  # (gone meanwhile, or unreadable: shown as a plain directory)
        try:
            try:
                names = d.listxattr()
            except OSError:
                names = []
            opaque, redirect = False, None
            if names:
                v = self._pick(d, names, OPAQUE_XATTRS)
                opaque = v is not None and v[:1] == b"y"
                r = self._pick(d, names, REDIRECT_XATTRS)
                redirect = r.decode("utf-8", "surrogateescape") if r is not None else None
            if not opaque:
                opaque = _lexists_at(d.fd, WH_OPQ)
            return opaque, redirect
        finally:
            self.tree.release(d)

    def _pick(self, d: Dir, names: list[str], wanted: tuple[str, ...]) -> bytes | None:
        for n in wanted:
            if n in names:
                try:
                    return d.getxattr(n)
                except OSError:
                    pass
        return None

    def record(self, path: str, st: os.stat_result, dirfd: int = -1, name: str = "") -> Record:
        whiteout = _is_whiteout_stat(st)
        opaque = False
        redirect = None
        if stat.S_ISDIR(st.st_mode):
            opaque, redirect = self._dir_markers(path)
        elif stat.S_ISREG(st.st_mode) and st.st_size == 0 and path != "/" and dirfd >= 0 and \
                self._xwhiteouts(path):
            try:
                names = os.listxattr(f"/proc/self/fd/{dirfd}/{name}", follow_symlinks=False)
            except OSError:
                names = []
            if any(n in names for n in WHITEOUT_XATTRS):
                whiteout = True
        return Record(
            mode=st.st_mode, ino=st.st_ino | self.ino_tag, nlink=st.st_nlink, uid=st.st_uid, gid=st.st_gid,
            size=st.st_size, atime_ns=st.st_atime_ns, mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns,
            rdev=st.st_rdev, blocks=st.st_blocks, whiteout=whiteout, opaque=opaque, redirect=redirect,
        )

    def _xwhiteouts(self, path: str) -> bool:
        """Whether the directory holding `path` is marked opaque=x, the only place overlayfs honours xattr
        whiteouts. Remembered per directory (a bounded map): every empty file of a layer would otherwise cost a
        listxattr. The union marks a directory so only where it cannot write other whiteouts, and calls
        `forget_xwhiteouts` then and whenever an upper directory is removed or moved (the map is by path); a stale
        True only costs that listxattr."""
        head = path.rpartition("/")[0] or "/"
        v = self._xwh.get(head)
        if v is None:
            try:
                d = self.tree.hold(head)
            except OSError:
                return False
            try:
                v = self._dir_xattr(d, OPAQUE_XATTRS) == b"x"
            finally:
                self.tree.release(d)
            if len(self._xwh) >= _XWH_MAX:
                self._xwh.clear()
            self._xwh[head] = v
        return v

    def forget_xwhiteouts(self) -> None:
        self._xwh.clear()

    def stat(self, path: str) -> os.stat_result:
        """lstat of `path`, reached beneath the root."""
        if path == "/":
            return os.fstat(self.tree.root.fd)
        with self.at(path) as (fd, name):
            return os.stat(name, dir_fd=fd, follow_symlinks=False)

    def lookup(self, path: str) -> Record | None:
        if path == "/":
            return self.record(path, os.fstat(self.tree.root.fd))
        head, _, name = path.rpartition("/")
        try:
            d = self.tree.hold(head or "/")
        except OSError as e:
            if e.errno not in _ABSENT:
                raise
            return None  # a missing parent, or one that is not a directory here (a symlink is never followed)
        try:
            try:
                st = os.stat(name, dir_fd=d.fd, follow_symlinks=False)
            except OSError as e:
                if e.errno not in _ABSENT:
                    raise
                if name and not name.startswith(WH_PREFIX) and _lexists_at(d.fd, WH_PREFIX + name):
                    return Record(mode=stat.S_IFCHR, ino=0, whiteout=True)
                return None
            if name.startswith(WH_PREFIX):
                return None  # marker files are never names of the union
            return self.record(path, st, d.fd, name)
        finally:
            self.tree.release(d)

    def listdir(self, path: str) -> list[tuple[str, int, int, bool]]:
        out: list[tuple[str, int, int, bool]] = []
        d = self.tree.hold(path)
        try:
            # kernel overlayfs marks a directory holding xattr whiteouts with opaque=x; only then are files checked
            xattr_whiteouts = self._dir_xattr(d, OPAQUE_XATTRS) == b"x"
            # a listing of its own: the held descriptor's file offset is shared by every user of it
            fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=d.fd)
        finally:
            self.tree.release(d)
        try:
            with os.scandir(fd) as it:
                for de in it:
                    name = de.name
                    if name.startswith(WH_PREFIX):
                        if name != WH_OPQ and len(name) > len(WH_PREFIX):
                            out.append((name[len(WH_PREFIX):], stat.S_IFCHR, 0, True))
                        continue
                    try:
                        if de.is_dir(follow_symlinks=False):
                            fmt = stat.S_IFDIR
                        elif de.is_file(follow_symlinks=False):
                            fmt = stat.S_IFREG
                            if xattr_whiteouts and de.stat(follow_symlinks=False).st_size == 0:
                                xs = os.listxattr(f"/proc/self/fd/{fd}/{name}", follow_symlinks=False)
                                if any(n in xs for n in WHITEOUT_XATTRS):
                                    out.append((name, stat.S_IFCHR, 0, True))
                                    continue
                        elif de.is_symlink():
                            fmt = stat.S_IFLNK
                        else:
                            st = de.stat(follow_symlinks=False)
                            if _is_whiteout_stat(st):
                                out.append((name, stat.S_IFCHR, 0, True))
                                continue
                            fmt = stat.S_IFMT(st.st_mode)
                    except FileNotFoundError:
                        continue
                    out.append((name, fmt, de.inode() | self.ino_tag, False))
        finally:
            os.close(fd)
        return out

    def raw_names(self, path: str) -> list[str]:
        """Every name in the directory at `path`, markers included."""
        d = self.tree.hold(path)
        try:
            fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=d.fd)
        finally:
            self.tree.release(d)
        try:
            return os.listdir(fd)
        finally:
            os.close(fd)

    def open_read(self, path: str) -> int:
        return self.open(path, os.O_RDONLY)

    def open(self, path: str, flags: int, mode: int = 0o777) -> int:
        """open(2) of `path` with `flags` (O_NOFOLLOW added: a layer's symlink is never followed)."""
        if path == "/":
            return os.open(".", flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=self.tree.root.fd)
        with self.at(path) as (fd, name):
            return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=fd)

    def readlink(self, path: str) -> str:
        with self.at(path) as (fd, name):
            return os.readlink(name, dir_fd=fd)

    def listxattr(self, path: str) -> list[str]:
        if path == "/":
            return [n for n in self.tree.root.listxattr() if not is_private_xattr(n)]
        with self.at(path) as (fd, name):
            return [n for n in os.listxattr(f"/proc/self/fd/{fd}/{name}", follow_symlinks=False) if not is_private_xattr(n)]

    def getxattr(self, path: str, name: str) -> bytes:
        if path == "/":
            return self.tree.root.getxattr(name)
        with self.at(path) as (fd, last):
            return os.getxattr(f"/proc/self/fd/{fd}/{last}", name, follow_symlinks=False)

    def statvfs(self) -> os.statvfs_result:
        return os.statvfs(self.root)


# a symlink where a directory is wanted: not there (overlayfs never follows one inside a layer)
_ABSENT = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)


def _lexists_at(dirfd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        return True
    except OSError:
        return False
