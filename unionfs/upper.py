"""Writes kernel overlayfs's on-disk format into the upper directory: whiteouts, opaque and redirect markers.

Whiteouts are char 0/0 device nodes (the kernel form); where mknod is refused (an unprivileged daemon, a filesystem
without device nodes) an empty `.wh.<name>` file is written instead, as fuse-overlayfs does, and for a name too long
for that prefix (over 251 bytes) the kernel's xattr whiteout: an empty file of the name itself carrying
`overlay.whiteout`, in a directory marked `overlay.opaque=x` (trusted.* where allowed, else user.*, the namespace
of the kernel's `userxattr` mode). Reading every form is `layers.DirLayer`'s job. `renameat2` comes from libc via
ctypes because Python's os module lacks it.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import stat
from collections.abc import Iterator

from .beneath import At
from .layers import OPAQUE_XATTRS, WH_OPQ, WH_PREFIX, DirLayer

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4
OPAQUE_XATTR = "trusted.overlay.opaque"
REDIRECT_XATTR = "trusted.overlay.redirect"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_AT_FDCWD = -100
NAME_MAX = 255


def fallback_name(path: str) -> str | None:
    """The `.wh.<name>` path beside `path` for its whiteout, None where that name would exceed NAME_MAX."""
    head, _, name = path.rpartition("/")
    if len(os.fsencode(name)) + len(WH_PREFIX) > NAME_MAX:
        return None
    return f"{head}/{WH_PREFIX}{name}"


def renameat2(old: str, new: str, flags: int = 0, old_dir: int = _AT_FDCWD, new_dir: int = _AT_FDCWD) -> None:
    if flags == 0:
        os.rename(old, new, src_dir_fd=None if old_dir == _AT_FDCWD else old_dir,
                  dst_dir_fd=None if new_dir == _AT_FDCWD else new_dir)
        return
    if _libc.renameat2(old_dir, os.fsencode(old), new_dir, os.fsencode(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), old, None, new)


class UpperWriter:
    """Marker writing for one upper directory, and every change the union makes there. Paths are upper paths
    ("/" is the root), reached through the upper layer's directory descriptors (`beneath.Tree`), never joined to
    the root: an upper path may be as long as the union path. `mknod_ok` flips off the first time the kernel
    refuses a 0/0 node."""

    def __init__(self, layer: DirLayer) -> None:
        self.layer = layer
        self.root = layer.root
        self.mknod_ok = True

    def at(self, path: str) -> At:
        return self.layer.at(path)

    # ---- plain calls on an upper path ------------------------------------------------------------------------

    def lstat(self, path: str) -> os.stat_result:
        return self.layer.stat(path)

    def unlink(self, path: str) -> None:
        with self.at(path) as (d, name):
            os.unlink(name, dir_fd=d)

    def rmdir(self, path: str) -> None:
        with self.at(path) as (d, name):
            os.rmdir(name, dir_fd=d)

    def mkdir(self, path: str, mode: int) -> None:
        with self.at(path) as (d, name):
            os.mkdir(name, mode, dir_fd=d)

    def mknod(self, path: str, mode: int, rdev: int) -> None:
        with self.at(path) as (d, name):
            os.mknod(name, mode, rdev, dir_fd=d)

    def symlink(self, target: str, path: str) -> None:
        with self.at(path) as (d, name):
            os.symlink(target, name, dir_fd=d)

    def open(self, path: str, flags: int, mode: int = 0o777) -> int:
        return self.layer.open(path, flags, mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        if path == "/":
            os.chown(self.root, uid, gid)
            return
        with self.at(path) as (d, name):
            os.chown(name, uid, gid, dir_fd=d, follow_symlinks=False)

    def chmod(self, path: str, mode: int) -> None:
        """chmod, not following a symlink (where the kernel refuses that, EOPNOTSUPP, as before)."""
        if path == "/":
            os.chmod(self.root, mode)
            return
        with self.at(path) as (d, name):
            if stat.S_ISLNK(os.stat(name, dir_fd=d, follow_symlinks=False).st_mode):
                os.chmod(name, mode, dir_fd=d, follow_symlinks=False)
            else:
                os.chmod(name, mode, dir_fd=d)

    def utime(self, path: str, ns: tuple[int, int] | None) -> None:
        if path == "/":
            os.utime(self.root, ns=ns) if ns is not None else os.utime(self.root)
            return
        with self.at(path) as (d, name):
            if ns is None:
                os.utime(name, dir_fd=d, follow_symlinks=False)
            else:
                os.utime(name, ns=ns, dir_fd=d, follow_symlinks=False)

    def truncate(self, path: str, length: int) -> None:
        with self.at(path) as (d, name):
            os.truncate(self.xattr_path(d, name), length)  # (truncate(2) by a short path: no ftruncate of a FIFO)

    def xattr_path(self, d: int, name: str) -> str:
        """A short path to entry `name` of held directory `d`, for calls that take no directory descriptor."""
        return f"/proc/self/fd/{d}/{name}"

    def setxattr(self, path: str, key: str, value: bytes, flags: int = 0) -> None:
        if path == "/":
            os.setxattr(self.root, key, value, flags)
            return
        with self.at(path) as (d, name):
            os.setxattr(self.xattr_path(d, name), key, value, flags, follow_symlinks=False)

    def removexattr(self, path: str, key: str) -> None:
        if path == "/":
            os.removexattr(self.root, key)
            return
        with self.at(path) as (d, name):
            os.removexattr(self.xattr_path(d, name), key, follow_symlinks=False)

    def getxattr(self, path: str, key: str) -> bytes:
        return self.layer.getxattr(path, key)

    def link_in(self, src: str, path: str) -> None:
        """A new name `path` for the file at absolute path `src` (work or index dir)."""
        with self.at(path) as (d, name):
            os.link(src, name, dst_dir_fd=d, follow_symlinks=False)

    def link_out(self, path: str, dst: str) -> None:
        """A second name, at absolute path `dst` (work or index dir), for the file at `path`."""
        with self.at(path) as (d, name):
            os.link(name, dst, src_dir_fd=d, follow_symlinks=False)

    def link(self, src: str, dst: str) -> None:
        with self.at(src) as (sd, sname), self.at(dst) as (dd, dname):
            os.link(sname, dname, src_dir_fd=sd, dst_dir_fd=dd, follow_symlinks=False)

    def move_in(self, tmp: str, path: str, flags: int = 0) -> None:
        """Rename the work dir's `tmp` to `path` (renameat2 `flags`: RENAME_EXCHANGE swaps the two)."""
        with self.at(path) as (d, name):
            renameat2(tmp, name, flags, _AT_FDCWD, d)

    @contextlib.contextmanager
    def parent_times_kept(self, path: str) -> Iterator[None]:
        """Give `path`'s directory back its atime and mtime once the block has put `path` there: a copy-up changes
        no directory in the union's view (kernel overlayfs restores them too, best effort)."""
        head = path.rpartition("/")[0] or "/"
        try:
            st = self.lstat(head)
        except OSError:
            st = None
        yield
        if st is not None:
            try:
                self.utime(head, (st.st_atime_ns, st.st_mtime_ns))
            except OSError:
                pass

    def rename(self, old: str, new: str, flags: int = 0) -> None:
        with self.at(old) as (od, oname), self.at(new) as (nd, nname):
            renameat2(oname, nname, flags, od, nd)

    # ---- markers ---------------------------------------------------------------------------------------------

    def make_whiteout_at(self, path: str) -> None:
        """Create a whiteout at `path` (which must not exist); falls back to `.wh.<name>`, then to an xattr
        whiteout."""
        with self.at(path) as (d, name):
            if self.mknod_ok:
                try:
                    os.mknod(name, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=d)
                    return
                except PermissionError:
                    self.mknod_ok = False
            if fallback_name(path) is not None:
                os.close(os.open(WH_PREFIX + name, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o000, dir_fd=d))
                return
        self.make_xattr_whiteout(path)

    def make_xattr_whiteout(self, path: str, at: str | None = None) -> None:
        """An empty file at `path` marked as a whiteout, its directory marked as holding such (kernel 6.7+). With
        `at` (an absolute path in the work dir) the file is made there, for the caller to move to `path`."""
        if at is not None:
            fd = os.open(at, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o000)
        else:
            fd = self.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o000)
        try:
            try:
                ns = _set_xattr_marker(fd, "overlay.whiteout", b"")
                self._mark_xwhiteouts(path.rpartition("/")[0] or "/", ns)
            finally:
                os.close(fd)
        except BaseException:
            if at is not None:
                os.unlink(at)
            else:
                self.unlink(path)
            raise

    def _mark_xwhiteouts(self, head: str, ns: str) -> None:
        """Mark directory `head` opaque=x (it holds xattr whiteouts) unless it is marked already, or opaque (y):
        then nothing below shows anyway."""
        tree = self.layer.tree
        d = tree.hold(head)
        try:
            try:
                present = set(d.listxattr())
            except OSError:
                present = set()
            if not present.intersection(OPAQUE_XATTRS):
                os.setxattr(d.proc(), f"{ns}.overlay.opaque", b"x")
                self.layer.forget_xwhiteouts()  # (the layer remembers which directories are marked)
        finally:
            tree.release(d)

    def clear_fallback_whiteout(self, path: str) -> None:
        if fallback_name(path) is None:
            return  # no such name can exist
        with self.at(path) as (d, name):
            try:
                os.unlink(WH_PREFIX + name, dir_fd=d)
            except FileNotFoundError:
                pass

    def set_opaque(self, path: str) -> None:
        if path == "/":
            set_opaque_at(self.root)
            return
        with self.at(path) as (d, name):
            set_opaque_at(self.xattr_path(d, name))

    def set_redirect(self, path: str, target: str) -> None:
        self.setxattr(path, REDIRECT_XATTR, os.fsencode(target))

    def clear_dir(self, path: str) -> None:
        """Remove the whiteouts and markers a logically empty upper directory still holds."""
        for n in self.layer.raw_names(path):
            p = _join(path, n)
            try:
                self.unlink(p)
            except IsADirectoryError:
                self.remove_tree(p)

    def remove_tree(self, path: str) -> None:
        try:
            st = self.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):
            self.unlink(path)
            return
        self.clear_dir(path)
        try:
            self.rmdir(path)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise
        self.layer.tree.forget(path)


def _set_xattr_marker(fd: int, name: str, value: bytes) -> str:
    """Set trusted.`name` on open file `fd`, else (without CAP_SYS_ADMIN) user.`name`; returns the namespace used."""
    try:
        os.setxattr(fd, f"trusted.{name}", value)
        return "trusted"
    except PermissionError:
        os.setxattr(fd, f"user.{name}", value)
        return "user"


def _join(d: str, name: str) -> str:
    return d + name if d.endswith("/") else d + "/" + name


def set_opaque_at(real: str) -> None:
    """Mark the directory at absolute path `real` (in the work dir) opaque."""
    try:
        os.setxattr(real, OPAQUE_XATTR, b"y", follow_symlinks=False)
    except PermissionError:
        # without CAP_SYS_ADMIN trusted.* is refused: fall back to fuse-overlayfs's marker file
        os.close(os.open(real + "/" + WH_OPQ, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o000))


def clear_dir(real: str) -> None:
    """Empty the directory at absolute path `real` (the work dir at start-up: leftovers of an interrupted copy-up
    or of files parked by a dead daemon)."""
    with os.scandir(real) as it:
        names = [de.name for de in it]
    for n in names:
        p = real + "/" + n
        try:
            os.unlink(p)
        except IsADirectoryError:
            shutil.rmtree(p, ignore_errors=True)
