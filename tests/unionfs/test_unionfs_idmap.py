"""Owner translation (`-o uidmapping=…,gidmapping=…`): the mapping itself, the core's attributes and new owners
without a mount, and lamina-fs against real fuse-overlayfs with the same options over the same layers."""
from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fsharness import lamina_mount, unmount
from unionfs.idmap import IdMap, IdMapping
from unionfs.layers import DirLayer
from unionfs.overlay import Overlay

MAP = "0:100000:65536"


# -- the mapping --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["", "0:100000", "0:1:2:3", "a:b:c", "0:-1:5", "0:1:2,3:4:5"])
def test_malformed_mappings_are_refused(bad):
    with pytest.raises(ValueError, match="invalid mapping specified"):
        IdMap.parse(bad)


def test_one_range_both_ways_and_overflow():
    m = IdMap.parse(MAP)
    assert [m.to_host(i) for i in (0, 5, 65535, 65536, 70000)] == [100000, 100005, 165535, 65534, 65534]
    assert [m.to_container(i) for i in (100000, 100005, 165535, 99999, 0, 1000)] == [0, 5, 65535, 65534, 65534, 65534]
    assert m.to_container(-1) == -1  # chown's "unchanged"


def test_several_ranges_the_later_one_wins_where_they_overlap():
    m = IdMap.parse("0:1000:1:1:100000:65536")
    assert (m.to_host(0), m.to_host(1), m.to_host(2)) == (1000, 100000, 100001)
    assert (m.to_container(1000), m.to_container(100000), m.to_container(100001)) == (0, 1, 2)
    both = IdMap.parse("0:0:1:0:100000:65536")  # what `lamina run --userns` mounts with
    assert both.to_host(0) == 100000
    assert both.to_container(0) == 0 and both.to_container(100000) == 0


def test_a_side_left_out_is_the_identity():
    m = IdMapping.parse(MAP, None)
    assert m.to_host(0, 0) == (100000, 0)
    assert m.to_container(100007, 7) == (7, 7)
    assert IdMapping.parse(None, None) is None


# -- the core, without a mount --------------------------------------------------------------------------------------


def _stored(p: Path) -> tuple[int, int]:
    st = os.lstat(p)
    return st.st_uid, st.st_gid


def test_core_reports_host_ids_and_stores_container_ids(scratch):
    lower, upper, work = scratch / "lower", scratch / "upper", scratch / "work"
    for d in (lower, upper, work):
        d.mkdir()
    (lower / "rootfile").write_text("r\n")
    (lower / "d").mkdir()
    os.chown(lower / "d", 5, 6)
    (lower / "far").write_text("f\n")
    os.chown(lower / "far", 70000, 70000)
    ov = Overlay([DirLayer(str(lower))], str(upper), str(work), idmap=IdMapping.parse(MAP, MAP))
    owner = lambda path: (lambda a: (a["st_uid"], a["st_gid"]))(ov.getattr(path))  # noqa: E731
    assert owner("/") == (100000, 100000)
    assert owner("/rootfile") == (100000, 100000)
    assert owner("/d") == (100005, 100006)
    assert owner("/far") == (65534, 65534)  # outside the range: the overflow id
    assert ov.child_attrs("/", "d")["st_uid"] == 100005  # readdirplus answers the same

    ov.release(ov.create("/new", 0o644, os.O_WRONLY, (100000, 100000)))
    ov.mkdir("/d/sub", 0o755, (100005, 100007))
    ov.symlink("/link", "new", (100001, 100001))
    ov.mknod("/fifo", stat.S_IFIFO | 0o600, 0, (100002, 100003))
    ov.release(ov.create("/stranger", 0o644, os.O_WRONLY, (1000, 1000)))  # not in the range
    assert _stored(upper / "new") == (0, 0)
    assert _stored(upper / "d" / "sub") == (5, 7)
    assert _stored(upper / "link") == (1, 1)
    assert _stored(upper / "fifo") == (2, 3)
    assert _stored(upper / "stranger") == (65534, 65534)
    assert owner("/new") == (100000, 100000) and owner("/d/sub") == (100005, 100007)

    ov.chown("/rootfile", 100003, -1)  # copy-up, then the new uid; the gid stays
    assert _stored(upper / "rootfile") == (3, 0)
    assert owner("/rootfile") == (100003, 100000)
    ov.chown("/far", 1234, 100009)
    assert _stored(upper / "far") == (65534, 9)


# -- lamina-fs as a drop-in for fuse-overlayfs -------------------------------------------------------------------


@contextlib.contextmanager
def fuse_overlayfs_mount(lower: Path, upper: Path, work: Path, mnt: Path, extra: str) -> Iterator[Path]:
    subprocess.run(["fuse-overlayfs", "-o", f"lowerdir={lower},upperdir={upper},workdir={work},{extra}", str(mnt)],
                   check=True, capture_output=True, timeout=60)
    try:
        yield mnt
    finally:
        unmount(mnt)


def _as(uid: int, gid: int, action) -> None:
    """Run `action()` in a child process with these host ids (and no supplementary groups)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            action()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, f"as {uid}:{gid}"


def _exercise(mnt: Path) -> None:
    _as(100000, 100000, lambda: (mnt / "new").write_text("n\n"))
    _as(100000, 100000, lambda: (mnt / "newdir").mkdir())
    _as(100000, 100000, lambda: os.symlink("new", mnt / "newlink"))
    _as(100000, 100000, lambda: os.mkfifo(mnt / "fifo"))
    _as(100005, 100007, lambda: (mnt / "dir" / "by5").write_text("5\n"))
    (mnt / "byroot").write_text("host root is not mapped\n")
    os.chown(mnt / "a", 100003, 100004)
    os.chown(mnt / "far", 1234, 1234)


PATHS = ("", "a", "dir", "far", "far2", "new", "newdir", "newlink", "fifo", "dir/by5", "byroot")


@pytest.mark.skipif(shutil.which("fuse-overlayfs") is None, reason="fuse-overlayfs is not installed")
def test_lamina_fs_maps_owners_as_fuse_overlayfs_does(scratch):
    os.chmod(scratch, 0o755)  # the mapped users must reach the mount points
    lower = scratch / "lower"
    lower.mkdir()
    (lower / "a").write_text("a\n")
    (lower / "dir").mkdir()
    os.chmod(lower / "dir", 0o777)
    os.chown(lower / "dir", 5, 6)
    for n in ("far", "far2"):
        (lower / n).write_text("far\n")
        os.chown(lower / n, 70000, 70000)
    opts = f"uidmapping={MAP},gidmapping={MAP}"
    seen: dict[str, tuple[dict, dict]] = {}
    for name in ("fuse-overlayfs", "lamina-fs"):
        base = scratch / name
        upper, work, mnt = base / "upper", base / "work", base / "mnt"
        for d in (upper, work, mnt):
            d.mkdir(parents=True)
        os.chmod(base, 0o755)
        mount = fuse_overlayfs_mount(lower, upper, work, mnt, opts) if name == "fuse-overlayfs" else \
            lamina_mount([lower], mnt, upper, work, extra=opts)
        with mount:
            _exercise(mnt)
            shown = {p: _stored(mnt / p) for p in PATHS}
        stored = {p: _stored(upper / p) for p in PATHS if p and os.path.lexists(upper / p)}
        seen[name] = (shown, stored)
    assert seen["lamina-fs"] == seen["fuse-overlayfs"]
    shown, stored = seen["lamina-fs"]
    assert shown[""] == (100000, 100000) and shown["dir"] == (100005, 100006) and shown["a"] == (100003, 100004)
    assert shown["new"] == (100000, 100000) and stored["new"] == (0, 0)
    assert stored["dir/by5"] == (5, 7) and stored["a"] == (3, 4)
    assert shown["far2"] == (65534, 65534)  # a stored id outside the range shows as the overflow id
    assert stored["byroot"] == stored["far"] == (65534, 65534)  # and an unmapped host id is stored as it
