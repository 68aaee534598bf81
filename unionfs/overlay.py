"""The union itself: path resolution across layers, merged readdir, and every operation with overlayfs semantics.

`Overlay` is pure Python and knows nothing of FUSE: methods take union paths ("/" is the root), return plain values
and raise OSError with the errno the caller should see. Layer 0 is the upper directory when there is one; the rest
are read-only `layers.Layer`s, topmost first.

Design decisions (see docs/unionfs.md):
- Inode numbers: a directory reports the inode of its lowest layer, a non-directory the inode of the layer it sits
  in, except that a copied-up object keeps its origin's number (recorded in `trusted.overlay.lamina.origin`). All numbers
  come from the layers' own inodes, so they are stable across copy-up and remount without a database.
- Renaming a lower or merged directory works the way kernel overlayfs's `redirect_dir=on` does: only the directory
  itself is copied up and `trusted.overlay.redirect` records where its lower parts live.
- Hardlinked lower files stay joined after copy-up: the first copy-up also links the copy into the work dir's
  `index/` under the lower inode number, and later copy-ups of the other names link to it (kernel `index=on`).
- Namespace changes are serialised by one lock; lookups, reads and writes run concurrently. Directory stacks are
  cached in a bounded dict, dropped wholesale whenever a directory appears, disappears or moves; so are lower
  non-directories, each also forgotten on its own copy-up, whiteout or move.
"""
from __future__ import annotations

import ctypes
import errno
import itertools
import os
import resource
import shutil
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar

from . import copyup
from .idmap import IdMapping
from .layers import ORIGIN_XATTR, DirLayer, Layer, Record, xattr_from_layer, xattr_to_layer
from .upper import (RENAME_EXCHANGE, RENAME_NOREPLACE, RENAME_WHITEOUT, UpperWriter, clear_dir, fallback_name,
                    set_opaque_at)

_CACHE_MAX = 8192
_DIR_FDS = 128  # directory descriptors a layer keeps open at most (see _share_fds)
# Lower files resolved lately: a file is resolved again by the open that follows its lookup, rarely later (the kernel
# keeps its attributes), so a short memory serves; 8192 held ~4 MB of Nodes after a 100,000-file walk for nothing.
_FILES_MAX = 1024
# Handles of files served from memory are numbered from here: never an fd, nor a directory handle (fuse.py)
MEMORY_FH = 1 << 41
HIDDEN_PREFIX = ".fuse_hidden"
NLINK_XATTR = "trusted.lamina.nlink"
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
_OPEN_PASS = os.O_ACCMODE | os.O_APPEND | os.O_TRUNC | os.O_SYNC | os.O_DSYNC | os.O_NONBLOCK
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
T = TypeVar("T")


def _err(code: int, path: str | None = None) -> OSError:
    return OSError(code, os.strerror(code), path)


def _split(path: str) -> tuple[str, str]:
    head, _, name = path.rpartition("/")
    return (head or "/"), name


def _join(d: str, name: str) -> str:
    return d + name if d.endswith("/") else d + "/" + name


def redirect_target(redirect: str, lpath: str) -> str:
    """Where a directory at layer path `lpath` redirected to `redirect` has its lower parts, checked as kernel
    overlayfs checks it (ovl_get_redirect_xattr, then one lookup_one per component): an absolute path of non-empty
    components, or one sibling name; else EINVAL. A `.` or `..` component is EACCES: a redirect never leaves the
    layer stack's root."""
    if redirect.startswith("/"):
        names = redirect[1:].split("/")
    else:
        names = [redirect]
        if "/" in redirect:
            names = [""]
    if "" in names:
        raise _err(errno.EINVAL, lpath)
    if "." in names or ".." in names:
        raise _err(errno.EACCES, lpath)
    return redirect if redirect.startswith("/") else _join(_split(lpath)[0], redirect)


@dataclass(frozen=True, slots=True)
class Node:
    """A resolved union path: the topmost record and, for a directory, every layer part that merges into it."""

    rec: Record
    layer: int
    lpath: str
    stack: tuple[tuple[int, str], ...]
    ino: int

    @property
    def is_dir(self) -> bool:
        return self.rec.is_dir


@dataclass(slots=True)
class Handle:
    fd: int
    ino: int
    path: str
    upper: bool
    linked: bool = False  # a file with several names (each its own kernel inode)
    rec: Record | None = None  # a lower file's record (lower files never change)
    data: bytes | None = None  # a small lower file's whole content, served from memory (fd is then -1)


class Overlay:
    def __init__(self, lowers: list[Layer], upper: str | None = None, work: str | None = None,
                 idmap: IdMapping | None = None) -> None:
        if not lowers and upper is None:
            raise ValueError("at least one layer is needed")
        self.upper: DirLayer | None = None
        self.layers: list[Layer] = []
        if upper is not None:
            if work is None:
                raise ValueError("an upper directory needs a work directory")
            self.upper = DirLayer(upper, name="upper")
            self.layers.append(self.upper)
            self.w = UpperWriter(self.upper)
            self.work = os.path.join(os.path.abspath(work), "work")
            self.index = os.path.join(os.path.abspath(work), "index")
            for d in (self.work, self.index):
                os.makedirs(d, mode=0o700, exist_ok=True)
            clear_dir(self.work)  # leftovers of an interrupted copy-up or of files parked by a dead daemon
        self.layers.extend(lowers)
        self._nlayers = len(self.layers)
        self.idmap = idmap  # owners as stored <-> as the kernel sees them (uidmapping/gidmapping)
        if upper is not None:
            # hardlink groups joined on copy-up, addressed as "/<inode hex>"; never part of a directory stack
            self._index_layer = DirLayer(self.index, name="index")
            self._index_w = UpperWriter(self._index_layer)
            self.layers.append(self._index_layer)
        self._share_fds()
        self._mu = threading.RLock()
        self._cache: dict[str, Node] = {}
        # Non-directories that live in a lower layer: immutable until a copy-up, whiteout or move, each of which
        # forgets the path (and bumps the generation, so that a resolution racing it cannot store a stale node).
        self._files: dict[str, Node] = {}
        self._gen = 0
        self._cache_mu = threading.Lock()
        self.handles: dict[int, Handle] = {}
        self._memory_fhs = itertools.count(MEMORY_FH)
        self._handles_mu = threading.Lock()
        # Names seen for multiply-linked files, so that a change through one name can drop the kernel's cached
        # attributes and pages of the others (the FUSE high-level API gives each name its own kernel inode).
        self._peers: dict[int, set[str]] = {}
        self.notify: Callable[[list[str]], None] | None = None
        # Open files unlinked through the mount: libfuse renames them to ".fuse_hidden*" names (unless hard_remove)
        # and unlinks that name on the last close. Their data is parked in the work dir meanwhile, never in upper.
        # Keyed by name alone: libfuse makes hidden names unique per mount, and the directory may move meanwhile.
        self._hidden: dict[str, tuple[Layer, str, int]] = {}
        if upper is not None:
            self._parking = DirLayer(self.work, name="work")
            self._park_w = UpperWriter(self._parking)

    def _share_fds(self) -> None:
        """Bound the directory descriptors the layers keep open: a quarter of the open-file limit in all (a podman
        image may have 127 layers, and the daemon's own limit may be 1024), at most _DIR_FDS a layer."""
        trees = [layer.tree for layer in self.layers if isinstance(layer, DirLayer)]
        if trees:
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            budget = _DIR_FDS * len(trees) if soft == resource.RLIM_INFINITY else soft // 4
            for t in trees:
                t.most = max(4, min(_DIR_FDS, budget // len(trees)))

    # ---- resolution -------------------------------------------------------------------------------------------

    def _invalidate(self) -> None:
        with self._cache_mu:
            self._gen += 1
            self._cache.clear()
            self._files.clear()

    def _dir_changed(self, path: str) -> None:
        """A directory appeared or went at `path`: only it and its parent are known wrongly now (nothing visible
        lies below a new or an empty directory). Dropping every stack instead made each of `rm -rf`'s rmdirs
        resolve the next path from the root: quadratic in a deep tree."""
        with self._cache_mu:
            self._gen += 1
            self._cache.pop(path, None)
            self._cache.pop(_split(path)[0], None)

    def _renew(self, path: str) -> None:
        """The directory at `path` changed layers (a copy-up): resolve it afresh, its descendants stay known."""
        with self._cache_mu:
            self._gen += 1
            self._cache.pop(path, None)
        self._dir(path)

    def _forget(self, path: str) -> None:
        with self._cache_mu:
            self._gen += 1
            self._files.pop(path, None)

    def _gone(self, *paths: str) -> None:
        """Upper directories at `paths` were removed or moved: their cached descriptors name something else now, and
        so may what the upper layer remembers by path of which directories hold xattr whiteouts."""
        if self.upper is not None:
            for p in paths:
                self.upper.tree.forget(p)
            self.upper.forget_xwhiteouts()

    def _root(self) -> Node:
        parts: list[tuple[int, str, Record]] = []
        for li in range(self._nlayers):
            r = self.layers[li].lookup("/")
            if r is None or not r.is_dir:
                continue
            parts.append((li, "/", r))
            if r.opaque:
                break
        if not parts:
            raise _err(errno.EIO, "/")
        return Node(parts[0][2], parts[0][0], "/", tuple((li, p) for li, p, _ in parts), parts[-1][2].ino)

    def _dir(self, path: str) -> Node | None:
        n = self._cache.get(path)
        if n is not None:
            return n
        gen = self._gen
        if path == "/":
            n = self._root()
            self._keep(self._cache, path, n, gen)
            return n
        # from the nearest directory already known, down one component at a time (never recursively: the kernel
        # lets a tree grow far deeper than Python's stack)
        below: list[str] = []
        p = path
        while n is None:
            below.append(p)
            p = _split(p)[0]
            n = self._cache.get(p)
            if n is None and p == "/":
                n = self._root()
                self._keep(self._cache, p, n, gen)
        for p in reversed(below):
            name = _split(p)[1]
            c = None if name.startswith(HIDDEN_PREFIX) else self._child(n, name)
            if c is None or not c.is_dir:
                return None
            n = c
            self._keep(self._cache, p, n, gen)
        return n

    def _keep(self, cache: dict[str, Node], path: str, n: Node, gen: int, most: int = _CACHE_MAX) -> None:
        """Remember `n` in a bounded cache, unless the namespace changed since `gen` (n may be stale)."""
        with self._cache_mu:
            if gen == self._gen:
                if len(cache) >= most:
                    cache.pop(next(iter(cache)))
                cache[path] = n

    def resolve(self, path: str) -> Node | None:
        """The union's object at `path` with fresh attributes, or None."""
        if path == "/":
            return self._root()
        n = self._files.get(path)
        if n is not None:
            return n
        gen = self._gen
        head, name = _split(path)
        if name.startswith(HIDDEN_PREFIX):
            return self._resolve_hidden(path)
        parent = self._dir(head)
        if parent is None:
            return None
        n = self._child(parent, name)
        if n is not None and not n.is_dir and 0 <= n.layer < self._nlayers and not self._in_upper(n):
            self._keep(self._files, path, n, gen, _FILES_MAX)
        return n

    def _child(self, parent: Node, name: str) -> Node | None:
        todo = [(li, _join(lp, name)) for li, lp in parent.stack]
        found: list[tuple[int, str, Record]] = []
        k = 0
        while k < len(todo):
            li, cp = todo[k]
            k += 1
            r = self.layers[li].lookup(cp)
            if r is None:
                continue
            if r.whiteout:
                break
            if not r.is_dir:
                if found:
                    break
                if r.nlink > 1 and li != 0 and self.upper is not None:
                    joined = self._index_layer.lookup(f"/{r.ino:x}")
                    if joined is not None:  # another name of this file was copied up: show that copy
                        return Node(replace(joined, ino=r.ino), self._nlayers, f"/{r.ino:x}", ((li, cp),), r.ino)
                return Node(r, li, cp, ((li, cp),), self._file_ino(li, cp, r))
            found.append((li, cp, r))
            if r.opaque:
                break
            if r.redirect:
                target = redirect_target(r.redirect, cp)
                todo = todo[:k] + [(lj, target) for lj in range(li + 1, self._nlayers)]
        if not found:
            return None
        return Node(found[0][2], found[0][0], found[0][1], tuple((li, p) for li, p, _ in found), found[-1][2].ino)

    def _resolve_hidden(self, path: str) -> Node | None:
        h = self._hidden.get(_split(path)[1])
        if h is None:
            return None
        layer, lpath, ino = h
        r = layer.lookup(lpath)
        if r is None:
            return None
        return Node(r, -1, lpath, (), ino)

    def _hide(self, old: str, new: str) -> None:
        """libfuse hides an open file being unlinked: park it, then remove `old` from the union."""
        n = self._node(old)
        if n.is_dir:
            raise _err(errno.EISDIR, old)
        if self._in_upper(n):
            tmp = copyup.work_name(self.work)
            self.w.link_out(old, tmp)  # a second name keeps the inode (and its data) alive in the work dir
            self._hidden[_split(new)[1]] = (self._parking, "/" + os.path.basename(tmp), n.ino)
        else:
            self._hidden[_split(new)[1]] = (self.layers[n.layer], n.lpath, n.ino)
        self.unlink(old)

    def _file_ino(self, li: int, lpath: str, rec: Record) -> int:
        if li == 0 and self.upper is not None:
            try:
                v = copyup.decode_ino(self.upper.getxattr(lpath, ORIGIN_XATTR))
                if v is not None:
                    return v
            except OSError:
                pass
        return rec.ino

    def _node(self, path: str) -> Node:
        n = self.resolve(path)
        if n is None:
            raise _err(errno.ENOENT, path)
        return n

    def _in_upper(self, n: Node) -> bool:
        return self.upper is not None and n.layer == 0

    def _need_upper(self) -> UpperWriter:
        if self.upper is None:
            raise _err(errno.EROFS)
        return self.w

    def _lower_positive(self, path: str) -> bool:
        """Whether some lower layer still shows `path`, so that removing it needs a whiteout."""
        head, name = _split(path)
        parent = self._dir(head)
        if parent is None:
            return False
        for li, lp in parent.stack:
            if li == 0 and self.upper is not None:
                continue
            r = self.layers[li].lookup(_join(lp, name))
            if r is None:
                continue
            return not r.whiteout
        return False

    # ---- attributes -------------------------------------------------------------------------------------------

    def _note_peer(self, ino: int, path: str) -> None:
        peers = self._peers.get(ino)
        if peers is None:
            if len(self._peers) >= _CACHE_MAX:
                self._peers.pop(next(iter(self._peers)), None)
            peers = self._peers[ino] = set()
        if len(peers) < 64:
            peers.add(path)

    def changed(self, ino: int, but: str | None) -> None:
        """Tell the front end that every other known name of `ino` changed."""
        peers = self._peers.get(ino)
        if peers and self.notify is not None:
            others = [p for p in peers if p != but]
            if others:
                self.notify(others)

    def attrs(self, n: Node, path: str | None = None) -> dict:
        r = n.rec
        nlink = r.nlink
        if r.is_dir and len(n.stack) > 1:
            nlink = 1  # kernel overlayfs reports 1 for merged directories rather than counting subdirectories
        elif r.is_dir and n.layer >= 0:
            count = getattr(self.layers[n.layer], "dir_nlink", None)  # layers that do not store it count it
            if count is not None:
                nlink = count(n.lpath)
        elif not r.is_dir:
            nlink = self._group_nlink(n, nlink)
            if path is not None and (nlink > 1 or n.ino in self._peers):
                self._note_peer(n.ino, path)
        uid, gid = (r.uid, r.gid) if self.idmap is None else self.idmap.to_host(r.uid, r.gid)
        return {
            "st_mode": r.mode, "st_ino": n.ino, "st_nlink": nlink, "st_uid": uid, "st_gid": gid,
            "st_size": r.size, "st_atime": r.atime_ns, "st_mtime": r.mtime_ns, "st_ctime": r.ctime_ns,
            "st_rdev": r.rdev, "st_blocks": r.blocks, "st_blksize": 4096,
        }

    def _group_nlink(self, n: Node, nlink: int) -> int:
        """Link count of a hardlink group joined through the index, kept in the index file's xattr."""
        if self.upper is None or (n.layer != self._nlayers and (not self._in_upper(n) or n.ino == n.rec.ino)):
            return nlink
        try:
            return int(os.getxattr(self._index_path(n.ino), NLINK_XATTR))
        except (OSError, ValueError):
            return nlink

    def _adjust_group(self, n: Node, delta: int) -> None:
        if self.upper is None or n.is_dir:
            return
        idx = self._index_path(n.ino)
        try:
            v = int(os.getxattr(idx, NLINK_XATTR)) + delta
            os.setxattr(idx, NLINK_XATTR, str(max(v, 0)).encode())
        except (OSError, ValueError):
            pass

    def getattr(self, path: str | None, fh: int | None = None) -> dict:
        if fh is not None and fh in self.handles:
            h = self.handles[fh]
            if not h.upper:
                n = self.resolve(h.path)
                if n is not None and n.ino == h.ino:
                    return self.attrs(n)
                if h.rec is not None:  # gone from the union (unlinked, renamed) but still open
                    return self.attrs(Node(h.rec, 1, h.path, (), h.ino))
            st = os.fstat(h.fd)
            # the record keeps the file's own number, so that a copied-up lower hardlink (numbered after its origin)
            # counts its links from the index, as by path, not the index's own link
            rec = Record(st.st_mode, st.st_ino, st.st_nlink, st.st_uid, st.st_gid, st.st_size, st.st_atime_ns,
                         st.st_mtime_ns, st.st_ctime_ns, st.st_rdev, st.st_blocks)
            return self.attrs(Node(rec, 0 if h.upper else 1, h.path, (), h.ino))
        if path is None:
            raise _err(errno.EBADF)
        return self.attrs(self._node(path), path)

    def readdir_entries(self, path: str) -> list[tuple[str, int, int]]:
        """Every visible entry as (name, type bits, d_ino), '.' and '..' first.

        d_ino comes from the listing itself where it is already the entry's st_ino: a file or link of a lower layer
        (a hardlink joined through the index keeps its lower number too). It is 0 where the number takes a
        resolution: '.', '..', directories (numbered after their lowest layer) and upper entries (which may carry
        their origin's number); `child_attrs` gives those, and every entry's full attributes. A listing that only
        wants names and types (getdents without READDIRPLUS) thus costs no lookup per entry."""
        n = self._dir(path)
        if n is None:
            raise _err(errno.ENOTDIR if self.resolve(path) else errno.ENOENT, path)
        out = [(".", stat.S_IFDIR, 0), ("..", stat.S_IFDIR, 0)]
        seen: set[str] = set()
        for li, lp in n.stack:
            cheap = li != 0 or self.upper is None
            for name, fmt, ino, wh in self.layers[li].listdir(lp):
                if name not in seen:
                    seen.add(name)
                    if not wh:
                        out.append((name, fmt, ino if cheap and fmt != stat.S_IFDIR else 0))
        return out

    def readdir_names(self, path: str) -> list[str]:
        """Names of every visible entry, '.' and '..' first."""
        return [e[0] for e in self.readdir_entries(path)]

    def child_attrs(self, path: str, name: str) -> dict | None:
        """Full attributes of `name` in directory `path`, None if it vanished meanwhile."""
        n = self._dir(path)
        if n is None:
            return None
        if name == ".":
            return self.attrs(n)
        if name == "..":
            up = self._dir(_split(path)[0]) if path != "/" else n
            return {"st_mode": stat.S_IFDIR, "st_ino": (up or n).ino}
        c = self._child(n, name)
        return None if c is None else self.attrs(c, _join(path, name))

    def is_empty_dir(self, path: str) -> bool:
        return len(self.readdir_names(path)) == 2

    def _layer_of(self, path: str, n: Node) -> Layer:
        return self._hidden[_split(path)[1]][0] if n.layer == -1 else self.layers[n.layer]

    def readlink(self, path: str) -> str:
        n = self._node(path)
        if not stat.S_ISLNK(n.rec.mode):
            raise _err(errno.EINVAL, path)
        return self.layers[n.layer].readlink(n.lpath)

    def listxattr(self, path: str) -> list[str]:
        n = self._node(path)
        names = (xattr_from_layer(x) for x in self._layer_of(path, n).listxattr(n.lpath))
        return [x for x in names if x is not None]

    def getxattr(self, path: str, name: str) -> bytes:
        n = self._node(path)
        real = xattr_to_layer(name)
        if real is None:
            raise _err(errno.ENODATA, path)
        return self._layer_of(path, n).getxattr(n.lpath, real)

    def statfs(self, path: str) -> dict:
        sv = self.layers[0].statvfs()
        return {k: getattr(sv, k) for k in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                                            "f_ffree", "f_favail", "f_namemax")}

    def access(self, path: str, mode: int) -> None:
        n = self._node(path)
        if mode & os.W_OK and self.upper is None:
            raise _err(errno.EROFS, path)
        del n

    # ---- copy-up ----------------------------------------------------------------------------------------------

    def _index_path(self, ino: int) -> str:
        return f"{self.index}/{ino:x}"

    def copy_up(self, path: str, n: Node | None = None) -> str:
        """Make `path` exist in the upper directory (data included). Returns its upper path (`path` itself), or for
        a parked file (libfuse's hidden name of an unlinked open file) its absolute path in the work dir."""
        w = self._need_upper()
        if n is not None and n.layer == -1:
            layer, lpath, _ = self._hidden[_split(path)[1]]
            if layer is not self._parking:
                raise _err(errno.EROFS, path)
            return self._parking.real(lpath)
        if n is not None and self._in_upper(n):
            return path
        with self._mu:
            n = self._node(path)
            if self._in_upper(n):
                return path
            if path != "/":
                self._copy_up_parent(path)
            layer = self.layers[n.layer]
            if not n.is_dir and (n.rec.nlink > 1 or n.layer == self._nlayers):
                idx = self._index_path(n.ino)
                if os.path.lexists(idx):
                    with w.parent_times_kept(path):
                        w.link_in(idx, path)
                    self._invalidate()
                    self._follow_copy_up(n.ino, path)
                    return path
                tmp = copyup.build_copy(layer, n.lpath, n.rec, self.work, n.ino)
                try:
                    os.setxattr(tmp, NLINK_XATTR, str(n.rec.nlink).encode())
                    os.link(tmp, idx)
                except OSError:
                    pass
            else:
                tmp = copyup.build_copy(layer, n.lpath, n.rec, self.work, n.ino)
            try:
                with w.parent_times_kept(path):
                    w.move_in(tmp, path)
            except BaseException:
                copyup.discard(tmp)
                raise
            if n.is_dir:
                self._renew(path)  # its own stack gained the upper part; nothing below it is in the upper yet
            elif n.rec.nlink > 1:
                self._invalidate()  # a hardlink group's other names now show the copy too
            else:
                self._forget(path)
            if n.is_dir and self.notify is not None:
                self.notify([path])  # now a merged directory: its link count reads 1, as overlayfs reports it
            if not n.is_dir:
                self._follow_copy_up(n.ino, path)
            return path

    def _follow_copy_up(self, ino: int, path: str) -> None:
        """Files opened read-only before the copy-up read the copy from now on (as kernel overlayfs does)."""
        with self._handles_mu:  # a handle still in the table owns its fd number: no release can race the dup2
            for h in list(self.handles.values()):
                if h.ino == ino and not h.upper:
                    fd = self.w.open(path, os.O_RDONLY)
                    if h.fd < 0:  # served from memory until now
                        h.fd, h.data = fd, None
                    else:
                        try:
                            os.dup2(fd, h.fd)  # the kernel keeps using the same handle number
                        finally:
                            os.close(fd)
                    h.upper = True

    def _copy_up_parent(self, path: str) -> str:
        head, _ = _split(path)
        if head == "/":
            return head
        p = self._dir(head)
        if p is None:
            raise _err(errno.ENOENT, head)
        if not self._in_upper(p):
            # the ancestors missing from the upper, copied up from the top down: one at a time, never by recursion
            # (a tree may be far deeper than Python's stack)
            missing = []
            q = _split(head)[0]
            while q != "/":
                a = self._dir(q)
                if a is None:
                    raise _err(errno.ENOENT, q)
                if self._in_upper(a):
                    break
                missing.append(q)
                q = _split(q)[0]
            for q in reversed(missing):
                self.copy_up(q)
            p = self._dir(head)
            if p is None:
                raise _err(errno.ENOENT, head)
        return self.copy_up(head, p)

    # ---- creation ---------------------------------------------------------------------------------------------

    def _prepare_new(self, path: str) -> tuple[str, str | None]:
        """Parent copied up; returns the upper path and the whiteout that covers `path` there: "node" (a char 0/0
        or xattr whiteout in its place), "file" (a `.wh.` file beside it) or None. Nothing is removed here:
        `_place` replaces the whiteout once the new object exists, so that a failed creation leaves it."""
        w = self._need_upper()
        self._copy_up_parent(path)
        self._forget(path)
        try:
            st = w.lstat(path)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                return path, "node"
            if stat.S_ISREG(st.st_mode) and st.st_size == 0 and self.resolve(path) is None:
                return path, "node"  # an xattr whiteout
        except FileNotFoundError:
            pass
        wh = fallback_name(path)
        if wh is not None:
            try:
                w.lstat(wh)
                return path, "file"
            except FileNotFoundError:
                pass
        return path, None

    def _place(self, real: str, over: str | None, make: Callable[[int, str], T], new_inode: bool = True) -> T:
        """Create an object by `make(dirfd, name)` at upper path `real`, over the whiteout `_prepare_new` found.
        Over one in its place the object is made in the work dir and then renamed over it (a directory: exchanged
        with it, the whiteout then removed), as kernel overlayfs does: a failure anywhere leaves the whiteout."""
        w = self.w
        if over != "node":
            with w.at(real) as (d, name):
                r = make(d, name)
            if over == "file":
                w.clear_fallback_whiteout(real)
            return r
        tmp = copyup.work_name(self.work)
        r = make(self._parking.tree.root.fd, os.path.basename(tmp))
        try:
            st = os.lstat(tmp)
            is_dir = stat.S_ISDIR(st.st_mode)
            pst = w.lstat(_split(real)[0])
            if new_inode and pst.st_mode & stat.S_ISGID:
                # the work dir has no set-group-ID bit: apply what creating in place would have done
                os.chown(tmp, -1, pst.st_gid, follow_symlinks=False)
                if is_dir:
                    os.chmod(tmp, stat.S_IMODE(st.st_mode) | stat.S_ISGID)
            w.move_in(tmp, real, RENAME_EXCHANGE if is_dir else 0)
        except BaseException:
            if new_inode and os.path.isdir(tmp) and not os.path.islink(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                os.unlink(tmp)
            raise
        if is_dir:
            os.unlink(tmp)  # the whiteout, exchanged out
        return r

    def _own(self, real: str, owner: tuple[int, int], fd: int | None = None) -> None:
        """Give a new object at upper path `real` the caller's owner (the kernel's ids, stored as their container
        ids)."""
        uid, gid = owner if self.idmap is None else self.idmap.to_container(*owner)
        parent_mode = self.w.lstat(_split(real)[0]).st_mode
        if parent_mode & stat.S_ISGID:
            gid = -1  # the filesystem already gave it the directory's group
        if fd is not None:
            os.fchown(fd, uid, gid)
        else:
            self.w.chown(real, uid, gid)

    def _exists(self, path: str) -> None:
        if self.resolve(path) is not None:
            raise _err(errno.EEXIST, path)

    def create(self, path: str, mode: int, flags: int, owner: tuple[int, int]) -> int:
        with self._mu:
            if self.resolve(path) is not None:
                if flags & os.O_EXCL:
                    raise _err(errno.EEXIST, path)
                return self.open(path, flags)
            real, over = self._prepare_new(path)
            fds: list[int] = []

            def make(d: int, name: str) -> int:
                fds.append(os.open(name, (flags & _OPEN_PASS) | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                   stat.S_IMODE(mode), dir_fd=d))
                return fds[0]
            try:
                fd = self._place(real, over, make)
                self._own(real, owner, fd)
                ino = os.fstat(fd).st_ino
            except BaseException:
                for fd in fds:
                    os.close(fd)
                raise
        self.handles[fd] = Handle(fd, ino, path, True)
        return fd

    def mknod(self, path: str, mode: int, rdev: int, owner: tuple[int, int]) -> None:
        with self._mu:
            self._exists(path)
            real, over = self._prepare_new(path)

            def make(d: int, name: str) -> None:
                if stat.S_ISREG(mode) or stat.S_IFMT(mode) == 0:
                    os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                     stat.S_IMODE(mode), dir_fd=d))
                else:
                    os.mknod(name, mode, rdev, dir_fd=d)
            self._place(real, over, make)
            self._own(real, owner)

    def mkdir(self, path: str, mode: int, owner: tuple[int, int]) -> None:
        with self._mu:
            self._exists(path)
            real, over = self._prepare_new(path)

            def make(d: int, name: str) -> None:
                os.mkdir(name, stat.S_IMODE(mode), dir_fd=d)
                if over is not None:  # over a whiteout: nothing below may show through
                    try:
                        set_opaque_at(self.w.xattr_path(d, name))
                    except BaseException:
                        shutil.rmtree(self.w.xattr_path(d, name), ignore_errors=True)
                        raise
            self._place(real, over, make)
            self._own(real, owner)
            self._dir_changed(path)

    def symlink(self, path: str, target: str, owner: tuple[int, int]) -> None:
        with self._mu:
            self._exists(path)
            real, over = self._prepare_new(path)
            self._place(real, over, lambda d, name: os.symlink(target, name, dir_fd=d))
            self._own(real, owner)

    def link(self, src: str, dst: str) -> None:
        with self._mu:
            n = self._node(src)
            if n.is_dir:
                raise _err(errno.EPERM, src)
            self._exists(dst)
            sreal = self.copy_up(src, n)
            real, over = self._prepare_new(dst)

            def make(d: int, name: str) -> None:
                if n.layer == -1:  # a parked file (its copy_up is its work dir path)
                    os.link(sreal, name, dst_dir_fd=d, follow_symlinks=False)
                    return
                with self.w.at(sreal) as (sd, sname):
                    os.link(sname, name, src_dir_fd=sd, dst_dir_fd=d, follow_symlinks=False)
            self._place(real, over, make, new_inode=False)
            self._adjust_group(n, +1)
            self._note_peer(n.ino, src)
            self._note_peer(n.ino, dst)
        self.changed(n.ino, dst)

    # ---- removal ----------------------------------------------------------------------------------------------

    def _whiteout_over(self, real: str, is_dir: bool = False) -> None:
        """Replace the object at upper path `real` (a non-directory, or a logically empty directory) by a whiteout
        such that a failure leaves one of the two in place: the whiteout is made in the work dir and renamed over
        the object or, for a directory, exchanged with it and the directory then removed (kernel overlayfs's way);
        a `.wh.` file is made before the object goes."""
        w = self.w
        tmp = copyup.work_name(self.work)
        made = False
        if w.mknod_ok:
            try:
                os.mknod(tmp, stat.S_IFCHR, os.makedev(0, 0))
                made = True
            except PermissionError:
                w.mknod_ok = False
        if not made:
            if fallback_name(real) is not None:
                w.make_whiteout_at(real)
                w.remove_tree(real)
                return
            w.make_xattr_whiteout(real, tmp)
        try:
            w.move_in(tmp, real, RENAME_EXCHANGE if is_dir else 0)
        except BaseException:
            os.unlink(tmp)
            raise
        if is_dir:
            shutil.rmtree(tmp)  # the directory, exchanged out: empty but for whiteouts and markers

    def unlink(self, path: str) -> None:
        if _split(path)[1] in self._hidden:
            layer, lpath, _ = self._hidden.pop(_split(path)[1])
            if layer is self._parking:
                os.unlink(self._parking.real(lpath))
            return
        with self._mu:
            w = self._need_upper()
            n = self._node(path)
            if n.is_dir:
                raise _err(errno.EISDIR, path)
            if not self._in_upper(n) and (n.rec.nlink > 1 or n.layer == self._nlayers):
                # one name of a lower hardlink group goes: join the group through the index first, so that the
                # other names' link count drops (kernel overlayfs with index=on does the same)
                self.copy_up(path, n)
                n = self._node(path)
            lower = self._lower_positive(path)
            real = path
            self._adjust_group(n, -1)
            if self._in_upper(n):
                if lower:
                    self._whiteout_over(real)
                else:
                    w.unlink(real)
            else:
                self._copy_up_parent(path)
                w.make_whiteout_at(real)
            self._forget(path)
        peers = self._peers.get(n.ino)
        if peers:
            peers.discard(path)
            self.changed(n.ino, path)

    def rmdir(self, path: str) -> None:
        with self._mu:
            w = self._need_upper()
            if path == "/":
                raise _err(errno.EBUSY, path)
            n = self._node(path)
            if not n.is_dir:
                raise _err(errno.ENOTDIR, path)
            if not self.is_empty_dir(path):
                raise _err(errno.ENOTEMPTY, path)
            lower = self._lower_positive(path)
            real = path
            try:
                if self._in_upper(n) and lower:
                    self._whiteout_over(real, is_dir=True)
                elif self._in_upper(n):
                    w.clear_dir(real)
                    w.rmdir(real)
                else:
                    self._copy_up_parent(path)
                    if lower:
                        w.make_whiteout_at(real)
            finally:
                self._gone(path)  # (exchanged out, the directory may have gone even where a later step failed)
            self._dir_changed(path)

    # ---- rename -----------------------------------------------------------------------------------------------

    def _has_lower(self, n: Node) -> bool:
        return any(li != 0 or self.upper is None for li, _ in n.stack)

    def _prepare_move(self, path: str, n: Node) -> str:
        """Copy up what moves: a whole non-directory, or only a directory itself plus a redirect to its lower part."""
        real = self.copy_up(path, n)
        if n.is_dir and self._has_lower(n):
            lowers = [lp for li, lp in n.stack if li != 0]
            self.w.set_redirect(real, lowers[0])
        return real

    def _set_opaque_if_needed(self, n: Node, new_path: str, real: str) -> None:
        """kernel overlayfs rule: a pure-upper directory moved into a merged directory becomes opaque."""
        if not n.is_dir or self._has_lower(n) or n.rec.opaque:
            return
        head, _ = _split(new_path)
        parent = self._dir(head)
        if parent is not None and len(parent.stack) > 1:
            self.w.set_opaque(real)

    def rename(self, old: str, new: str, flags: int = 0) -> None:
        if new.rpartition("/")[2].startswith(HIDDEN_PREFIX) and flags == 0:
            with self._mu:
                self._hide(old, new)
            return
        with self._mu:
            try:
                lost = self._rename(old, new, flags)
            finally:
                self._invalidate()
                self._gone(old, new)
        if lost is not None:
            self.changed(lost, new)

    def _rename(self, old: str, new: str, flags: int) -> int | None:
        """Returns the inode of a non-directory the rename replaced, if any."""
        w = self._need_upper()
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == RENAME_NOREPLACE | RENAME_EXCHANGE:
            raise _err(errno.EINVAL)
        src = self._node(old)
        dst = self.resolve(new)
        if flags & RENAME_EXCHANGE:
            if dst is None:
                raise _err(errno.ENOENT, new)
            if dst.ino == src.ino and not src.is_dir:
                return None  # two names of one file trade places: nothing changes (the VFS's own rule)
        elif dst is not None:
            if flags & RENAME_NOREPLACE:
                raise _err(errno.EEXIST, new)
            if src.is_dir and not dst.is_dir:
                raise _err(errno.ENOTDIR, new)
            if dst.is_dir and not src.is_dir:
                raise _err(errno.EISDIR, new)
            if dst.ino == src.ino and not src.is_dir:
                return  # two names of one file: POSIX says do nothing
            if dst.is_dir and not self.is_empty_dir(new):
                raise _err(errno.ENOTEMPTY, new)
        if old == new:
            return
        if flags & RENAME_EXCHANGE:
            sreal = self._prepare_move(old, src)
            dreal = self._prepare_move(new, dst)
            w.rename(sreal, dreal, RENAME_EXCHANGE)
            self._invalidate()
            self._set_opaque_if_needed(src, new, dreal)
            self._set_opaque_if_needed(dst, old, sreal)
            return
        if dst is not None and not dst.is_dir and not self._in_upper(dst) and \
                (dst.rec.nlink > 1 or dst.layer == self._nlayers):
            self.copy_up(new, dst)  # a lower hardlink loses a name: join its group first, as unlink does
            dst = self._node(new)
        old_lower = self._lower_positive(old)
        sreal = self._prepare_move(old, src)
        self._copy_up_parent(new)
        dreal = new
        swap = False
        if dst is not None and self._in_upper(dst) and dst.is_dir:
            w.clear_dir(dreal)
        elif src.is_dir and dst is None:
            try:
                swap = not stat.S_ISDIR(w.lstat(dreal).st_mode)  # a whiteout where the directory goes
            except FileNotFoundError:
                pass
        if swap:
            # exchanged rather than removed first, so that a failure leaves the whiteout (kernel overlayfs's way)
            w.rename(sreal, dreal, RENAME_EXCHANGE)
            if old_lower and stat.S_ISCHR(w.lstat(sreal).st_mode):
                old_lower = False  # that whiteout now covers the old name
            else:
                w.unlink(sreal)
        elif old_lower and w.mknod_ok:
            try:
                w.rename(sreal, dreal, RENAME_WHITEOUT)
                old_lower = False
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.EPERM, errno.ENOTDIR, errno.EISDIR):
                    raise
                w.rename(sreal, dreal)
        else:
            w.rename(sreal, dreal)
        w.clear_fallback_whiteout(dreal)
        if dst is not None and not dst.is_dir:
            self._adjust_group(dst, -1)
        if old_lower:
            w.make_whiteout_at(sreal)
        self._invalidate()
        self._set_opaque_if_needed(src, new, dreal)
        return dst.ino if dst is not None and not dst.is_dir else None

    # ---- metadata changes -------------------------------------------------------------------------------------

    def _copy_up_for_change(self, path: str, n: Node | None = None) -> tuple[UpperWriter, str]:
        """Where a change of `path` lands: the upper (copied up first), or the work dir for a parked file."""
        n = n or self._node(path)
        if n.layer == -1:
            layer, lpath, _ = self._hidden[_split(path)[1]]
            if layer is not self._parking:
                raise _err(errno.EROFS, path)
            return self._park_w, lpath
        real = self.copy_up(path, n)
        if not n.is_dir:
            self.changed(n.ino, path)
        return self.w, real

    def chmod(self, path: str, mode: int) -> None:
        w, real = self._copy_up_for_change(path)
        w.chmod(real, stat.S_IMODE(mode))

    def chown(self, path: str, uid: int, gid: int) -> None:
        if self.idmap is not None:
            uid, gid = self.idmap.to_container(uid, gid)
        w, real = self._copy_up_for_change(path)
        w.chown(real, uid, gid)

    def utimens(self, path: str, times: tuple[int, int] | None) -> None:
        w, real = self._copy_up_for_change(path)
        if times is None:
            w.utime(real, None)
            return
        st = w.lstat(real)
        now = time.time_ns()
        pick = []
        for v, cur in zip(times, (st.st_atime_ns, st.st_mtime_ns)):
            pick.append(now if v == UTIME_NOW else cur if v == UTIME_OMIT else v)
        w.utime(real, (pick[0], pick[1]))

    def _xattr_target(self, path: str, n: Node) -> tuple[UpperWriter, str]:
        """Where an xattr change lands: a name shown through the hardlink index changes the index file itself
        without getting a name in the upper dir (what kernel overlayfs with index=on does for xattrs)."""
        if n.layer == self._nlayers:
            self.changed(n.ino, path)
            return self._index_w, f"/{n.ino:x}"
        return self._copy_up_for_change(path, n)

    def setxattr(self, path: str, name: str, value: bytes, flags: int) -> None:
        stored = xattr_to_layer(name)
        if stored is None:
            raise _err(errno.EPERM, path)
        w, real = self._xattr_target(path, self._node(path))
        w.setxattr(real, stored, value, flags)

    def removexattr(self, path: str, name: str) -> None:
        stored = xattr_to_layer(name)
        if stored is None:
            raise _err(errno.ENODATA, path)
        n = self._node(path)
        self._layer_of(path, n).getxattr(n.lpath, stored)  # ENODATA before any copy-up, as the kernel does
        w, real = self._xattr_target(path, n)
        w.removexattr(real, stored)

    # ---- file data --------------------------------------------------------------------------------------------

    def open(self, path: str, flags: int) -> int:
        n = self._node(path)
        writing = (flags & os.O_ACCMODE) != os.O_RDONLY or flags & os.O_TRUNC
        if n.layer == -1:
            layer, lpath, _ = self._hidden[_split(path)[1]]
            if writing:
                w, p = self._copy_up_for_change(path, n)  # (EROFS for a parked lower file)
                fd = w.open(p, flags & _OPEN_PASS)
            else:
                fd = layer.open_read(lpath)
            self.handles[fd] = Handle(fd, n.ino, path, True, n.rec.nlink > 1)
            return fd
        linked = n.rec.nlink > 1 or n.ino in self._peers
        if writing or self._in_upper(n):
            real = self.copy_up(path, n) if writing else n.lpath
            fd = self.w.open(real, flags & _OPEN_PASS)
            self.handles[fd] = Handle(fd, n.ino, path, True, linked)
            if flags & os.O_TRUNC and n.ino in self._peers:
                self.changed(n.ino, path)  # truncated: the other names' cached sizes and pages are stale
            return fd
        layer = self.layers[n.layer]
        small = getattr(layer, "read_small", None)
        data = small(n.lpath) if small is not None else None
        if data is not None:
            # no file to open: an inlined store content is read once and served from memory while open
            fh = next(self._memory_fhs)
            self.handles[fh] = Handle(-1, n.ino, path, False, linked, n.rec, data)
            return fh
        fd = layer.open_read(n.lpath)
        self.handles[fd] = Handle(fd, n.ino, path, False, linked, n.rec)
        return fd

    def read(self, fh: int, size: int, offset: int) -> bytes:
        if fh < MEMORY_FH:
            return os.pread(fh, size, offset)
        h = self.handles[fh]
        if h.data is None:  # copied up meanwhile: it reads the copy now
            return os.pread(h.fd, size, offset)
        return h.data[offset:offset + size]

    def write(self, fh: int, data: bytes, offset: int) -> int:
        n = os.pwrite(fh, data, offset)
        h = self.handles.get(fh)
        if h is not None and h.ino in self._peers:
            self.changed(h.ino, h.path)
        return n

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> None:
        h = self.handles.get(fh) if fh is not None else None
        if h is not None and h.upper:
            os.ftruncate(h.fd, length)
            self.changed(h.ino, h.path)
            return
        if path is None:
            raise _err(errno.EBADF)
        w, real = self._copy_up_for_change(path)
        w.truncate(real, length)

    def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        if _libc.fallocate(fh, mode, offset, length) != 0:
            e = ctypes.get_errno()
            raise _err(e)

    def _fd(self, fh: int) -> int:
        """The open file behind handle `fh` (-1 for one served from memory)."""
        return fh if fh < MEMORY_FH else self.handles[fh].fd

    def flush(self, fh: int) -> None:
        fd = self._fd(fh)
        if fd >= 0:
            os.close(os.dup(fd))

    def fsync(self, fh: int, datasync: bool) -> None:
        fd = self._fd(fh)
        if fd >= 0:
            (os.fdatasync if datasync else os.fsync)(fd)

    def release(self, fh: int) -> None:
        with self._handles_mu:
            h = self.handles.pop(fh, None)
            fd = fh if fh < MEMORY_FH else -1 if h is None else h.fd
            if fd >= 0:
                os.close(fd)
