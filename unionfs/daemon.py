"""Running a union mount as a background daemon that reports readiness, as fuse-overlayfs and sshfs do.

The parent forks before any thread exists; the child detaches (new session, stdio closed) and mounts. Until the
kernel has sent FUSE_INIT the child's stderr is a pipe to the parent, so libfuse's own complaints (a busy mountpoint,
a missing /dev/fuse) reach the user; the parent exits 0 on readiness, or prints what the child said and exits 1.
Also: building layers, bounded logging set-up, and the inode tags that keep layers on different devices apart.
"""
from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from .overlay import Overlay

READY = b"\0lamina-ready\0"
log = logging.getLogger("lamina.fs")


def ino_tags(upper: str | None, lower_devs: list[int]) -> list[int]:
    """Per-lower inode tags: 0 for layers on the upper's (or first lower's) device, a distinct high tag otherwise."""
    devs: list[int] = []
    if upper is not None:
        devs.append(os.stat(upper).st_dev)
    tags = []
    for d in lower_devs:
        if d not in devs:
            devs.append(d)
        tags.append(devs.index(d) << 48)
    return tags


def setup_logging(log_path: str | None, debug: bool) -> None:
    root = logging.getLogger("lamina")
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    handler: logging.Handler
    if log_path:
        handler = logging.FileHandler(log_path)
    elif os.path.exists("/dev/log"):
        from logging.handlers import SysLogHandler
        handler = SysLogHandler(address="/dev/log")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s lamina-fs[%(process)d] %(levelname)s %(message)s"))
    root.addHandler(handler)


def run(build: Callable[[], Overlay], mountpoint: str, *, foreground: bool, read_only: bool = False,
        debug: bool = False, fsname: str = "lamina-fs", log_path: str | None = None, prog: str = "lamina-fs") -> int:
    """Mount; in the background unless `foreground`. Returns the exit status for the calling command."""
    from .fuse import serve  # mfusepy loads libfuse at import: keep it out of argument checking

    if foreground:
        os.umask(0)
        setup_logging(log_path, debug)
        serve(build(), mountpoint, read_only=read_only, debug=debug, fsname=fsname)
        return 0
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        got = b""
        while True:
            chunk = os.read(r, 65536)
            if not chunk:
                break
            got += chunk
            if READY in got:
                break
        os.close(r)
        if READY in got:
            return 0
        os.waitpid(pid, 0)
        msg = got.decode("utf-8", "replace").strip().splitlines()
        print(f"{prog}: " + (msg[-1] if msg else "mount failed"), file=sys.stderr)
        return 1
    # child
    os.close(r)
    os.setsid()
    os.chdir("/")
    os.umask(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.dup2(w, 2)
    ready = False

    def on_ready() -> None:
        nonlocal ready
        ready = True
        os.write(w, READY)
        os.close(w)
        out = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if log_path else devnull
        os.dup2(out, 2)

    try:
        setup_logging(log_path, debug)
        serve(build(), mountpoint, read_only=read_only, debug=debug, fsname=fsname, on_ready=on_ready)
    except BaseException as e:  # noqa: BLE001 - the parent must hear about any failure before readiness
        if not ready:
            os.write(w, f"{e}\n".encode())
        os._exit(1)
    os._exit(0)
