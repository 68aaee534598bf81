"""Writing a directory tree as a layer tar (PAX, deterministic order), the way a directory enters the store.

Plain directories become layers through a tar so that they take the same import path (and the same checks) as
every other source. With `overlay_upper=True` the directory is read as a kernel-overlayfs upper directory and
its whiteouts are translated to OCI form: a 0/0 character device becomes `.wh.<name>`, a directory marked
`trusted.overlay.opaque=y` (or `user.overlay.opaque`) gets a `.wh..wh..opq` entry.
"""
from __future__ import annotations

import os
import stat
import tarfile
from typing import BinaryIO, Iterator

OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque", "user.fuseoverlayfs.opaque")
HIDDEN_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.", "user.fuseoverlayfs.")


def _xattrs(path: str) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    out = {}
    for n in names:
        if n.startswith(HIDDEN_XATTR_PREFIXES):
            continue
        try:
            out[n] = os.getxattr(path, n, follow_symlinks=False)
        except OSError:
            pass
    return out


def _is_opaque(path: str) -> bool:
    for n in OPAQUE_XATTRS:
        try:
            if os.getxattr(path, n, follow_symlinks=False) == b"y":
                return True
        except OSError:
            pass
    return os.path.lexists(os.path.join(path, ".wh..wh..opq"))


def write_dir_tar(root: str, out: BinaryIO, overlay_upper: bool = False,
                  exclude: frozenset[str] = frozenset()) -> None:
    """`exclude` names layer paths ('/data') to leave out when they are empty placeholders (a mount point that
    a container runtime created for a volume), never when they hold content."""
    tf = tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape")
    try:
        def add(path: str, arcname: str, st: os.stat_result) -> None:
            ti = tf.gettarinfo(path, arcname)
            ti.uname = ti.gname = ""
            ti.mtime = st.st_mtime_ns / 1e9 if st.st_mtime_ns % 1_000_000_000 else st.st_mtime_ns // 1_000_000_000
            for k, v in _xattrs(path).items():
                ti.pax_headers["SCHILY.xattr." + k] = v.decode("utf-8", "surrogateescape")
            if ti.isreg():
                with open(path, "rb") as f:
                    tf.addfile(ti, f)
            else:
                tf.addfile(ti)

        def listing(dirpath: str, arcdir: str) -> Iterator[str]:
            try:
                names = sorted(os.listdir(dirpath))
            except OSError as e:
                raise OSError(e.errno, f"cannot read directory {dirpath}: {e.strerror}") from None
            if overlay_upper and _is_opaque(dirpath) and arcdir:
                opq = tarfile.TarInfo(arcdir + "/.wh..wh..opq")
                tf.addfile(opq)
            return iter(names)

        # A stack of open listings rather than recursion: a tree may be as deep as the kernel allows
        stack = [(root, "", listing(root, ""))]
        while stack:
            dirpath, arcdir, names = stack[-1]
            for name in names:
                if overlay_upper and name == ".wh..wh..opq":
                    continue
                path = os.path.join(dirpath, name)
                arc = f"{arcdir}/{name}" if arcdir else name
                st = os.lstat(path)
                if "/" + arc in exclude and (stat.S_ISREG(st.st_mode) and st.st_size == 0 or
                                             stat.S_ISDIR(st.st_mode) and not os.listdir(path)):
                    continue
                if stat.S_ISSOCK(st.st_mode):
                    continue  # tar cannot hold sockets; neither does any image format
                if overlay_upper and stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                    wh = tarfile.TarInfo(f"{arcdir}/.wh.{name}" if arcdir else f".wh.{name}")
                    wh.mtime = st.st_mtime
                    tf.addfile(wh)
                    continue
                add(path, arc, st)
                if stat.S_ISDIR(st.st_mode):
                    stack.append((path, arc, listing(path, arc)))
                    break
            else:
                stack.pop()
    finally:
        tf.close()
