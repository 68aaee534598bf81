"""Writing layer tars: `LayerTar` (OCI's layer format member by member, in the order given) and `write_dir_tar` (a
plain directory tree as one, the way a directory enters the store).

Plain directories become layers through a tar so that they take the same import path (and the same checks) as every
other source. `LayerTar` writes OCI's whiteouts (`.wh.NAME`, `.wh..wh..opq`), hardlinks (a later name of a file
links to the first one written) and exact times: PAX `mtime` with the full nanosecond fraction, the root included.
A union's upper directory is not a plain directory: `unionfs.changes` reads it and writes through `LayerTar`, so the
store knows OCI's layer format and not kernel overlayfs's.
"""
from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import BinaryIO

from .ingest import WH_OPAQUE, WH_PREFIX

# xattrs that are a union filesystem's bookkeeping (kernel overlayfs, fuse-overlayfs, lamina's), never content.
HIDDEN_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.", "user.fuseoverlayfs.", "trusted.lamina.")
_USTAR_MTIME_MAX = 8 ** 11 - 1


@dataclass(frozen=True, slots=True)
class Member:
    """One path of a layer as a tar member. `link`: the same key on every name of one file (hardlinks)."""

    path: str  # absolute in the layer, "/" its root
    mode: int  # full st_mode
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0
    rdev: int = 0
    target: str | None = None  # a symlink's
    xattrs: dict[str, bytes] | None = None
    link: Hashable | None = None


def pax_time(ns: int) -> str:
    """Nanoseconds since the epoch as a PAX time: decimal seconds, the fraction exact and without trailing zeros."""
    sign = "-" if ns < 0 else ""
    sec, frac = divmod(abs(ns), 1_000_000_000)
    return f"{sign}{sec}.{frac:09d}".rstrip("0") if frac else f"{sign}{sec}"


def _arcname(path: str) -> str:
    return "." if path == "/" else path.lstrip("/")


class LayerTar:
    """A layer tar being written to `out` (PAX format); `close` (or the with block's end) writes its end."""

    def __init__(self, out: BinaryIO) -> None:
        self.tf = tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8",
                               errors="surrogateescape")
        self._first: dict[Hashable, str] = {}  # hardlink key -> the name its content went under

    def __enter__(self) -> LayerTar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.tf.close()

    def add(self, m: Member, content: Callable[[], int] | None = None) -> None:
        """Write `m`; `content` opens a regular file's data (an fd, closed here). Sockets are left out: no image
        format holds them."""
        fmt = stat.S_IFMT(m.mode)
        if fmt == stat.S_IFSOCK:
            return
        ti = tarfile.TarInfo(_arcname(m.path))
        ti.mode = stat.S_IMODE(m.mode)
        ti.uid, ti.gid = m.uid, m.gid
        ti.uname = ti.gname = ""
        # The header's own field holds whole seconds in 0..8^11-1; the PAX record holds the exact time and wins.
        ti.mtime = min(max(m.mtime_ns // 1_000_000_000, 0), _USTAR_MTIME_MAX)
        if ti.mtime * 1_000_000_000 != m.mtime_ns:
            ti.pax_headers["mtime"] = pax_time(m.mtime_ns)
        for k, v in sorted((m.xattrs or {}).items()):
            ti.pax_headers["SCHILY.xattr." + k] = v.decode("utf-8", "surrogateescape")
        if m.link is not None and fmt != stat.S_IFDIR:
            first = self._first.get(m.link)
            if first is not None:
                ti.type, ti.linkname = tarfile.LNKTYPE, first
                self.tf.addfile(ti)
                return
            self._first[m.link] = ti.name
        if fmt == stat.S_IFREG:
            ti.size = m.size
            if content is None:
                raise ValueError(f"{m.path}: a regular file needs its content")
            with os.fdopen(content(), "rb") as f:
                self.tf.addfile(ti, f)
            return
        if fmt == stat.S_IFDIR:
            ti.type = tarfile.DIRTYPE
        elif fmt == stat.S_IFLNK:
            ti.type, ti.linkname = tarfile.SYMTYPE, m.target or ""
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            ti.type = tarfile.CHRTYPE if fmt == stat.S_IFCHR else tarfile.BLKTYPE
            ti.devmajor, ti.devminor = os.major(m.rdev), os.minor(m.rdev)
        elif fmt == stat.S_IFIFO:
            ti.type = tarfile.FIFOTYPE
        else:
            raise ValueError(f"{m.path}: no tar form for file type {fmt:o}")
        self.tf.addfile(ti)

    def whiteout(self, path: str) -> None:
        """`path` is deleted: OCI's `.wh.NAME` beside it."""
        head, _, name = path.rpartition("/")
        self.tf.addfile(tarfile.TarInfo(_arcname(f"{head}/{WH_PREFIX}{name}")))

    def opaque(self, dirpath: str) -> None:
        """Directory `dirpath` hides all that lower layers hold below it (written after the directory itself)."""
        self.tf.addfile(tarfile.TarInfo(_arcname(dirpath.rstrip("/") + "/" + WH_OPAQUE)))


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


def write_dir_tar(root: str, out: BinaryIO) -> None:
    """The tree at `root` (root directory included) as a layer tar: names sorted, each directory followed by its
    contents. The walk keeps its own stack, so any depth the kernel allows is written."""
    with LayerTar(out) as lt:
        todo = [("/", root)]
        while todo:
            path, real = todo.pop()
            st = os.stat(real) if path == "/" else os.lstat(real)  # the directory given may be named by a symlink
            fmt = stat.S_IFMT(st.st_mode)
            m = Member(path, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_size if fmt == stat.S_IFREG
                       else 0, st.st_rdev, os.readlink(real) if fmt == stat.S_IFLNK else None, _xattrs(real),
                       (st.st_dev, st.st_ino) if st.st_nlink > 1 and fmt != stat.S_IFDIR else None)
            lt.add(m, lambda: os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC))
            if fmt == stat.S_IFDIR:
                try:
                    names = sorted(os.listdir(real), reverse=True)
                except OSError as e:
                    raise OSError(e.errno, f"cannot read directory {real}: {e.strerror}") from None
                todo.extend((path.rstrip("/") + "/" + n, f"{real}/{n}") for n in names)
