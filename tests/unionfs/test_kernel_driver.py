"""`lamina mount --driver kernel`: kernel overlayfs over per-layer metadata trees and the store's objects.

The FUSE driver is the oracle: every path of an image (and of a container after the same operations, and the
image committed from it) must read the same through both drivers."""
from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from fsharness import BIN, docker_archive, is_mounted, lamina, make_layers
from store.reader import open_store
from unionfs.changes import changes, write_layer
from unionfs.storelayer import StoreLayer

from tests.trees import assert_same_tree, snapshot

HARDLINK_CONTENT = b"L" * 9000


def _rich_layers(base: Path) -> list[Path]:
    """make_layers' three layers plus a fourth on top: hardlinks (large and small), devices, a fifo, setuid, owners,
    ns times, an xattr on a symlink, large files, and hostile overlayfs xattrs an image may carry."""
    base.mkdir()
    lowers = make_layers(base)
    top = base / "l-top"
    (top / "big").mkdir(parents=True)
    (top / "big" / "one").write_bytes(os.urandom(100_000))
    (top / "big" / "h1").write_bytes(HARDLINK_CONTENT)
    os.link(top / "big" / "h1", top / "big" / "h2")
    (top / "s1").write_text("small linked\n")
    os.link(top / "s1", top / "big" / "s2")
    os.mknod(top / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(top / "blk", stat.S_IFBLK | 0o600, os.makedev(7, 9))
    os.mkfifo(top / "fifo", 0o640)
    (top / "suid").write_bytes(b"#!/bin/sh\n" + b"x" * 5000)
    os.chown(top / "suid", 0, 0)
    os.chmod(top / "suid", 0o4755)
    (top / "owned").write_text("owned\n")
    os.chown(top / "owned", 1234, 5678)
    os.symlink("big/one", top / "ln")
    os.setxattr(top / "ln", "trusted.note", b"on a symlink", follow_symlinks=False)
    (top / "evil").write_bytes(b"E" * 6000)  # an image trying to point a file elsewhere
    os.setxattr(top / "evil", "trusted.overlay.redirect", b"/big/one")
    os.setxattr(top / "evil", "trusted.overlay.metacopy", b"")
    (top / "escaped").write_bytes(b"S" * 6000)  # an image's own overlay xattr, as a nested overlay stores it
    os.setxattr(top / "escaped", "trusted.overlay.overlay.redirect", b"/big/one")
    (top / "evildir").mkdir()
    os.setxattr(top / "evildir", "trusted.overlay.redirect", b"/d")
    for i, p in enumerate(sorted(top.rglob("*"))):
        if not p.is_symlink():
            os.utime(p, ns=(1_600_000_000_123_456_789 + i, 1_600_000_000_123_456_789 + i))
    return [top, *lowers]


@pytest.fixture
def rich_image(scratch):
    root = scratch / "store"
    lamina(root, "import", docker_archive(_rich_layers(scratch / "layers"), scratch / "img.tar", "k:test"))
    return root, "k:test"


def _mount(root: Path, image: str, mnt: Path, driver: str, *extra) -> subprocess.CompletedProcess:
    mnt.mkdir(exist_ok=True)
    p = lamina(root, "mount", "--driver", driver, image, mnt, *extra)
    assert is_mounted(mnt)
    return p


def _both(root: Path, image: str, scratch: Path, *extra, kernel_extra=(), fuse_extra=()):
    """Mounts the image with each driver (kernel at scratch/k, FUSE at scratch/f)."""
    _mount(root, image, scratch / "k", "kernel", *extra, *kernel_extra)
    _mount(root, image, scratch / "f", "fuse", *extra, *fuse_extra)
    return scratch / "k", scratch / "f"


def _umount(root: Path, *mnts: Path) -> None:
    for m in mnts:
        if is_mounted(m):
            lamina(root, "umount", m)
        assert not is_mounted(m)


def test_kernel_mount_shows_what_fuse_shows(scratch, rich_image):
    root, image = rich_image
    k, f = _both(root, image, scratch, "--read-only")
    try:
        assert_same_tree(snapshot(str(k)), snapshot(str(f)))
        assert any(os.path.samefile(k / "big" / "h1", k / n) for n in ("big/h2",))
        assert (k / "big" / "h1").read_bytes() == HARDLINK_CONTENT
        # the image's raw overlay xattrs never act: the file keeps its own bytes, the dir its own (empty) contents
        assert (k / "evil").read_bytes() == b"E" * 6000 and os.listdir(k / "evildir") == []
        assert (k / "escaped").read_bytes() == b"S" * 6000
        assert os.getxattr(k / "escaped", "trusted.overlay.redirect") == b"/big/one"
        assert "trusted.overlay.redirect" not in os.listxattr(k / "evil")
        assert stat.S_IMODE(os.stat(k / "suid").st_mode) == 0o4755
    finally:
        _umount(root, k, f)


def _operate(m: Path) -> None:
    (m / "c").write_text("rewritten\n")
    (m / "newfile").write_bytes(b"N" * 7000)
    os.chmod(m / "big" / "one", 0o600)  # a large lower file: overlayfs copies up metadata only
    os.chown(m / "b", 42, 43)
    os.unlink(m / "a")
    os.mkdir(m / "newdir")
    (m / "newdir" / "x").write_text("x\n")
    os.rename(m / "d", m / "d-renamed")
    for i, p in enumerate((".", "big", "c", "newfile", "newdir", "newdir/x", "d-renamed")):  # the same times on both
        os.utime(m / p, ns=(1_700_000_000_000_000_001 + i,) * 2)


def test_operations_commit_the_same_image_as_fuse(scratch, rich_image):
    root, image = rich_image
    for d in ("ku", "kw", "fu", "fw"):
        (scratch / d).mkdir()
    k, f = _both(root, image, scratch, kernel_extra=("--upper", scratch / "ku", "--work", scratch / "kw"),
                 fuse_extra=("--upper", scratch / "fu", "--work", scratch / "fw"))
    try:
        _operate(k)
        _operate(f)
        assert_same_tree(snapshot(str(k)), snapshot(str(f)))
        up = scratch / "ku" / "big" / "one"
        assert "trusted.overlay.metacopy" in os.listxattr(up) and up.stat().st_blocks * 512 < 100_000  # data left below
    finally:
        _umount(root, k, f)

    with open_store(str(root)) as st:
        img = st.image(image)
        lowers = [StoreLayer(st.reader(), lid) for lid in reversed(img.layer_ids)]
        kch = {c.path: c for c in changes(str(scratch / "ku"), lowers)}
        fch = {c.path: c for c in changes(str(scratch / "fu"), lowers, str(scratch / "fw"))}
        assert kch.keys() == fch.keys()
        for p, c in kch.items():
            if c.rec is None or not stat.S_ISREG(c.rec.mode):
                continue
            fk, ff = c.open(), fch[p].open()
            try:
                assert os.pread(fk, 1 << 20, 0) == os.pread(ff, 1 << 20, 0), p
            finally:
                os.close(fk)
                os.close(ff)
    # the layers `lamina commit` would write from the two uppers are the same, member for member
    tars = []
    for chs in (kch.values(), fch.values()):
        buf = io.BytesIO()
        write_layer(sorted(chs, key=lambda c: c.path.rstrip("/").split("/")), buf)
        tars.append(_tar_listing(buf.getvalue()))
    assert tars[0] == tars[1]


def _tar_listing(t: bytes) -> list[tuple]:
    out = []
    with tarfile.open(fileobj=io.BytesIO(t)) as tf:
        for m in tf:
            data = tf.extractfile(m).read() if m.isreg() else b""
            out.append((m.name, m.type, m.mode, m.uid, m.gid, m.mtime, m.linkname, m.devmajor, m.devminor,
                        sorted(m.pax_headers.items()), hashlib.sha256(data).hexdigest()))
    return out


def test_gc_removes_trees_of_removed_layers_and_fsck_checks_them(scratch, rich_image):
    root, image = rich_image
    k = scratch / "k"
    _mount(root, image, k, "kernel", "--read-only")
    _umount(root, k)
    derived = root / "derived"
    trees = sorted(derived.iterdir())
    assert len(trees) == 4 and all((t / "kernel" / "complete").is_file() for t in trees)
    assert json.loads(lamina(root, "df", "--format", "json").stdout)["derived_bytes"] > 0
    lamina(root, "fsck")  # complete trees are no problem
    os.unlink(trees[0] / "kernel" / "complete")  # a tree that was never finished
    p = lamina(root, "fsck", check=False)
    assert p.returncode != 0 and "incomplete" in p.stdout + p.stderr
    # a mount does not use it: it is built again
    _mount(root, image, k, "kernel", "--read-only")
    _umount(root, k)
    assert (trees[0] / "kernel" / "complete").is_file()
    lamina(root, "rmi", image)
    lamina(root, "gc")
    assert list(derived.iterdir()) == []


def test_auto_falls_back_and_kernel_refuses_without_support(scratch, rich_image):
    root, image = rich_image
    env = {**os.environ, "LAMINA_KERNEL_OVERLAY": "0"}
    mnt = scratch / "a"
    mnt.mkdir()
    p = subprocess.run([str(BIN / "lamina"), "--root", str(root), "mount", "--driver", "kernel", image, str(mnt)],
                       capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode != 0 and not is_mounted(mnt)
    assert p.stderr.startswith("lamina: ") and len(p.stderr.strip().splitlines()) == 1
    p = subprocess.run([str(BIN / "lamina"), "--root", str(root), "mount", "--driver", "auto", image, str(mnt)],
                       capture_output=True, text=True, env=env, timeout=60)
    try:
        assert p.returncode == 0 and "fuse" in p.stderr
        assert _fstype(mnt).startswith("fuse")
    finally:
        _umount(root, mnt)
    _mount(root, image, mnt, "auto")
    try:
        assert _fstype(mnt) == "overlay"
    finally:
        _umount(root, mnt)


def _fstype(mnt: Path) -> str:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            a, _, b = line.partition(" - ")
            if a.split()[4] == str(mnt):
                return b.split()[0]
    return ""


def test_a_kernel_mount_forks_no_standby_daemon():
    from runtime.cli import background_mount  # noqa: PLC0415

    assert not background_mount(["mount", "--driver", "kernel", "img", "/mnt"])
    assert not background_mount(["--root", "/r", "mount", "img", "/mnt", "--driver=kernel"])
    assert background_mount(["mount", "--driver", "auto", "img", "/mnt"])  # auto may take FUSE


def test_tree_build_never_writes_through_a_symlink_or_out_of_the_tree(scratch):
    from unionfs.kerneltree import _build  # noqa: PLC0415

    outside = scratch / "outside"
    outside.mkdir()
    #        parent name  kind mode         uid gid mtime size obj linkname rdev ino link xattrs opaque data
    rows = [("", "", "d", 0o40755, 0, 0, 0, 0, None, None, 0, 1, None, None, 0, None),
            ("/", "..", "f", 0o100644, 0, 0, 0, 3, "h", None, 0, 2, None, None, 0, b"bad"),
            ("/", "a", "l", 0o120777, 0, 0, 0, 0, None, str(outside), 0, 3, None, None, 0, None),
            ("/a", "x", "f", 0o100644, 0, 0, 0, 3, "h", None, 0, 4, None, None, 0, b"bad"),
            ("/a", "d", "d", 0o40755, 0, 0, 0, 0, None, None, 0, 5, None, None, 0, None)]
    old = os.umask(0)
    try:
        _build(rows, str(scratch / "tree"))
    finally:
        os.umask(old)
    assert os.listdir(outside) == [] and sorted(os.listdir(scratch / "tree")) == ["a"]
    assert sorted(os.listdir(scratch)) == ["outside", "tree"]
