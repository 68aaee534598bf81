"""The kernel driver: store images mounted by kernel overlayfs, from per-layer metadata trees and the store's objects.

Each layer gets a metadata tree (store/derived.py's `derived/<DiffID hex>/kernel/tree`), written by lamina from its
own index and never from an image's files: directories, symlinks, devices, fifos, whiteouts as char 0/0, opaque
directories as `trusted.overlay.opaque=y`, owners, modes, nanosecond mtimes, xattrs, hardlink groups as hardlinks;
contents of up to 4 KiB (inlined in the index) written in full; larger regular files as sparse stubs of their size
carrying `trusted.overlay.metacopy` and `trusted.overlay.redirect=/ab/cdef…`, which overlayfs (Linux 6.5+: data-only
lower layers, `lowerdir=T2:T1::OBJECTS`) follows into the store's `objects/` directory. So the page cache and the
file-level dedup of `objects/` are shared by every image and container, with no daemon.

Security: the index names xattrs as a layer directory stores them (as `layers.DirLayer` reads them): an image's own
`trusted.overlay.X` is `trusted.overlay.overlay.X` there, written as such, which overlayfs (6.7+) shows as
`trusted.overlay.X` and never interprets; unescaped union bookkeeping names (`trusted.overlay.redirect`,
`…metacopy`, `user.overlay.*`, `trusted.lamina.*`) are never shown by the FUSE driver and are never written, so no
image can plant a redirect, metacopy or whiteout marker. The only redirects are lamina's, to object names.

A plain directory tree, not an EROFS image per layer as composefs uses: mkfs.erofs is not on this host's package
set, a tree needs no loop device (it works in any mount namespace that can mount overlayfs), and it is built at
the rate measured in docs/unionfs.md.
"""
from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path

from store import derived
from store.reader import StoreReader
from store.root import Store

from .layers import ESCAPED_PREFIX, is_private_xattr

KIND = "kernel"
TREE = "tree"  # the lowerdir inside the published derived directory (beside its `complete` marker)
METACOPY = "trusted.overlay.metacopy"
REDIRECT = "trusted.overlay.redirect"
OPAQUE = "trusted.overlay.opaque"
# Mount options the trees need: metacopy stubs, absolute redirects into the data-only layer; no index (lamina's
# upper readers take a work dir's index for lamina-fs's own), no xino (inode numbers stay the real ones).
MOUNT_OPTS = "metacopy=on,redirect_dir=on,index=off"
# Set to "0" to make the probe report no support (to exercise `--driver auto`'s fallback where the kernel has it).
PROBE_ENV = "LAMINA_KERNEL_OVERLAY"


def tree_path(store: Store, diff_id: str) -> Path:
    return derived.path(store, diff_id, KIND) / TREE


def ensure_trees(store: Store, reader: StoreReader, layer_ids: list[int], diff_ids: list[str]) -> list[str]:
    """The metadata trees of the layers (same order), building the missing ones under the store's shared lock
    (gc, which removes trees, takes it exclusively)."""
    out = []
    with store.shared():
        for lid, diff_id in zip(layer_ids, diff_ids):
            final = derived.path(store, diff_id, KIND)
            if not derived.is_complete(final):
                tmp = derived.staging(store, diff_id, KIND)
                n = build(reader, lid, str(tmp / TREE))
                _syncfs(str(tmp))
                derived.publish(tmp, final, json.dumps({"entries": n}))
            out.append(str(final / TREE))
    return out


def _syncfs(path: str) -> None:
    from store.objects import syncfs  # noqa: PLC0415

    syncfs(path)


def _xattrs(p: str, raw: str | None) -> None:
    if not raw:
        return
    for name, value in json.loads(raw).items():
        # Escaped names are the image's own; other union bookkeeping names are never content (module docstring).
        if name.startswith(ESCAPED_PREFIX) or not is_private_xattr(name):
            os.setxattr(p, name, bytes.fromhex(value), follow_symlinks=False)


def build(reader: StoreReader, layer_id: int, dst: str) -> int:
    """Writes the metadata tree of layer `layer_id` at `dst` (which must not exist); returns its entry count."""
    rows = reader.layer_rows(layer_id)
    old_umask = os.umask(0)
    try:
        return _build(rows, dst)
    finally:
        os.umask(old_umask)


def _build(rows: list[tuple], dst: str) -> int:
    lchown, utime, mknod, setxattr = os.lchown, os.utime, os.mknod, os.setxattr
    dirs: list[tuple[str, int]] = []  # (path, mtime): set after their contents are written
    first: dict[int, str] = {}  # ino of a hardlink group's first entry -> its path
    links: list[tuple[str, int, int]] = []  # (path, link_ino, mtime)
    made = {"", "/"}  # directories written so far, by layer path: only these take entries
    os.mkdir(dst, 0o700)
    for parent, name, kind, mode, uid, gid, mtime, size, obj, linkname, rdev, ino, link_ino, xattrs, opaque, data \
            in rows:
        # Never through a symlink or out of the tree: an entry whose parent is not a directory of the layer is
        # unreachable in the union anyway (as the FUSE driver resolves it).
        if parent not in made or (parent and (name in ("", ".", "..") or "/" in name)):
            continue
        lpath = parent + "/" + name if parent not in ("", "/") else "/" + name if parent else ""
        p = dst + lpath
        perm = stat.S_IMODE(mode)
        if link_ino is not None:
            links.append((p, link_ino, mtime))
            continue
        if kind == "d":
            if parent != "":
                os.mkdir(p, perm)
                made.add(lpath)
            lchown(p, uid, gid)
            os.chmod(p, perm)  # the root's, and setgid bits a chown cleared
            if opaque:
                setxattr(p, OPAQUE, b"y")
            _xattrs(p, xattrs)
            dirs.append((p, mtime))
            continue
        if kind == "f":
            if size and data is None:  # file-backed: a stub whose data overlayfs takes from objects/
                mknod(p, stat.S_IFREG | perm)
                os.truncate(p, size)
                setxattr(p, METACOPY, b"")
                setxattr(p, REDIRECT, f"/{obj[:2]}/{obj[2:]}".encode())
            else:
                fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, perm)
                try:
                    if data:
                        os.write(fd, data)
                finally:
                    os.close(fd)
        elif kind == "l":
            os.symlink(linkname, p)
        elif kind == "w":
            mknod(p, stat.S_IFCHR, 0)
        else:  # c, b, p: the full st_mode carries the type
            mknod(p, mode, rdev)
        lchown(p, uid, gid)
        if perm & 0o6000 and kind != "l":
            os.chmod(p, perm)  # chown clears setuid/setgid
        _xattrs(p, xattrs)
        utime(p, ns=(mtime, mtime), follow_symlinks=False)
        first[ino] = p
    for p, link_ino, mtime in links:
        if link_ino not in first:
            raise OSError(f"layer index damaged: {p[len(dst):]} is a hardlink to a missing entry (lamina fsck)")
        os.link(first[link_ino], p, follow_symlinks=False)
    for p, mtime in reversed(dirs):  # children before parents: creating a name changes its directory's mtime
        utime(p, ns=(mtime, mtime))
    return len(rows)


def supported() -> bool:
    """Whether this kernel mounts a metacopy stub redirecting into a data-only lower layer and reads its data
    through it (Linux 6.5+). Probed for real in the system's temporary directory, never in the store, whose tmp/
    recovery may empty at any time (a store on a filesystem without trusted xattrs fails the tree build instead)."""
    if os.environ.get(PROBE_ENV) == "0":
        return False
    from .kernelmount import mount_overlay, umount  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="lamina-kprobe-") as d:
        meta, data, mnt = d + "/meta", d + "/data", d + "/mnt"
        for x in (meta, data + "/ab", mnt):
            os.makedirs(x)
        try:
            with open(data + "/ab/cd", "wb") as f:
                f.write(b"lamina")
            open(meta + "/f", "wb").close()
            os.truncate(meta + "/f", 6)
            os.setxattr(meta + "/f", METACOPY, b"")
            os.setxattr(meta + "/f", REDIRECT, b"/ab/cd")
            mount_overlay([meta], data, mnt, None, None, read_only=True)
        except OSError:
            return False
        try:
            with open(mnt + "/f", "rb") as f:
                return f.read() == b"lamina"
        except OSError:
            return False
        finally:
            umount(mnt)
