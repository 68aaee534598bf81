"""Behaviour tests of each operation on real lamina-fs mounts, with the upper directory checked on disk."""
from __future__ import annotations

import contextlib
import errno
import mmap
import os
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from fsharness import LAMINA_FS, BIN, is_mounted, kernel_mount, lamina_mount, snapshot, unmount
from unionfs.upper import RENAME_EXCHANGE, RENAME_NOREPLACE, renameat2


def mounted(layout):
    return lamina_mount(layout["lowers"], layout["mnt"], layout["upper"], layout["work"])


def is_whiteout(p: Path) -> bool:
    st = os.lstat(p)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def test_merged_view(layout):
    with mounted(layout) as m:
        assert sorted(os.listdir(m)) == ["a", "b", "c", "d", "f", "g", "p"]  # l1's whiteout hides e
        assert sorted(os.listdir(m / "d")) == ["sub", "v", "w", "x", "y"]
        assert (m / "d" / "y").read_text() == "y from l1\n"  # upper layers win
        assert os.listdir(m / "g") == ["i"]  # opaque in l1 hides l2/g/h
        assert stat.S_IMODE(os.stat(m / "d").st_mode) == 0o750  # directory metadata from the topmost layer
        assert os.readlink(m / "f") == "a"
        assert os.listxattr(m / "g") == []  # trusted.overlay.opaque is internal
        assert os.getxattr(m / "p", "user.k") == b"v"
        snapshot(m, check_ino=True)


def test_open_flags(layout):
    with mounted(layout) as m:
        with open(m / "a", "a") as f:
            f.write("more\n")
        assert (m / "a").read_text() == "bottom a\nmore\n"
        assert (layout["upper"] / "a").read_text() == "bottom a\nmore\n"
        assert (layout["lowers"][2] / "a").read_text() == "bottom a\n"
        fd = os.open(m / "b", os.O_WRONLY | os.O_TRUNC)
        os.close(fd)
        assert os.stat(m / "b").st_size == 0
        with pytest.raises(FileExistsError):
            os.open(m / "c", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        fd = os.open(m / "new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        os.write(fd, b"n")
        os.close(fd)
        assert stat.S_IMODE(os.stat(layout["upper"] / "new").st_mode) == 0o640
        # reading a lower file copies nothing up
        (m / "d" / "x").read_text()
        assert not (layout["upper"] / "d" / "x").exists()


def test_truncate_and_fallocate(layout):
    with mounted(layout) as m:
        os.truncate(m / "b", 10)
        assert (m / "b").read_bytes() == b"\0" * 10
        with open(m / "c", "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, 100000)
            f.truncate(3)
        assert (m / "c").read_bytes() == b"top"
        with open(m / "c", "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, 8192)
        assert os.stat(m / "c").st_size == 8192


def test_unlink_rmdir_whiteouts_and_opaque(layout):
    up = layout["upper"]
    with mounted(layout) as m:
        os.unlink(m / "a")
        assert not (m / "a").exists() and is_whiteout(up / "a")
        (m / "fresh").write_text("x")
        os.unlink(m / "fresh")
        assert not os.path.lexists(up / "fresh")  # no whiteout where no lower has the name
        for n in os.listdir(m / "d" / "sub"):
            os.unlink(m / "d" / "sub" / n)
        os.rmdir(m / "d" / "sub")
        assert is_whiteout(up / "d" / "sub")
        with pytest.raises(OSError) as e:
            os.rmdir(m / "d")
        assert e.value.errno == errno.ENOTEMPTY
        os.mkdir(m / "d" / "sub")
        assert os.listdir(m / "d" / "sub") == []
        assert os.getxattr(up / "d" / "sub", "trusted.overlay.opaque") == b"y"
        assert os.listxattr(m / "d" / "sub") == []
        with pytest.raises(IsADirectoryError):
            os.unlink(m / "d")
        with pytest.raises(NotADirectoryError):
            os.rmdir(m / "c")


def test_mknod_fifo_symlink_link(layout):
    with mounted(layout) as m:
        os.mkfifo(m / "fifo", 0o600)
        assert stat.S_ISFIFO(os.lstat(m / "fifo").st_mode)
        os.mknod(m / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        st = os.lstat(m / "null")
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
        with open(m / "null", "wb") as f:
            f.write(b"gone")
        os.symlink("d/x", m / "sl")
        assert os.readlink(m / "sl") == "d/x" and (m / "sl").read_text() == "x from l2\n"
        os.link(m / "a", m / "a2")
        assert os.stat(m / "a").st_nlink == 2 and os.stat(m / "a2").st_nlink == 2
        assert os.stat(m / "a").st_ino == os.stat(m / "a2").st_ino
        with open(m / "a2", "a") as f:
            f.write("via a2\n")
        assert (m / "a").read_text() == "bottom a\nvia a2\n"


def test_rename_flags(layout):
    up = layout["upper"]
    with mounted(layout) as m:
        with pytest.raises(FileExistsError):
            renameat2(str(m / "a"), str(m / "b"), RENAME_NOREPLACE)
        renameat2(str(m / "a"), str(m / "a3"), RENAME_NOREPLACE)
        assert (m / "a3").read_text() == "bottom a\n" and is_whiteout(up / "a")
        renameat2(str(m / "c"), str(m / "g"), RENAME_EXCHANGE)
        assert (m / "g").read_text() == "top c\n" and os.listdir(m / "c") == ["i"]
        with pytest.raises(FileNotFoundError):
            renameat2(str(m / "c"), str(m / "nothing"), RENAME_EXCHANGE)
        os.rename(m / "b", m / "p")  # replace a lower file
        assert (m / "p").read_bytes().endswith(b"b") and not (m / "b").exists()


def test_rename_lower_directory_like_redirect_dir(layout, scratch):
    up = layout["upper"]
    with mounted(layout) as m:
        before = snapshot(m / "d")
        ino = os.stat(m / "d").st_ino
        os.rename(m / "d", m / "moved")
        assert not (m / "d").exists()
        assert snapshot(m / "moved") == before
        assert os.stat(m / "moved").st_ino == ino
        assert os.getxattr(up / "moved", "trusted.overlay.redirect") == b"/d"
        assert is_whiteout(up / "d")
        (m / "moved" / "x").write_text("changed\n")  # copy-up below a redirected directory
        os.mkdir(m / "other")
        os.rename(m / "moved", m / "other" / "deeper")
        view = snapshot(m, dir_nlink=False)
    (scratch / "kw").mkdir()
    (scratch / "km").mkdir()
    # kernel overlayfs follows lamina's redirects once mounted with redirect_dir=on (the last option wins)
    with kernel_mount(layout["lowers"], scratch / "km", up, scratch / "kw", extra="redirect_dir=on") as k:
        assert snapshot(k, dir_nlink=False) == view
        assert sorted(os.listdir(k / "other" / "deeper")) == ["sub", "v", "w", "x", "y"]
        assert (k / "other" / "deeper" / "x").read_text() == "changed\n"
        assert not (k / "d").exists()


def test_metadata_changes_copy_up(layout):
    up, l2 = layout["upper"], layout["lowers"][2]
    lst = os.stat(l2 / "p")
    os.setxattr(layout["lowers"][0] / "d", "user.top", b"l0")
    with mounted(layout) as m:
        os.chmod(m / "p", 0o640)
        st = os.stat(up / "p")
        assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_mtime_ns == lst.st_mtime_ns
        assert os.getxattr(up / "p", "user.k") == b"v"
        os.chown(m / "d" / "x", 1000, 100)
        assert (os.stat(up / "d" / "x").st_uid, os.stat(up / "d" / "x").st_gid) == (1000, 100)
        # the parent was copied up with its metadata
        assert stat.S_IMODE(os.stat(up / "d").st_mode) == 0o750
        assert os.getxattr(up / "d", "user.top") == b"l0"  # the topmost layer's xattrs, not l2's
        assert os.listxattr(m / "d") == ["user.top"]
        os.utime(m / "g" / "i", ns=(1_000_000_123, 2_000_000_456))
        st = os.stat(m / "g" / "i")
        assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_123, 2_000_000_456)
        os.utime(m / "f", ns=(5_000_000_000, 6_000_000_000), follow_symlinks=False)
        assert os.lstat(m / "f").st_mtime_ns == 6_000_000_000


def test_xattrs(layout):
    with mounted(layout) as m:
        os.setxattr(m / "c", "user.a", b"1")
        os.setxattr(m / "d", "user.b", b"2")
        assert set(os.listxattr(m / "d")) == {"user.b"}  # l2's user.dir is below the topmost d
        assert os.getxattr(m / "c", "user.a") == b"1"
        os.removexattr(m / "p", "user.k")
        assert os.listxattr(m / "p") == []
        with pytest.raises(OSError) as e:
            os.getxattr(m / "c", "user.none")
        assert e.value.errno == errno.ENODATA
        with pytest.raises(OSError):
            os.getxattr(m / "g", "trusted.overlay.opaque")


def test_statfs_and_fsync(layout):
    with mounted(layout) as m:
        sv, su = os.statvfs(m), os.statvfs(layout["upper"])
        assert sv.f_blocks == su.f_blocks and sv.f_bsize == su.f_bsize and sv.f_namemax == su.f_namemax
        fd = os.open(m / "synced", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, b"durable")
        os.fsync(fd)
        os.fdatasync(fd)
        os.close(fd)
        assert (layout["upper"] / "synced").read_bytes() == b"durable"


def test_open_unlinked_file_keeps_working(layout):
    with mounted(layout) as m:
        f = open(m / "b", "r+b")
        g = open(m / "c", "rb")
        os.unlink(m / "b")
        os.unlink(m / "c")
        assert not (m / "b").exists()
        assert [n for n in os.listdir(m) if n.startswith(".fuse_hidden")] == []
        f.seek(0)
        f.write(b"rewritten")
        f.flush()
        f.seek(0)
        assert f.read(9) == b"rewritten"
        assert os.fstat(f.fileno()).st_size == 5001
        assert os.fstat(g.fileno()).st_size == 6
        assert g.read() == b"top c\n"
        assert [n for n in os.listdir(m) if n.startswith(".fuse_hidden")] == []
        f.close()
        g.close()
        assert [n for n in os.listdir(layout["upper"]) if n.startswith(".fuse_hidden")] == []
        # the directory of an open unlinked file moves away before the last close
        os.mkdir(m / "t")
        (m / "t" / "f").write_text("in t")
        h = open(m / "t" / "f", "rb")
        os.unlink(m / "t" / "f")
        os.rename(m / "t", m / "t2")
        assert os.fstat(h.fileno()).st_size == 4 and h.read() == b"in t"
        assert os.listdir(m / "t2") == []
        h.close()
        os.rmdir(m / "t2")
    assert os.listdir(layout["work"] / "work") == []


def test_inode_numbers_stable_across_copy_up_and_remount(layout):
    with mounted(layout) as m:
        before = {p: os.lstat(m / p).st_ino for p in ("a", "d", "d/x", "f", "g/i", "c")}
        with open(m / "a", "a") as f:
            f.write("x")
        os.utime(m / "f", follow_symlinks=False)  # copies the symlink up
        os.setxattr(m / "d", "user.t", b"1")
        (m / "d" / "x").write_text("new")
        os.rename(m / "g" / "i", m / "g" / "i2")
        after = {p: os.lstat(m / p).st_ino for p in ("a", "d", "d/x", "f", "g/i2", "c")}
        assert list(before.values()) == list(after.values())
        (m / "created").write_text("c")
        created = os.stat(m / "created").st_ino
        snapshot(m, check_ino=True)
    with mounted(layout) as m:
        again = {p: os.lstat(m / p).st_ino for p in ("a", "d", "d/x", "f", "g/i2", "c")}
        assert again == after
        assert os.stat(m / "created").st_ino == created
        snapshot(m, check_ino=True)
    assert len(set(after.values()) | {created}) == 7


def test_hardlinks_stay_joined_across_copy_up(layout):
    l1 = layout["lowers"][1]
    os.link(l1 / "b", l1 / "b2")
    with mounted(layout) as m:
        sb, sb2 = os.stat(m / "b"), os.stat(m / "b2")
        assert sb.st_ino == sb2.st_ino and sb.st_nlink == sb2.st_nlink == 2
        with open(m / "b", "r+b") as f:
            f.write(b"JOINED")
        assert (m / "b2").read_bytes().startswith(b"JOINED")
        assert os.stat(m / "b2").st_ino == sb.st_ino
        assert os.stat(m / "b").st_nlink == 2 and os.stat(m / "b2").st_nlink == 2
        os.chmod(m / "b2", 0o600)  # copy-up of the second name links to the first copy
        assert os.stat(layout["upper"] / "b").st_ino == os.stat(layout["upper"] / "b2").st_ino
        assert stat.S_IMODE(os.stat(m / "b").st_mode) == 0o600
    with mounted(layout) as m:
        assert (m / "b2").read_bytes().startswith(b"JOINED")
        assert os.stat(m / "b").st_ino == os.stat(m / "b2").st_ino == sb.st_ino
        assert os.stat(m / "b").st_nlink == 2


def test_ftruncate_of_a_copied_up_hardlink_keeps_its_link_count(layout):
    """ftruncate(2) answers with the attributes of the open file: a copied-up lower hardlink pair still counts 2
    links there, not the 3 of its upper file (the index holds the third). Found by the hardlink differential test."""
    l2 = layout["lowers"][2]
    os.link(l2 / "a", l2 / "d" / "ha")
    with mounted(layout) as m:
        os.truncate(m / "a", 100)  # copies the pair up, joined through the index
        fd = os.open(m / "d" / "ha", os.O_WRONLY | os.O_APPEND)
        try:
            os.ftruncate(fd, 50)
            assert os.fstat(fd).st_nlink == 2
        finally:
            os.close(fd)
        assert os.stat(m / "d" / "ha").st_nlink == os.stat(m / "a").st_nlink == 2
        assert os.stat(m / "a").st_size == 50


def test_truncating_open_of_one_hardlink_name_shows_in_the_other(layout):
    """O_TRUNC through one name of a lower hardlink pair empties the other name too, even when the kernel has
    that name's size and pages cached (found by the differential test)."""
    l2 = layout["lowers"][2]
    os.link(l2 / "a", l2 / "d" / "ha")
    with mounted(layout) as m:
        before = (m / "a").read_bytes()
        assert before and (m / "d" / "ha").read_bytes() == before
        assert os.stat(m / "a").st_size == os.stat(m / "d" / "ha").st_size == len(before)
        fd = os.open(m / "d" / "ha", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NONBLOCK, 0o644)
        os.write(fd, b"")
        os.close(fd)
        assert os.stat(m / "a").st_size == 0 and (m / "a").read_bytes() == b""
        assert os.stat(m / "a").st_ino == os.stat(m / "d" / "ha").st_ino


def test_file_open_for_writing_then_linked_opens_again(layout):
    """A file open by passthrough that gains a second name meanwhile: later opens of either name must share the
    open's mode (the kernel gives EIO to an open disagreeing with the others on an inode). Found by the
    differential test."""
    with mounted(layout) as m:
        w = os.open(m / "d" / "x", os.O_RDWR)  # copied up, opened by passthrough
        try:
            os.pwrite(w, b"LINKED", 0)
            os.link(m / "d" / "x", m / "d" / "x2")
            assert (m / "d" / "x").read_bytes().startswith(b"LINKED")
            assert (m / "d" / "x2").read_bytes().startswith(b"LINKED")
            os.pwrite(w, b"linked", 0)
            assert (m / "d" / "x").read_bytes().startswith(b"linked")
        finally:
            os.close(w)
        assert os.stat(m / "d" / "x").st_nlink == 2


def test_large_copy_up_keeps_every_byte(layout, scratch):
    """Copy-up of a file large enough for the preallocated copy (unionfs.copyup): kernel overlayfs's result."""
    data = os.urandom(3 << 20) + b"tail"
    (layout["lowers"][2] / "large").write_bytes(data)
    results = {}
    for kind, mount in (("kernel", kernel_mount), ("lamina", lamina_mount)):
        base = scratch / kind
        for d in ("u", "w", "m"):
            (base / d).mkdir(parents=True)
        with mount(layout["lowers"], base / "m", base / "u", base / "w") as m:
            with open(m / "large", "r+b") as f:
                f.seek(1 << 20)
                f.write(b"X")
            results[kind] = ((m / "large").read_bytes(), os.stat(m / "large").st_size)
        assert (base / "u" / "large").read_bytes() == results[kind][0]
    assert results["lamina"] == results["kernel"]
    assert results["lamina"][0] == data[:1 << 20] + b"X" + data[(1 << 20) + 1:]


def test_concurrent_callers(layout):
    errors: list[BaseException] = []
    with mounted(layout) as m:
        def worker(i: int) -> None:
            try:
                d = m / f"t{i}"
                os.mkdir(d)
                for j in range(40):
                    (d / f"f{j}").write_bytes(bytes([i]) * (j + 1))
                    os.listdir(m / "d")
                    (m / "d" / "x").read_text()
                for j in range(40):
                    assert (d / f"f{j}").read_bytes() == bytes([i]) * (j + 1)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
        def appender(i: int) -> None:  # all race to copy the same lower files up
            try:
                for name in ("a", "d/x", "g/i"):
                    fd = os.open(m / name, os.O_WRONLY | os.O_APPEND)
                    os.write(fd, f"<{i}>".encode())
                    os.close(fd)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        threads += [threading.Thread(target=appender, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert len([n for n in os.listdir(m) if n.startswith("t")]) == 8
        for name, original in (("a", "bottom a\n"), ("d/x", "x from l2\n"), ("g/i", "i\n")):
            text = (m / name).read_text()
            assert text.startswith(original) and sorted(text[len(original):].split(">")[:-1]) == \
                sorted(f"<{i}" for i in range(8)), text


def test_upper_format_read_both_ways(layout, scratch):
    """Kernel overlayfs over lamina's upper shows lamina's tree, and lamina over the kernel's upper the kernel's."""
    def mutate(m: Path) -> None:
        os.unlink(m / "a")
        for n in os.listdir(m / "d" / "sub"):
            os.unlink(m / "d" / "sub" / n)
        os.rmdir(m / "d" / "sub")
        os.mkdir(m / "d" / "sub")
        (m / "d" / "sub" / "new").write_text("n")
        (m / "b").write_text("b2")
        os.symlink("x", m / "d" / "sl")
        os.mkfifo(m / "d" / "ff")
        os.setxattr(m / "c", "user.q", b"q")
        os.rename(m / "p", m / "d" / "p")
        os.mkdir(m / "e")
        (m / "e" / "z").write_text("e")

    lowers = layout["lowers"]
    for first in ("lamina", "kernel"):
        base = scratch / first
        for d in ("u", "w", "m", "w2"):
            (base / d).mkdir(parents=True)
        mount1 = lamina_mount if first == "lamina" else kernel_mount
        mount2 = kernel_mount if first == "lamina" else lamina_mount
        with mount1(lowers, base / "m", base / "u", base / "w") as m:
            mutate(m)
            view = snapshot(m, dir_nlink=False)
        with mount2(lowers, base / "m", base / "u", base / "w2") as m:
            assert snapshot(m, dir_nlink=False) == view, first
            if first == "lamina":  # the union's own bookkeeping in the upper never shows through the kernel (#12.12)
                paths = [Path(d) / n for d, ds, fs in os.walk(m) for n in ds + fs]
                shown = {x for p in paths for x in os.listxattr(p, follow_symlinks=False)}
                assert not [x for x in shown if "lamina" in x], shown


def test_rotated_upper_reads_back_as_lower(layout, scratch):
    """An upper directory used as a lower layer shows the same tree; so do fuse-overlayfs's marker forms."""
    with mounted(layout) as m:
        os.unlink(m / "a")
        os.unlink(m / "g" / "i")
        os.rmdir(m / "g")
        os.mkdir(m / "g")
        (m / "g" / "j").write_text("j")
        view = snapshot(m, dir_nlink=False)
    rot = scratch / "rot"
    rot.mkdir()
    with lamina_mount([layout["upper"], *layout["lowers"]], rot) as m:
        assert snapshot(m, dir_nlink=False) == view
    # fuse-overlayfs's fallback forms in a plain lower
    fo = scratch / "fo"
    (fo / "g").mkdir(parents=True)
    (fo / ".wh.a").write_bytes(b"")
    (fo / "g" / ".wh..wh..opq").write_bytes(b"")
    (fo / "d").mkdir()
    os.setxattr(fo / "d", "user.overlay.opaque", b"y")
    with lamina_mount([fo, *layout["lowers"]], rot) as m:
        assert sorted(os.listdir(m)) == ["b", "c", "d", "f", "g", "p"]
        assert os.listdir(m / "g") == [] and os.listdir(m / "d") == []
        assert os.listxattr(m / "d") == []


def test_read_only_mount(layout):
    with lamina_mount(layout["lowers"], layout["mnt"]) as m:
        assert (m / "a").read_text() == "bottom a\n"
        with pytest.raises(OSError) as e:
            (m / "new").write_text("x")
        assert e.value.errno == errno.EROFS


def _run(*args, **kw):
    return subprocess.run([LAMINA_FS, *map(str, args)], capture_output=True, text=True, timeout=60, **kw)


def test_bad_arguments_fail_before_mounting(layout, scratch):
    lo = ":".join(map(str, layout["lowers"]))
    mnt, up, wk = layout["mnt"], layout["upper"], layout["work"]
    shm = Path("/dev/shm") / f"lamina-test-{os.getpid()}"
    shm.mkdir()
    (up / "w").mkdir()
    try:
        cases = [
            (["-o", f"lowerdir={lo}"], "mountpoint"),
            ([mnt], "lowerdir"),
            (["-o", f"lowerdir={scratch}/missing", mnt], "No such file"),
            (["-o", f"lowerdir={lo},upperdir={up}", mnt], "together"),
            (["-o", f"lowerdir={lo},upperdir={up},workdir={shm}", mnt], "same filesystem"),
            (["-o", f"lowerdir={lo},upperdir={up},workdir={up}/w", mnt], "separate"),
            (["-o", f"lowerdir={lo},upperdir={up},workdir={wk}", scratch / "nomnt"], "mountpoint"),
        ]
        for args, word in cases:
            p = _run(*args)
            assert p.returncode == 1, (args, p)
            assert len(p.stderr.strip().splitlines()) == 1 and word in p.stderr, (args, p.stderr)
            assert p.stderr.startswith("lamina-fs: ")
            assert not is_mounted(mnt)
    finally:
        shm.rmdir()


def test_mount_fuse3_form_and_foreground(layout):
    lo = ":".join(map(str, layout["lowers"]))
    mnt = layout["mnt"]
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}")
    opts = f"rw,dev,suid,lowerdir={lo},upperdir={layout['upper']},workdir={layout['work']}"
    subprocess.run(["mount", "-t", "fuse.lamina-fs", "lamina-fs", str(mnt), "-o", opts], check=True, env=env,
                   timeout=60)
    try:
        assert is_mounted(mnt) and (mnt / "c").read_text() == "top c\n"
    finally:
        unmount(mnt)
    p = subprocess.Popen([LAMINA_FS, "-f", "-o", opts, str(mnt)])
    try:
        for _ in range(500):
            if is_mounted(mnt):
                break
            time.sleep(0.02)
        assert is_mounted(mnt) and p.poll() is None
        assert (mnt / "c").read_text() == "top c\n"
    finally:
        unmount(mnt)
        assert p.wait(timeout=30) == 0


def test_reader_opened_before_copy_up_sees_the_copy_without_passthrough(layout, scratch):
    """As in kernel overlayfs (4.19+): with -o nopassthrough, an fd opened read-only on a lower file reads the copy
    after a copy-up."""
    results = {}
    for kind, mount, extra in (("kernel", kernel_mount, ""), ("lamina", lamina_mount, "nopassthrough")):
        base = scratch / kind
        for d in ("u", "w", "m"):
            (base / d).mkdir(parents=True)
        with mount(layout["lowers"], base / "m", base / "u", base / "w", extra=extra) as m:
            r = os.open(m / "d" / "x", os.O_RDONLY)
            try:
                first = os.pread(r, 100, 0)
                with open(m / "d" / "x", "r+b") as w:
                    w.write(b"COPIED")
                results[kind] = (first, os.pread(r, 100, 0), os.fstat(r).st_size)
            finally:
                os.close(r)
    assert results["lamina"] == results["kernel"]
    assert results["lamina"][1].startswith(b"COPIED")


BIG = 256 << 10  # above unionfs.fuse.PASSTHROUGH_MIN: lower files this large are opened by passthrough


def _big_lower(scratch: Path) -> Path:
    low = scratch / "low"
    low.mkdir()
    (low / "x").write_bytes(b"x" * BIG)
    (low / "y").write_bytes(b"y" * BIG)
    (low / "small").write_bytes(b"small\n")
    for d in ("u", "w", "m"):
        (scratch / d).mkdir()
    return low


def test_passthrough_lower_file_open_refuses_data_changes_until_closed(scratch):
    """With passthrough the kernel reads an open lower file itself and cannot switch it to a copy: changing the
    file's data fails with ETXTBSY until those opens close (as for a running executable); metadata changes, which
    copy up the same data, and new readers work meanwhile. Small lower files, on the page cache, behave as in
    kernel overlayfs."""
    low = _big_lower(scratch)
    with lamina_mount([low], scratch / "m", scratch / "u", scratch / "w") as m:
        x = m / "x"
        r = os.open(x, os.O_RDONLY)
        try:
            for change in (lambda: open(x, "r+b"), lambda: open(x, "ab"), lambda: os.truncate(x, 0),
                           lambda: os.open(x, os.O_RDONLY | os.O_TRUNC)):
                with pytest.raises(OSError) as e:
                    change()
                assert e.value.errno == errno.ETXTBSY
            os.chmod(x, 0o600)  # copies up, data unchanged
            assert (scratch / "u" / "x").read_bytes() == b"x" * BIG
            assert x.read_bytes() == b"x" * BIG and os.pread(r, 10, 0) == b"x" * 10
            with pytest.raises(OSError) as e:
                open(x, "ab")
            assert e.value.errno == errno.ETXTBSY
        finally:
            os.close(r)
        with open(x, "ab") as w:  # the last lower open closed: the copy takes writes, by passthrough too
            w.write(b"more")
        assert x.read_bytes() == b"x" * BIG + b"more"
        assert stat.S_IMODE(os.stat(x).st_mode) == 0o600
        # a file mapped from the lower layer holds its data as an open file does
        y = m / "y"
        with open(y, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        try:
            with pytest.raises(OSError) as e:
                open(y, "ab")
            assert e.value.errno == errno.ETXTBSY and mapped[:3] == b"yyy"
        finally:
            mapped.close()
        with open(y, "ab") as w:
            w.write(b"+")
        assert y.read_bytes() == b"y" * BIG + b"+"
        # a small file: written at once while open, and the open file reads the copy
        r = os.open(m / "small", os.O_RDONLY)
        try:
            with open(m / "small", "r+b") as w:
                w.write(b"SMALL")
            assert os.pread(r, 100, 0) == b"SMALL\n"
        finally:
            os.close(r)


@contextlib.contextmanager
def _debug_mount(opts: str, mnt: Path, log: Path):
    """lamina-fs in the foreground with libfuse's debug log (every request's opcode) written to `log`."""
    with open(log, "wb") as err:
        p = subprocess.Popen([LAMINA_FS, "-f", "-d", "-o", opts, str(mnt)], stderr=err, stdout=subprocess.DEVNULL)
    try:
        for _ in range(500):
            if is_mounted(mnt):
                break
            time.sleep(0.02)
        else:
            pytest.fail(f"lamina-fs did not mount: {log.read_text(errors='replace')[-500:]}")
        yield mnt
    finally:
        unmount(mnt)
        p.wait(timeout=30)


def _opcodes(log: Path) -> set[str]:
    return {line.split("opcode: ")[1].split()[0] for line in log.read_text(errors="replace").splitlines()
            if "opcode: " in line}


def _opcodes_seen(scratch: Path, extra: str) -> set[str]:
    """FUSE opcodes the daemon received (libfuse's debug log) while a lower file was read and a new file written."""
    scratch.mkdir()
    low = _big_lower(scratch)
    log = scratch / "debug.log"
    opts = f"lowerdir={low},upperdir={scratch / 'u'},workdir={scratch / 'w'}"
    with _debug_mount(opts + extra, scratch / "m", log) as m:
        assert (m / "x").read_bytes() == b"x" * BIG
        (m / "new").write_bytes(b"n" * 10000)
        assert (m / "new").read_bytes() == b"n" * 10000
    return _opcodes(log)


def test_passthrough_reads_and_writes_bypass_the_daemon(scratch):
    """With libfuse 3.16+ (scripts/build-libfuse.sh) and kernel 6.9+, open files (upper ones, and lower ones from
    64 KiB) are read and written by the kernel itself: the daemon sees OPEN and RELEASE but no READ or WRITE."""
    from unionfs import fuse as front
    if not front.HAS_PASSTHROUGH_API:
        pytest.fail(f"lamina runs on libfuse {front.fuse.fuse_version_major}.{front.fuse.fuse_version_minor}: "
                    "scripts/setup.sh should have built libfuse 3.17")
    seen = _opcodes_seen(scratch / "on", "")
    assert {"OPEN", "CREATE", "RELEASE"} <= seen
    assert not {"READ", "WRITE"} & seen
    # the same run without passthrough does send them: the check above can tell
    assert {"READ", "WRITE"} <= _opcodes_seen(scratch / "off", ",nopassthrough")


def _kinds(d: Path, check_ino: bool = True) -> dict[str, str]:
    """name -> d_type of a listing, checking each entry's d_type (and d_ino) against its lstat."""
    out = {}
    with os.scandir(d) as it:
        # listed whole before any lstat: an lstat of an entry READDIRPLUS brought in makes the kernel ask for
        # READDIRPLUS again, while a bare listing continues with plain READDIRs
        entries = list(it)
    for de in entries:
        st = os.lstat(de.path)
        assert not check_ino or de.inode() == st.st_ino, f"{de.name}: d_ino {de.inode()} != st_ino {st.st_ino}"
        kind = "dir" if de.is_dir(follow_symlinks=False) else "link" if de.is_symlink() else \
            "file" if de.is_file(follow_symlinks=False) else "other"
        want = {stat.S_IFDIR: "dir", stat.S_IFLNK: "link", stat.S_IFREG: "file"}.get(stat.S_IFMT(st.st_mode),
                                                                                   "other")
        assert kind == want, f"{de.name}: d_type says {kind}, lstat {want}"
        out[de.name] = kind
    return out


def test_long_listing_gives_every_entry_its_number_and_type(scratch):
    """A listing longer than one READDIRPLUS reply goes on with plain READDIRs, which lamina answers from the
    layers' own listings without a lookup per entry (Overlay.readdir_entries). Each entry's d_ino and d_type must
    still be its lstat's, whatever it is: a lower file, a whiteout's neighbour, a copied-up file (which keeps its
    origin's number), a new upper file, a merged or lower directory, a symlink, a fifo, a hardlink. The names and
    types are kernel overlayfs's over the same layers and upper."""
    l0, l1, upper, work = (scratch / n for n in ("l0", "l1", "u", "w"))
    for d in (l0 / "big", l1 / "big", upper, work, scratch / "m", scratch / "k"):
        d.mkdir(parents=True)
    for i in range(1500):
        (l1 / "big" / f"f{i:04d}").write_text(str(i))
    for i in range(0, 1500, 7):
        os.mknod(l0 / "big" / f"f{i:04d}", stat.S_IFCHR, 0)
    for i in range(300):
        (l0 / "big" / f"g{i:04d}").write_text("g")
    for i in range(60):
        (l1 / "big" / f"d{i:03d}").mkdir()
        if i % 2:
            (l0 / "big" / f"d{i:03d}").mkdir()
    os.symlink("f0001", l1 / "big" / "sym")
    os.mkfifo(l0 / "big" / "fifo")
    os.link(l1 / "big" / "f0002", l1 / "big" / "hard")
    log = scratch / "debug.log"
    with _debug_mount(f"lowerdir={l0}:{l1},upperdir={upper},workdir={work}", scratch / "m", log) as m:
        for i in range(1, 1500, 11):
            if i % 7:
                os.chmod(m / "big" / f"f{i:04d}", 0o600)  # copied up, keeping the lower number
        for i in range(200):
            (m / "big" / f"n{i:03d}").write_text("new")
        os.unlink(m / "big" / "g0000")
        os.rmdir(m / "big" / "d001")
        os.chmod(m / "big" / "d003", 0o700)
        os.truncate(m / "big" / "hard", 1)  # one name of a lower hardlink pair, copied up into the index
        ours = _kinds(m / "big")
    assert "READDIR" in _opcodes(log)  # the plain path ran: the check above covers it
    assert len(ours) == 1500 - 215 + 300 - 1 + 60 - 1 + 3 + 200
    with kernel_mount([l0, l1], scratch / "k", upper, work) as k:
        # (kernel overlayfs itself reports a merged directory's upper number as d_ino without index=on)
        assert _kinds(k / "big", check_ino=False) == ours


@contextlib.contextmanager
def _fresh_mount(scratch: Path, name: str, low: Path):
    """Kernel overlayfs or lamina-fs over `low` with upper, work and mount dirs of its own: (root, upper)."""
    u, w, m = (scratch / f"{name}-{d}" for d in "uwm")
    for d in (u, w, m):
        d.mkdir()
    with (kernel_mount if name == "kernel" else lamina_mount)([low], m, u, w) as root:
        yield root, u


def _long_name_steps(root: Path) -> list:
    """Every operation on names of 252-255 bytes (a `.wh.` prefix would not fit), over lower entries of such
    names and new ones; each step's result or errno."""
    n = {k: c * k for k, c in ((252, "a"), (253, "b"), (254, "c"), (255, "d"))}
    out = []

    def step(fn, *args):
        try:
            r = fn(*args)
            out.append(("ok", r if isinstance(r, (int, str, list)) else None))
        except OSError as e:
            out.append(("err", errno.errorcode[e.errno]))
    step(os.unlink, root / n[255])
    step(lambda: (root / n[255]).write_text("new"))  # over its whiteout
    step(lambda: (root / n[255]).read_text())
    step(os.rmdir, root / "ld" / n[254])
    step(os.mkdir, root / "ld" / n[254], 0o750)  # over its whiteout: opaque
    step(os.listdir, root / "ld" / n[254])
    step(os.unlink, root / n[253])
    step(os.mkfifo, root / n[253], 0o600)
    step(os.unlink, root / n[253])
    step(os.mknod, root / n[253], stat.S_IFCHR | 0o600, os.makedev(1, 3))
    step(os.unlink, root / n[252])
    step(os.symlink, "target", root / n[252])
    step(os.unlink, root / n[252])
    step(os.link, root / "small", root / n[252])
    step(os.rename, root / "ld" / n[253], root / "ld" / n[252])  # lower file to a new name: whiteout left
    step(os.rename, root / "ld" / n[252], root / n[253])  # over the mknod'ed node
    step(os.chmod, root / "ld" / n[255], 0o600)
    step(os.chown, root / "ld" / n[255], 7, 8)
    step(os.truncate, root / "ld" / n[255], 2)
    step(os.mkdir, root / "nd" / n[255], 0o700)
    step(os.rename, root / "nd" / n[255], root / "ld" / n[255])  # ENOTDIR: a file is there
    step(os.rmdir, root / "nd" / n[255])
    step(os.mkdir, root / n[254], 0o700)
    step(lambda: os.rename(root / n[254], root / "nd" / n[254]))
    step(os.rmdir, root / "nd" / n[254])
    step(lambda: sorted(os.listdir(root)))
    step(lambda: sorted(os.listdir(root / "ld")))
    return out


def test_names_of_252_to_255_bytes_work_for_every_operation_as_on_kernel_overlayfs(scratch):
    """Issue 12.3/12.4/12.6: a whiteout of such a name is a char 0/0 node, never a `.wh.` name over NAME_MAX.
    Creating over it once failed (after removing the whiteout: the deleted lower file came back), and a rename to
    such a name reported ENAMETOOLONG after it had happened."""
    low = scratch / "low"
    (low / "ld").mkdir(parents=True)
    (low / "nd").mkdir()
    (low / "small").write_text("s")
    for k, c in ((252, "a"), (253, "b"), (255, "d")):
        (low / (c * k)).write_text(f"lower {k}")
        (low / "ld" / (c * k)).write_text(f"lower ld {k}")
    (low / "ld" / ("c" * 254)).mkdir()
    results, views, uppers = {}, {}, {}
    for name in ("kernel", "lamina"):
        with _fresh_mount(scratch, name, low) as (root, u):
            results[name] = _long_name_steps(root)
            views[name] = snapshot(root, dir_nlink=False)
        uppers[name] = snapshot(u, dir_nlink=False, upper_view=True)
    assert results["lamina"] == results["kernel"]
    assert ("err", "ENAMETOOLONG") not in results["lamina"]
    assert views["lamina"] == views["kernel"]
    assert uppers["lamina"] == uppers["kernel"]
    assert not any(p.rpartition("/")[2].startswith(".wh.") for p in uppers["lamina"])


def test_copy_up_keeps_the_times_of_the_directories_above(scratch):
    """Issue 12.8: copying up a/b/f (by a write-open, a chmod, a truncate) leaves a and a/b with their lower
    times, in the merged view and in the upper, as kernel overlayfs does; a new entry does change its directory."""
    low = scratch / "low"
    (low / "a" / "b").mkdir(parents=True)
    for f in ("f", "g", "h"):
        (low / "a" / "b" / f).write_text(f)
    (low / "c").mkdir()
    (low / "c" / "k").write_text("k")
    for i, p in enumerate([low / "a" / "b" / "f", low / "a" / "b" / "g", low / "a" / "b" / "h", low / "c" / "k",
                           low / "a" / "b", low / "c", low / "a"]):
        os.utime(p, ns=(1_000_000_000_000_000_000 + i, 1_100_000_000_000_000_000 + i))
    times = {}
    for name in ("kernel", "lamina"):
        with _fresh_mount(scratch, name, low) as (root, u):
            with open(root / "a" / "b" / "f", "r+") as f:
                f.write("F")
            os.chmod(root / "a" / "b" / "g", 0o600)
            os.truncate(root / "a" / "b" / "h", 0)
            os.chown(root / "c" / "k", 5, 5)
            (root / "c" / "new").write_text("n")  # a real change of c
            seen = {p: os.lstat(root / p).st_mtime_ns for p in ("a", "a/b", "c")}
        up = {p: os.lstat(u / p).st_mtime_ns for p in ("a", "a/b", "c")}
        times[name] = (seen, up)
    lower = {p: os.lstat(low / p).st_mtime_ns for p in ("a", "a/b")}
    for name in times:
        seen, up = times[name]
        assert {p: seen[p] for p in lower} == lower == {p: up[p] for p in lower}, name
        assert seen["c"] == up["c"] > 1_200_000_000_000_000_000, name


def test_chown_to_unchanged_ids_changes_ctime_and_copies_up_as_on_kernel_overlayfs(scratch):
    """Issue 12.11: chown(path, -1, -1) changes no owner, but ctime, and kernel overlayfs copies up for it. The
    kernel sends it as a SETATTR that sets nothing, which libfuse's high-level API answered by itself until the
    patch scripts/build-libfuse.sh applies."""
    from unionfs import fuse as front
    if not front.HAS_PASSTHROUGH_API:
        pytest.skip("lamina runs on the system's libfuse, not the one scripts/setup.sh builds and patches")
    low = scratch / "low"
    (low / "d").mkdir(parents=True)
    (low / "f").write_text("f")
    (low / "d" / "g").write_text("g")
    seen = {}
    for name in ("kernel", "lamina"):
        with _fresh_mount(scratch, name, low) as (root, u):
            changed = []
            for p in ("f", "d", "d/g", "f"):  # the second time on a file already in the upper directory
                before = os.lstat(root / p)
                time.sleep(0.01)
                os.chown(root / p, -1, -1, follow_symlinks=False)
                after = os.lstat(root / p)
                changed.append((after.st_ctime_ns > before.st_ctime_ns, (after.st_uid, after.st_gid)))
            view = snapshot(root)
        seen[name] = (changed, view, sorted(str(p.relative_to(u)) for p in u.rglob("*")))
    assert seen["lamina"] == seen["kernel"]
    assert seen["lamina"][0] == [(True, (0, 0))] * 4 and seen["lamina"][2] == ["d", "d/g", "f"]
