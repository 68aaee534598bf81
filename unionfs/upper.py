"""Writes kernel overlayfs's on-disk format into the upper directory: whiteouts, opaque and redirect markers.

Whiteouts are char 0/0 device nodes (the kernel form); where mknod is refused (an unprivileged daemon, a filesystem
without device nodes) an empty `.wh.<name>` file is written instead, as fuse-overlayfs does, and for a name too long
for that prefix (over 251 bytes) the kernel's xattr whiteout: an empty file of the name itself carrying
`overlay.whiteout`, in a directory marked `overlay.opaque=x` (trusted.* where allowed, else user.*, the namespace
of the kernel's `userxattr` mode). Reading every form is `layers.DirLayer`'s job. `renameat2` comes from libc via
ctypes because Python's os module lacks it.
"""
from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Callable

from .layers import OPAQUE_XATTRS, WH_PREFIX, WH_OPQ

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4
OPAQUE_XATTR = "trusted.overlay.opaque"
REDIRECT_XATTR = "trusted.overlay.redirect"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_AT_FDCWD = -100
NAME_MAX = 255


def fallback_name(real: str) -> str | None:
    """The `.wh.<name>` path for the whiteout of `real`, None where that name would exceed NAME_MAX."""
    head, _, name = real.rpartition("/")
    if len(os.fsencode(name)) + len(WH_PREFIX) > NAME_MAX:
        return None
    return f"{head}/{WH_PREFIX}{name}"


def renameat2(old: str, new: str, flags: int = 0) -> None:
    if flags == 0:
        os.rename(old, new)
        return
    if _libc.renameat2(_AT_FDCWD, os.fsencode(old), _AT_FDCWD, os.fsencode(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), old, None, new)


class UpperWriter:
    """Marker writing for one upper directory. `mknod_ok` flips off the first time the kernel refuses a 0/0 node."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.mknod_ok = True
        # called once a directory is marked as holding xattr whiteouts (readers cache which directories are)
        self.on_xwhiteout_dir: Callable[[], None] | None = None

    def real(self, path: str) -> str:
        return self.root if path == "/" else self.root + path

    def make_whiteout_at(self, real: str) -> None:
        """Create a whiteout at `real` (which must not exist); falls back to `.wh.<name>`, then to an xattr
        whiteout."""
        if self.mknod_ok:
            try:
                os.mknod(real, stat.S_IFCHR | 0o000, os.makedev(0, 0))
                return
            except PermissionError:
                self.mknod_ok = False
        wh = fallback_name(real)
        if wh is not None:
            os.close(os.open(wh, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o000))
            return
        self.make_xattr_whiteout(real)

    def make_xattr_whiteout(self, real: str, at: str | None = None) -> None:
        """An empty file at `real` marked as a whiteout, its directory marked as holding such (kernel 6.7+). With
        `at` (a work dir path) the file is made there, for the caller to move to `real`."""
        at = at or real
        os.close(os.open(at, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o000))
        try:
            ns = self._set_xattr_marker(at, "overlay.whiteout", b"")
            head = real.rpartition("/")[0]
            try:
                present = set(os.listxattr(head))
            except OSError:
                present = set()
            if not present.intersection(OPAQUE_XATTRS):  # already marked x, or opaque (y): nothing below shows
                os.setxattr(head, f"{ns}.overlay.opaque", b"x")
                if self.on_xwhiteout_dir is not None:
                    self.on_xwhiteout_dir()
        except BaseException:
            os.unlink(at)
            raise

    @staticmethod
    def _set_xattr_marker(real: str, name: str, value: bytes) -> str:
        """Set trusted.`name`, else (without CAP_SYS_ADMIN) user.`name`; returns the namespace used."""
        try:
            os.setxattr(real, f"trusted.{name}", value, follow_symlinks=False)
            return "trusted"
        except PermissionError:
            os.setxattr(real, f"user.{name}", value, follow_symlinks=False)
            return "user"

    def clear_fallback_whiteout(self, real: str) -> None:
        wh = fallback_name(real)
        if wh is None:
            return  # no such name can exist
        try:
            os.unlink(wh)
        except FileNotFoundError:
            pass

    def set_opaque(self, real: str) -> None:
        try:
            os.setxattr(real, OPAQUE_XATTR, b"y", follow_symlinks=False)
        except PermissionError:
            # without CAP_SYS_ADMIN trusted.* is refused: fall back to fuse-overlayfs's marker file
            os.close(os.open(real + "/" + WH_OPQ, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o000))

    def set_redirect(self, real: str, target: str) -> None:
        os.setxattr(real, REDIRECT_XATTR, os.fsencode(target), follow_symlinks=False)

    def clear_dir(self, real: str) -> None:
        """Remove the whiteouts and markers a logically empty upper directory still holds."""
        with os.scandir(real) as it:
            names = [de.name for de in it]
        for n in names:
            p = real + "/" + n
            try:
                os.unlink(p)
            except IsADirectoryError:
                self.remove_tree(p)

    def remove_tree(self, real: str) -> None:
        try:
            st = os.lstat(real)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(real)
            return
        self.clear_dir(real)
        try:
            os.rmdir(real)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise
