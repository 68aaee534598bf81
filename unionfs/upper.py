"""Writes kernel overlayfs's on-disk format into the upper directory: whiteouts, opaque and redirect markers.

Whiteouts are char 0/0 device nodes (the kernel form); where mknod is refused (an unprivileged daemon, a filesystem
without device nodes) an empty `.wh.<name>` file is written instead, as fuse-overlayfs does. Reading every form is
`layers.DirLayer`'s job. `renameat2` comes from libc via ctypes because Python's os module lacks it.
"""
from __future__ import annotations

import ctypes
import errno
import os
import stat

from .layers import WH_PREFIX, WH_OPQ

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4
OPAQUE_XATTR = "trusted.overlay.opaque"
REDIRECT_XATTR = "trusted.overlay.redirect"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_AT_FDCWD = -100


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

    def real(self, path: str) -> str:
        return self.root if path == "/" else self.root + path

    def make_whiteout_at(self, real: str) -> None:
        """Create a whiteout at `real` (which must not exist); falls back to `.wh.<name>`."""
        if self.mknod_ok:
            try:
                os.mknod(real, stat.S_IFCHR | 0o000, os.makedev(0, 0))
                return
            except PermissionError:
                self.mknod_ok = False
        head, _, name = real.rpartition("/")
        fd = os.open(f"{head}/{WH_PREFIX}{name}", os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o000)
        os.close(fd)

    def clear_fallback_whiteout(self, real: str) -> None:
        head, _, name = real.rpartition("/")
        try:
            os.unlink(f"{head}/{WH_PREFIX}{name}")
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
