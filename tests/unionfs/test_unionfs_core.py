"""The pure-Python core without any mount: marker forms, redirects, parking of open unlinked files, copy-up data."""
from __future__ import annotations

import errno
import os
import stat

import pytest

from fsharness import kernel_mount, lamina_mount, snapshot
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


def test_failed_creation_over_a_whiteout_leaves_the_whiteout(layout):
    """Issue 12.3: a creation that fails must not have removed the whiteout first (the deleted file came back)."""
    ov = overlay(layout)
    up = layout["upper"]
    ov.unlink("/a")
    for fail in (lambda: ov.symlink("/a", "t" * 5000, OWNER),  # ENAMETOOLONG: a target over PATH_MAX
                 lambda: ov.mknod("/a", stat.S_IFDIR | 0o755, 0, OWNER)):  # mknod(2) makes no directory
        with pytest.raises(OSError):
            fail()
        assert ov.resolve("/a") is None and stat.S_ISCHR(os.lstat(up / "a").st_mode)
    ov.w.mknod_ok = False  # the `.wh.` form of an unprivileged daemon
    ov.unlink("/b")
    with pytest.raises(OSError):
        ov.symlink("/b", "t" * 5000, OWNER)
    assert ov.resolve("/b") is None and (up / ".wh.b").is_file()
    assert os.listdir(ov.work) == []


def test_fallback_whiteouts_of_names_too_long_for_wh_are_xattr_whiteouts(layout, scratch):
    """Issue 12.6: where mknod is refused, a name of 252-255 bytes is hidden by the kernel's xattr whiteout (an
    empty file of that name, its directory marked opaque=x), which lamina and kernel overlayfs read back."""
    l2 = layout["lowers"][2]
    long = {k: c * k for k, c in ((252, "h"), (253, "k"), (254, "m"), (255, "l"))}
    for k in (252, 253, 255):
        (l2 / long[k]).write_text(str(k))
        (l2 / "d" / long[k]).write_text(str(k))
    (l2 / long[254]).mkdir()
    ov = overlay(layout)
    ov.w.mknod_ok = False
    up = layout["upper"]
    ov.unlink("/" + long[255])
    assert os.getxattr(up / long[255], "trusted.overlay.whiteout") == b""
    assert os.getxattr(up, "trusted.overlay.opaque") == b"x"
    assert ov.resolve("/" + long[255]) is None and long[255] not in names(ov, "/")
    ov.rmdir("/" + long[254])
    ov.rename("/d/" + long[253], "/d/" + long[252])  # the old name gets one; the new one replaces a lower file
    ov.unlink("/d/" + long[255])
    ov.rename("/" + long[252], "/" + long[253])
    assert names(ov, "/d") == sorted(["sub", "v", "w", "x", "y", long[252]])
    assert ov.resolve("/d/" + long[253]) is None and ov.resolve("/" + long[252]) is None
    fd = ov.create("/" + long[255], 0o644, os.O_WRONLY, OWNER)  # over the xattr whiteout
    os.write(fd, b"new")
    ov.release(fd)
    ov.mkdir("/" + long[254], 0o755, OWNER)
    assert names(ov, "/" + long[254]) == []
    assert not any(len(os.fsencode(n)) > 255 for _, _, fs in os.walk(up) for n in fs)
    view = {p: ov.resolve(p) is not None for p in ["/" + v for v in long.values()] +
            ["/d/" + v for v in long.values()]}
    assert view == {"/" + long[252]: False, "/" + long[253]: True, "/" + long[254]: True, "/" + long[255]: True,
                    "/d/" + long[252]: True, "/d/" + long[253]: False, "/d/" + long[254]: False,
                    "/d/" + long[255]: False}
    (scratch / "k").mkdir()
    (scratch / "lm").mkdir()
    with kernel_mount([up, *layout["lowers"]], scratch / "k") as k, \
            lamina_mount([up, *layout["lowers"]], scratch / "lm") as lm:
        assert snapshot(lm, dir_nlink=False) == snapshot(k, dir_nlink=False)
        assert sorted(os.listdir(k / "d")) == names(ov, "/d")


def test_directory_renamed_onto_a_whiteout_is_exchanged_with_it(layout):
    """The whiteout is swapped out rather than removed first, and covers the old name where one is needed."""
    ov = overlay(layout)
    up = layout["upper"]
    ov.unlink("/a")
    ov.rename("/g", "/a")  # a lower directory: copied up with a redirect
    assert names(ov, "/a") == ["i"] and ov.resolve("/g") is None and "g" not in names(ov, "/")
    assert stat.S_ISCHR(os.lstat(up / "g").st_mode) and os.listdir(ov.work) == []
    ov.mkdir("/n", 0o755, OWNER)
    ov.unlink("/c")
    ov.rename("/n", "/c")  # no lower part: the whiteout goes
    assert ov.resolve("/c").is_dir and not os.path.lexists(up / "n") and os.listdir(ov.work) == []


def test_directory_moved_to_a_name_once_read_keeps_its_xattr_whiteouts(layout):
    """Which upper directories hold xattr whiteouts is remembered by path: a directory removed or moved away must
    not leave its answer to the one moved there (a deleted 255-byte name came back in the moved directory)."""
    long = "l" * 255
    (layout["lowers"][2] / "d" / long).write_text("lower\n")
    ov = overlay(layout)
    ov.w.mknod_ok = False
    ov.unlink("/d/" + long)  # an xattr whiteout in the upper /d, marked opaque=x
    ov.mkdir("/q", 0o755, OWNER)
    ov.release(ov.create("/q/e", 0o644, os.O_WRONLY, OWNER))
    assert ov.resolve("/q/e") is not None  # an empty file read in /q: "no xattr whiteouts there"
    ov.unlink("/q/e")
    ov.rmdir("/q")
    ov.rename("/d", "/q")
    assert ov.resolve("/q/" + long) is None and long not in names(ov, "/q")
    assert "x" in names(ov, "/q")
