"""The pure-Python core without any mount: marker forms, redirects, parking of open unlinked files, copy-up data."""
from __future__ import annotations

import errno
import os
import stat

import pytest

from unionfs.copyup import copy_data
from unionfs.layers import DirLayer
from unionfs.overlay import Overlay

OWNER = (0, 0)


def overlay(layout) -> Overlay:
    return Overlay([DirLayer(str(p)) for p in layout["lowers"]], str(layout["upper"]), str(layout["work"]))


def names(ov: Overlay, path: str) -> list[str]:
    return sorted(ov.readdir_names(path)[2:])


def test_fallback_whiteouts_when_mknod_is_refused(layout):
    ov = overlay(layout)
    ov.w.mknod_ok = False  # as for an unprivileged daemon
    up = layout["upper"]
    ov.unlink("/a")
    assert (up / ".wh.a").is_file() and not os.path.lexists(up / "a")
    assert ov.resolve("/a") is None and "a" not in names(ov, "/")
    ov.rename("/c", "/c2")
    ov.rename("/p", "/p2")
    assert (up / ".wh.p").is_file() and ov.resolve("/p") is None
    fd = ov.create("/a", 0o644, os.O_WRONLY, OWNER)
    os.write(fd, b"again")
    ov.release(fd)
    assert not (up / ".wh.a").exists() and (up / "a").read_bytes() == b"again"
    assert ov.resolve("/a").rec.size == 5


def test_reads_every_marker_form(layout, scratch):
    top = scratch / "top"
    (top / "d").mkdir(parents=True)
    (top / "g").mkdir()
    (top / ".wh.c").write_bytes(b"")
    (top / "d" / ".wh..wh..opq").write_bytes(b"")
    os.setxattr(top / "g", "user.fuseoverlayfs.opaque", b"y")
    (top / "b").write_bytes(b"")
    os.setxattr(top / "b", "trusted.overlay.whiteout", b"")  # the kernel's xattr whiteout...
    os.setxattr(top, "trusted.overlay.opaque", b"x")  # ...valid in a directory marked as holding them
    ov = Overlay([DirLayer(str(top)), *(DirLayer(str(p)) for p in layout["lowers"])])
    assert names(ov, "/") == ["a", "d", "f", "g", "p"]
    assert names(ov, "/d") == [] and names(ov, "/g") == []
    assert ov.resolve("/b") is None and ov.resolve("/c") is None


def test_redirected_directory_finds_its_lower_part(layout):
    up = layout["upper"]
    (up / "elsewhere").mkdir()
    os.setxattr(up / "elsewhere", "trusted.overlay.redirect", b"/d")
    os.mknod(up / "d", stat.S_IFCHR, os.makedev(0, 0))
    ov = overlay(layout)
    assert ov.resolve("/d") is None
    assert names(ov, "/elsewhere") == ["sub", "v", "w", "x", "y"]
    assert ov.resolve("/elsewhere").ino == os.stat(layout["lowers"][2] / "d").st_ino  # the lowest part's inode
    # a relative redirect names a sibling
    (up / "rel").mkdir()
    os.setxattr(up / "rel", "trusted.overlay.redirect", b"g")
    assert names(ov, "/rel") == ["i"]


def test_open_unlinked_files_are_parked_outside_the_upper_dir(layout):
    ov = overlay(layout)
    fd = ov.open("/b", os.O_RDWR)
    ov.rename("/b", "/.fuse_hidden0001")
    assert ov.resolve("/b") is None and names(ov, "/") == ["c", "d", "f", "g", "p", "a"].__class__(
        sorted(["a", "c", "d", "f", "g", "p"]))
    assert ov.getattr("/.fuse_hidden0001")["st_size"] == 5001
    assert not any(n.startswith(".fuse_hidden") for n in os.listdir(layout["upper"]))
    os.pwrite(fd, b"still", 0)
    ov.chmod("/.fuse_hidden0001", 0o600)
    assert stat.S_IMODE(ov.getattr("/.fuse_hidden0001")["st_mode"]) == 0o600
    ov.release(fd)
    ov.unlink("/.fuse_hidden0001")
    assert ov.resolve("/.fuse_hidden0001") is None
    assert os.listdir(ov.work) == []


def test_rename_errors(layout):
    ov = overlay(layout)
    with pytest.raises(OSError) as e:
        ov.rename("/d", "/g")  # merged view of g is not empty
    assert e.value.errno == errno.ENOTEMPTY
    with pytest.raises(OSError) as e:
        ov.rename("/c", "/d")
    assert e.value.errno == errno.EISDIR
    with pytest.raises(OSError) as e:
        ov.rename("/d", "/c")
    assert e.value.errno == errno.ENOTDIR
    with pytest.raises(OSError) as e:
        ov.rename("/nothing", "/x")
    assert e.value.errno == errno.ENOENT


def test_read_only_union_refuses_changes(layout):
    ov = Overlay([DirLayer(str(p)) for p in layout["lowers"]])
    for call in (lambda: ov.unlink("/a"), lambda: ov.mkdir("/n", 0o755, OWNER), lambda: ov.open("/a", os.O_WRONLY),
                 lambda: ov.chmod("/a", 0o600)):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.EROFS


def test_copy_data_is_exact(scratch):
    src, dst = scratch / "src", scratch / "dst"
    payload = os.urandom((2 << 20) + 123)
    src.write_bytes(payload)
    with open(src, "rb") as s, open(dst, "wb") as d:
        copy_data(s.fileno(), d.fileno(), len(payload))
    assert dst.read_bytes() == payload
