"""The background daemon's own mount(2) (`unionfs.daemon.kernel_mount`): the same mount libfuse makes, and taken
down as libfuse takes its own down, but never someone else's. And the transport it serves requests by."""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fsharness import LAMINA_FS, is_mounted, lamina_mount, lamina_pid, unmount


def _mountinfo(mnt: Path) -> tuple[str, ...]:
    """What the kernel says of the mount at `mnt`, without its ids: options, type, source, super options."""
    p = os.path.realpath(mnt)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == p:
                sep = fields.index("-")
                return (fields[5], *fields[sep + 1:])
    raise AssertionError(f"{mnt} not mounted")


def _ended(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _wait(cond, what: str) -> None:
    for _ in range(250):
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(what)


@pytest.mark.parametrize("writable", [True, False])
def test_background_mount_is_the_mount_libfuse_makes(layout, writable):
    upper, work = (layout["upper"], layout["work"]) if writable else (None, None)
    mnt = layout["mnt"]
    with lamina_mount(layout["lowers"], mnt, upper, work):
        ours = _mountinfo(mnt)
    opts = "lowerdir=" + ":".join(map(str, layout["lowers"]))
    if writable:
        opts += f",upperdir={upper},workdir={work}"
    p = subprocess.Popen([LAMINA_FS, "-f", "-o", opts, str(mnt)])  # -f: libfuse mounts
    try:
        _wait(lambda: is_mounted(mnt), "no foreground mount")
        assert _mountinfo(mnt) == ours
        assert ("ro" if not writable else "rw") in ours[0].split(",")
    finally:
        unmount(mnt)
        assert p.wait(timeout=30) == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_stopped_daemon_takes_its_mount_down(layout, sig):
    mnt = layout["mnt"]
    with lamina_mount(layout["lowers"], mnt, layout["upper"], layout["work"]):
        pid = lamina_pid(mnt)
        assert pid is not None and (mnt / "c").read_text() == "top c\n"
        os.kill(pid, sig)
        _wait(lambda: not is_mounted(mnt), f"mount left behind after {sig.name}")
        _wait(lambda: _ended(pid), "daemon still running")


def test_ended_daemon_leaves_the_next_mount_alone(layout):
    """A daemon whose mount was unmounted must not unmount what is mounted at the same place by then. The mount is
    detached while a descriptor keeps it alive, a tmpfs takes its place, and only then does the descriptor close,
    ending the FUSE mount and its daemon."""
    mnt = layout["mnt"]
    libc = ctypes.CDLL(None, use_errno=True)
    with lamina_mount(layout["lowers"], mnt):
        pid = lamina_pid(mnt)
        assert pid is not None
        path = os.fsencode(mnt)
        fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert libc.umount2(path, 2) == 0, os.strerror(ctypes.get_errno())  # MNT_DETACH
            assert libc.mount(b"tmpfs", path, b"tmpfs", 0, b"size=1m") == 0, os.strerror(ctypes.get_errno())
        finally:
            os.close(fd)
        try:
            _wait(lambda: _ended(pid), "daemon still running")
            assert _mountinfo(mnt)[1] == "tmpfs"
        finally:
            unmount(mnt)


URING_PARAM = Path("/sys/module/fuse/parameters/enable_uring")


def _ring_threads(pid: int) -> list[str]:
    names = []
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            names.append(Path(f"/proc/{pid}/task/{t}/comm").read_text().strip())
        except FileNotFoundError:
            pass
    return sorted(n for n in names if n.startswith("fuse-ring-"))


def test_requests_come_over_io_uring_where_the_kernel_offers_it(layout):
    """FUSE-over-io-uring (libfuse 3.18, `fuse.enable_uring`, which scripts/setup.sh turns on): one ring thread per
    CPU serves the mount. `-o noio_uring`, or the kernel's parameter off, leave /dev/fuse to libfuse's workers.
    The parameter is the kernel's, read at each mount's INIT: set for each case and put back after."""
    from unionfs import fuse as front
    if not front.HAS_IO_URING_OPTION:
        # setup falls back to trixie's 3.17 (passthrough, no io_uring) when forky's source cannot be had; it says so
        pytest.skip(f"lamina runs on libfuse {front.fuse.fuse_version_major}.{front.fuse.fuse_version_minor}, "
                    "without io_uring (scripts/setup.sh's output says why)")
    if not URING_PARAM.exists():
        pytest.skip("this kernel has no FUSE-over-io-uring (Linux 6.14+)")
    before = URING_PARAM.read_text().strip()
    mnt = layout["mnt"]
    try:
        for param, extra, rings in (("Y", "", os.cpu_count()), ("Y", "noio_uring", 0), ("N", "", 0)):
            URING_PARAM.write_text(param)
            with lamina_mount(layout["lowers"], mnt, layout["upper"], layout["work"], extra=extra):
                assert (mnt / "c").read_text() == "top c\n"
                (mnt / "new").write_text("over the ring\n")
                assert (mnt / "new").read_text() == "over the ring\n"
                pid = lamina_pid(mnt)
                _wait(lambda: len(_ring_threads(pid)) == rings,
                      f"enable_uring={param} {extra}: ring threads {_ring_threads(pid)}, want {rings}")
            os.unlink(layout["upper"] / "new")
    finally:
        URING_PARAM.write_text(before)
