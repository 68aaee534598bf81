"""The background daemon's own mount(2) (`unionfs.daemon.kernel_mount`): the same mount libfuse makes, and taken
down as libfuse takes its own down, but never someone else's."""
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
