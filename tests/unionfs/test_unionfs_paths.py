"""Path resolution stays inside the layers: hostile redirects and symlinked components (the kernel is the oracle),
paths as long and as deep as the kernel allows below the mount."""
from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from fsharness import kernel_mount, lamina_mount
from tests.trees import deep_tree, descend
from unionfs.layers import DirLayer
from unionfs.overlay import Overlay

UP = "/.." * 40  # more than enough to climb from any layer root to the host's /


def _secret(scratch: Path) -> Path:
    d = scratch / "host"
    d.mkdir()
    (d / "secret").write_text("host only\n")
    return d


def _view(p: Path) -> tuple:
    """What a directory looks like through a mount: its kind and entries, or the errno of its lookup."""
    try:
        os.stat(p)
        return ("dir", sorted(os.listdir(p)))
    except OSError as e:
        return ("error", errno.errorcode[e.errno])


@pytest.mark.parametrize("key", ["trusted.overlay.redirect", "user.overlay.redirect"])
def test_redirect_cannot_climb_out_of_the_layers(scratch, key):
    host = _secret(scratch)
    l1, l2, mnt = scratch / "l1", scratch / "l2", scratch / "mnt"
    for d in (l1 / "x", l1 / "y", l2 / "d", mnt):
        d.mkdir(parents=True)
    os.symlink("/", l2 / "s")  # a lower component that is a symlink to the host's root
    os.setxattr(l1 / "x", key, (UP + str(host)).encode())
    os.setxattr(l1 / "y", key, ("/s" + str(host)).encode())
    up, work = scratch / "u", scratch / "w"
    up.mkdir()
    work.mkdir()
    with lamina_mount([l1, l2], mnt, up, work):
        assert _view(mnt / "x") == ("error", "EACCES")  # what kernel overlayfs answers (see below)
        assert not (mnt / "y" / "secret").exists()
        assert _view(mnt / "y") == ("dir", [])
        with pytest.raises(OSError):
            (mnt / "x" / "secret").read_text()
        assert sorted(os.listdir(mnt)) == ["d", "s", "x", "y"]


@pytest.mark.parametrize("value", ["../etc", "..", "//d", "/d/", "/./d", "/d/../d", "/", "d", "/d", "/s/d",
                                   "/d/e", "/s", "."])
def test_redirect_forms_answer_as_the_kernel_does(scratch, value):
    """Every redirect form, valid or not, gives what kernel overlayfs (redirect_dir=follow) gives."""
    l1, l2 = scratch / "l1", scratch / "l2"
    (l1 / "q").mkdir(parents=True)
    (l2 / "d" / "e").mkdir(parents=True)
    (l2 / "d" / "f").write_text("f\n")
    (l2 / "q").mkdir()
    (l2 / "q" / "own").write_text("own\n")
    os.symlink("d", l2 / "s")
    os.setxattr(l1 / "q", "trusted.overlay.redirect", value.encode())
    got = {}
    for name, mount in (("kernel", lambda m: kernel_mount([l1, l2], m, extra="redirect_dir=follow")),
                        ("lamina", lambda m: lamina_mount([l1, l2], m))):
        m = scratch / f"m-{name}"
        m.mkdir()
        with mount(m):
            got[name] = _view(m / "q")
    assert got["lamina"] == got["kernel"]



def test_deep_trees_are_served_as_deep_as_the_kernel_allows(scratch):
    """1,500 levels in a lower and 1,500 made through the mount: every level resolves (RecursionError, EINVAL past
    ~490 levels before), and the tree made through the mount can be removed."""
    low, up, work, mnt = scratch / "low", scratch / "up", scratch / "work", scratch / "mnt"
    for d in (low, up, work, mnt):
        d.mkdir()
    try:
        parts = deep_tree(low, 1500, text="bottom\n")
        with lamina_mount([low], mnt, up, work):
            deep = "/".join([str(mnt), *parts])
            with open(deep + "/f") as f:
                assert f.read() == "bottom\n"
            with open(deep + "/g", "w") as f:  # a copy-up of all 1,500 parents
                f.write("copied up\n")
            assert os.stat(deep + "/g").st_size == 10
            made = deep_tree(mnt, 1500, "e", text="bottom\n")
            with open("/".join([str(mnt), *made, "f"])) as f:
                assert f.read() == "bottom\n"
            # (rm, not shutil.rmtree: Python 3.11's recursion stops short of 1,500 levels)
            p = subprocess.run(["rm", "-rf", str(mnt / "e"), str(mnt / "d")], capture_output=True, text=True)
            assert p.returncode == 0, p.stderr[-300:]
            assert os.listdir(mnt) == []
    finally:
        subprocess.run(["rm", "-rf", str(low), str(up)])



def test_paths_up_to_path_max_below_the_mount(scratch):
    """Layer roots of ~700 bytes and paths of 4,000-4,095 bytes below the mount: every operation works, in the
    upper and on copy-up of a lower file (ENAMETOOLONG once root + path passed 4,095 bytes before)."""
    base = scratch.joinpath(*(["r" * 100] * 6))  # long layer roots
    low, up, work, mnt = base / "low", base / "up", base / "work", scratch / "mnt"
    for d in (low, up, work, mnt):
        d.mkdir(parents=True)
    names = ["n%03d" % i + "x" * 195 for i in range(20)]  # 20 x 199 bytes: 3,999 bytes with the slashes
    fd = descend(low, names, True)
    try:
        with open(os.open("lowfile", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd), "w") as f:
            f.write("lower\n")
    finally:
        os.close(fd)
    with lamina_mount([low], mnt, up, work):
        fd = descend(mnt, names, False)
        try:
            tail = "f" * (4095 - len("/".join(names)) - 1)  # a path of exactly 4,095 bytes below the mount
            assert len("/".join([*names, tail])) == 4095
            with open(os.open(tail, os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd), "w") as f:
                f.write("upper\n")
            assert os.stat(tail, dir_fd=fd).st_size == 6
            os.chmod(tail, 0o640, dir_fd=fd)
            os.utime(tail, ns=(1, 2), dir_fd=fd)
            st = os.stat(tail, dir_fd=fd)
            assert (st.st_mode & 0o777, st.st_mtime_ns) == (0o640, 2)
            with open(os.open("lowfile", os.O_WRONLY | os.O_APPEND, dir_fd=fd), "a") as f:  # copy-up at depth
                f.write("more\n")
            with open(os.open("lowfile", os.O_RDONLY, dir_fd=fd)) as f:
                assert f.read() == "lower\nmore\n"
            os.mkdir("d" * 60, dir_fd=fd)
            os.symlink("target", "s" * 60, dir_fd=fd)
            os.link(tail, "h" * 60, src_dir_fd=fd, dst_dir_fd=fd, follow_symlinks=False)
            os.rename("h" * 60, "g" * 60, src_dir_fd=fd, dst_dir_fd=fd)
            assert os.stat("g" * 60, dir_fd=fd).st_nlink == 2
            os.unlink("lowfile", dir_fd=fd)  # a whiteout at depth
            os.unlink(tail, dir_fd=fd)
            assert sorted(os.listdir(fd)) == sorted(["d" * 60, "s" * 60, "g" * 60])
        finally:
            os.close(fd)
        p = subprocess.run(["rm", "-rf", str(mnt / names[0])], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-300:]
        assert os.listdir(mnt) == []


def test_long_names_over_whiteouts_past_path_max_without_mknod(scratch):
    """The whiteout rules for names too long for `.wh.` (xattr whiteouts, a whiteout replaced only once the new
    object exists, a merged directory exchanged with its whiteout, a copy-up keeping its parents' times) hold at
    3,999 bytes below layer roots of ~700 bytes, where 255-byte names take the path past PATH_MAX even without
    the root; kernel overlayfs reads the upper back the same way."""
    base = scratch.joinpath(*(["r" * 100] * 6))
    low, up, work, k = base / "low", base / "up", base / "work", scratch / "k"
    for d in (low, up, work, k):
        d.mkdir(parents=True)
    names = ["n%03d" % i + "x" * 195 for i in range(20)]
    file_, dir_, gone = "l" * 255, "m" * 255, "k" * 254
    fd = descend(low, names, True)
    try:
        for n, text in ((file_, "lower\n"), (gone, "gone\n"), ("c", "c\n")):
            with open(os.open(n, os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd), "w") as f:
                f.write(text)
        os.mkdir(dir_, dir_fd=fd)
        os.close(os.open(f"{dir_}/f", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
        os.utime(fd, ns=(10**18, 2 * 10**18))
    finally:
        os.close(fd)
    ov = Overlay([DirLayer(str(low))], str(up), str(work))
    ov.w.mknod_ok = False  # as for an unprivileged daemon: `.wh.` files, and xattr whiteouts where they don't fit
    deep = "/" + "/".join(names)
    ov.truncate(deep + "/c", 1)  # a copy-up of the file and its 20 parents
    ufd = descend(up, names, False)
    try:
        st = os.fstat(ufd)
        assert (st.st_atime_ns, st.st_mtime_ns) == (10**18, 2 * 10**18)
        ov.unlink(f"{deep}/{file_}")
        assert os.getxattr(f"/proc/self/fd/{ufd}/{file_}", "trusted.overlay.whiteout") == b""
        assert os.getxattr(ufd, "trusted.overlay.opaque") == b"x"
        with pytest.raises(OSError):
            ov.symlink(f"{deep}/{file_}", "t" * 5000, (0, 0))  # ENAMETOOLONG: the whiteout stays
        assert ov.resolve(f"{deep}/{file_}") is None
        h = ov.create(f"{deep}/{file_}", 0o644, os.O_WRONLY, (0, 0))
        os.write(h, b"new\n")
        ov.release(h)
        ov.unlink(f"{deep}/{dir_}/f")  # the directory is copied up: merged
        ov.rmdir(f"{deep}/{dir_}")  # exchanged with an xattr whiteout
        assert os.getxattr(f"/proc/self/fd/{ufd}/{dir_}", "trusted.overlay.whiteout") == b""
        ov.mkdir(f"{deep}/{dir_}", 0o755, (0, 0))  # over it: made in the work dir, exchanged in
        assert ov.readdir_names(f"{deep}/{dir_}")[2:] == []
        ov.unlink(f"{deep}/{gone}")
        ov.rename(f"{deep}/{dir_}", f"{deep}/{gone}")  # a directory onto a whiteout; the old name gets one
        assert ov.resolve(f"{deep}/{dir_}") is None and ov.resolve(f"{deep}/{gone}").is_dir
        assert os.listdir(ov.work) == []
        shown = sorted(ov.readdir_names(deep)[2:])
        assert shown == sorted(["c", file_, gone])
    finally:
        os.close(ufd)
    with kernel_mount([up, low], k):
        kfd = descend(k, names, False)
        try:
            assert sorted(os.listdir(kfd)) == shown
            with open(os.open(file_, os.O_RDONLY, dir_fd=kfd)) as f:
                assert f.read() == "new\n"
            assert os.listdir(os.path.join(f"/proc/self/fd/{kfd}", gone)) == []
        finally:
            os.close(kfd)
