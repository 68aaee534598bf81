"""Reading a union's upper directory back as the changes it makes to its lower layers: what `lamina diff` lists and
what `lamina commit` (and the coming `lamina build`) writes as a layer (`write_layer`).

The upper holds kernel overlayfs's on-disk format, which `layers.DirLayer` decodes (char 0/0 and `.wh.` whiteouts,
opaque markers, redirects), plus the hardlink index the union keeps in its work directory (`overlay.Overlay`). Read
name by name it is not what the container saw, and a layer made from it must be, in OCI's terms, which have neither
redirects nor an index:
- a renamed lower directory (`trusted.overlay.redirect`) holds only what changed in it, its lower part lives under
  its old name: it is written whole, as the union shows it, and opaque;
- a lower file with several names, changed through one of them (copied up and joined through the index), shows the
  change under every name: each name is a change, all of them one file;
- a lower hardlink group with a name in a directory written whole keeps all its names together in the layer;
- the union's own xattrs (overlayfs markers, trusted.lamina.*) are bookkeeping, never content;
- a file kernel overlayfs copied up for its metadata only (`metacopy=on`: a chmod or chown, as the kernel driver
  mounts) holds no data in the upper: its content is the lower file's, at its redirect or its own path.
Every walk keeps its own stack, so trees as deep as the kernel allows are read.
"""
from __future__ import annotations

import os
import stat
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from store.dirtar import LayerTar, Member

from .layers import REDIRECT_XATTRS, DirLayer, Layer, Record
from .overlay import Node, Overlay

ADDED, CHANGED, DELETED = "A", "C", "D"
METACOPY_XATTR = "trusted.overlay.metacopy"


@dataclass(frozen=True, slots=True)
class Change:
    """One path the upper changes, lettered as `docker diff` does, with what a layer needs of it."""

    kind: str  # ADDED, CHANGED or DELETED
    path: str
    rec: Record | None = None  # the object as the union shows it; None for a deletion
    layer: Layer | None = None  # where its content, symlink target and xattrs are read, at `lpath`
    lpath: str = ""
    opaque: bool = False  # a directory hiding all that lower layers hold below it
    link: Hashable | None = None  # hardlinks: the same key on every name of one file
    data: tuple[Layer, str] | None = None  # where a metadata-only copy-up's content is read (else `layer`)

    def member(self) -> Member:
        """The change as a layer tar member (xattrs under the names a layer stores them by)."""
        r, layer = self.rec, self.layer
        assert r is not None and layer is not None, "a deletion is a whiteout, not a member"
        fmt = stat.S_IFMT(r.mode)
        xattrs = {}
        for n in layer.listxattr(self.lpath):  # the union's own are left out by the layer
            try:
                xattrs[n] = layer.getxattr(self.lpath, n)
            except OSError:
                pass
        return Member(self.path, r.mode, r.uid, r.gid, r.mtime_ns, r.size if fmt == stat.S_IFREG else 0, r.rdev,
                      layer.readlink(self.lpath) if fmt == stat.S_IFLNK else None, xattrs, self.link)

    def open(self) -> int:
        """A read-only fd on a regular file's content."""
        if self.data is not None:
            return self.data[0].open_read(self.data[1])
        assert self.layer is not None
        return self.layer.open_read(self.lpath)


def index_dir(work: str) -> str:
    """Where the union with work directory `work` joins lower hardlinks: `<ino hex>` files (see overlay.Overlay)."""
    return os.path.join(os.path.abspath(work), "index")


def _join(d: str, name: str) -> str:
    return d + name if d.endswith("/") else d + "/" + name


def _order(path: str) -> list[str]:
    return path.rstrip("/").split("/")  # component-wise: a directory, then all below it, then its next sibling


def changes(upper: str, lowers: Sequence[Layer], work: str | None = None) -> list[Change]:
    """The changes upper directory `upper` makes to `lowers` (topmost first), in tar order: the root first, a
    directory before what it holds, names sorted. `work`: the union's work directory, whose index joins lower
    hardlinks (lamina-fs's; None for kernel overlayfs, whose index, if any, is of another form)."""
    return _Reader(upper, lowers, work).run()


def write_layer(chs: Iterable[Change], out: BinaryIO) -> None:
    """`chs` as an OCI layer tar: deletions as `.wh.NAME`, opaque directories with `.wh..wh..opq`."""
    with LayerTar(out) as lt:
        for ch in chs:
            if ch.kind == DELETED:
                lt.whiteout(ch.path)
                continue
            lt.add(ch.member(), ch.open)
            if ch.opaque and ch.path != "/":
                lt.opaque(ch.path)


class _Reader:
    def __init__(self, upper: str, lowers: Sequence[Layer], work: str | None) -> None:
        self.up = DirLayer(upper, name="upper")
        # The union as the container shows it, read-only (which leaves the work dir alone: the container may run),
        # hence without the index, which `_shown` applies.
        self.view = Overlay([self.up, *lowers])
        self.base = Overlay(list(lowers)) if lowers else None
        self.index: DirLayer | None = None
        self.joined: set[int] = set()  # lower inode numbers with a copy in the index
        if work is not None:
            try:
                names = os.listdir(index_dir(work))
            except FileNotFoundError:
                names = []
            for n in names:
                try:
                    self.joined.add(int(n, 16))
                except ValueError:
                    pass
            if self.joined:
                self.index = DirLayer(index_dir(work), name="index")
        self.groups: set[int] = set()  # lower hardlink groups with a name in a directory written whole
        self.out: dict[str, Change] = {}

    def run(self) -> list[Change]:
        self._walk_upper()
        self._join_names()
        return [self.out[p] for p in sorted(self.out, key=_order)]

    def _in_base(self, path: str) -> bool:
        """Whether the lower layers hold `path` (asked top-down: its parent's answer is cached)."""
        return self.base is not None and self.base.resolve(path) is not None

    def _walk_upper(self) -> None:
        root = self.up.lookup("/")
        if root is None:
            raise FileNotFoundError(self.up.root)
        self.out["/"] = Change(CHANGED, "/", root, self.up, "/")
        todo = [("/", True)]  # upper directories to read, each with whether the lower layers hold it
        while todo:
            d, d_in_base = todo.pop()
            for name, _fmt, _ino, whiteout in self.up.listdir(d):
                path = _join(d, name)
                if whiteout:
                    self.out.setdefault(path, Change(DELETED, path))
                    continue
                rec = self.up.lookup(path)
                if rec is None:
                    continue
                in_base = d_in_base and self._in_base(path)
                kind = CHANGED if in_base else ADDED
                if rec.is_dir and rec.redirect and not rec.opaque:
                    self._whole(path, kind)
                elif rec.is_dir:
                    # kernel overlayfs marks every directory made in a merged one opaque: over nothing, it hides
                    # nothing, and the layer says only what changes
                    self.out[path] = Change(kind, path, rec, self.up, path, opaque=rec.opaque and in_base)
                    todo.append((path, in_base))
                else:
                    self.out[path] = Change(kind, path, rec, self.up, path,
                                            link=("disk", rec.ino) if rec.nlink > 1 else None,
                                            data=self._metacopy_data(path, rec))

    def _metacopy_data(self, path: str, rec: Record) -> tuple[Layer, str] | None:
        """Where the content of upper file `path` lives when overlayfs copied up only its metadata."""
        if not stat.S_ISREG(rec.mode) or self.base is None:
            return None
        real = self.up.real(path)
        try:
            if METACOPY_XATTR not in os.listxattr(real, follow_symlinks=False):
                return None
        except OSError:
            return None
        try:
            origin = os.fsdecode(os.getxattr(real, REDIRECT_XATTRS[0], follow_symlinks=False))
        except OSError:
            origin = path  # not renamed: the lower file at the same path
        if not origin.startswith("/"):
            origin = _join(path.rpartition("/")[0] or "/", origin)
        n = self.base.resolve(origin)
        if n is None or n.is_dir:
            raise OSError(f"{path}: metadata-only copy-up whose lower file {origin} is gone")
        return self.base.layers[n.layer], n.lpath

    def _whole(self, top: str, kind: str) -> None:
        """Renamed directory `top` as the union shows it, all below it included, opaque: its lower part lives under
        another name, which a layer cannot say."""
        n = self.view.resolve(top)
        if n is None or not n.is_dir:
            return
        self.out[top] = self._shown(top, n, kind, opaque=True)
        todo = [(top, kind == CHANGED)]
        while todo:
            d, d_in_base = todo.pop()
            for name, _fmt, _ino in self.view.readdir_entries(d):
                if name in (".", ".."):
                    continue
                path = _join(d, name)
                c = self.view.resolve(path)
                if c is None:
                    continue
                in_base = d_in_base and self._in_base(path)
                self.out[path] = self._shown(path, c, CHANGED if in_base else ADDED)
                if c.is_dir:
                    todo.append((path, in_base))

    def _shown(self, path: str, n: Node, kind: str, opaque: bool = False) -> Change:
        """What the container shows at `path` (`n`, resolved in the view) as a change."""
        r = n.rec
        if n.is_dir:
            return Change(kind, path, r, self.view.layers[n.layer], n.lpath, opaque)
        if n.layer == 0:
            return Change(kind, path, r, self.up, n.lpath, link=("disk", r.ino) if r.nlink > 1 else None)
        if r.nlink > 1 and r.ino in self.joined and self.index is not None:
            name = f"/{r.ino:x}"
            joined = self.index.lookup(name)
            if joined is not None:  # the union shows the copy another name's change made (upper and index: one fs)
                return Change(kind, path, joined, self.index, name, link=("disk", joined.ino))
        if r.nlink > 1:
            self.groups.add(r.ino)
        return Change(kind, path, r, self.view.layers[n.layer], n.lpath,
                      link=(n.layer, r.ino) if r.nlink > 1 else None)

    def _join_names(self) -> None:
        """The other names of files changed under one name (joined through the index) or written in a directory
        written whole: a layer holds a hardlinked file under all its names or it splits the file."""
        want = self.joined | self.groups
        if not want or self.base is None:
            return
        todo = ["/"]
        while todo:
            d = todo.pop()
            for name, fmt, ino in self.base.readdir_entries(d):
                if name in (".", ".."):
                    continue
                path = _join(d, name)
                if fmt == stat.S_IFDIR:
                    todo.append(path)
                    continue
                if ino not in want or path in self.out:
                    continue
                n = self.view.resolve(path)
                if n is None or n.is_dir or n.layer == 0 or n.rec.ino != ino:
                    continue  # deleted, replaced or moved in the container: not a name of the file there
                a = d
                while a != "/" and a not in self.out:  # its lower parents, as a copy-up would have made them
                    an = self.view.resolve(a)
                    if an is None:
                        break
                    self.out[a] = self._shown(a, an, CHANGED)
                    a = a.rpartition("/")[0] or "/"
                self.out[path] = self._shown(path, n, CHANGED)
