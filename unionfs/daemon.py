"""Running a union mount as a background daemon that reports readiness, as fuse-overlayfs and sshfs do.

The parent forks before any thread exists; the child detaches (new session, stdio closed), imports the FUSE side
(mfusepy and the union core load only there, so the calling command never pays for them) and mounts. Until the
kernel has sent FUSE_INIT the child's stderr is a pipe to the parent, so libfuse's own complaints (a busy mountpoint,
a missing /dev/fuse) reach the user; the parent exits 0 on readiness, or prints what the child said and exits 1.
`start` returns as soon as the child is forked, so a caller can do other work while the daemon starts, and hears
the outcome from `Starting.wait` (readiness is a message on a pipe: nothing polls). A `Standby` daemon is forked
even before its mount is known (`lamina run` forks one before it loads its own runtime) and takes it later.
Also: building layers, bounded logging set-up, and the inode tags that keep layers on different devices apart.
"""
from __future__ import annotations

import importlib
import os
import struct
import sys

# `lamina` forks a mount's daemon from here before it has loaded typing, signal (their enums: ~5 ms each) or pickle:
# none of them at import time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NoReturn

    from .overlay import Overlay

READY = b"\0lamina-ready\0"


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
    import logging  # noqa: PLC0415 - only the daemon logs

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


def exit_now(code: int) -> NoReturn:
    """End the calling command without the interpreter's teardown (freeing every module costs milliseconds that
    whoever waits for the mount would wait too); only once all it holds is released."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def kernel_mount(mountpoint: str, *, read_only: bool, fsname: str) -> tuple[int, int] | None:
    """mount(2) the FUSE filesystem the way libfuse would for `fuse.serve`'s options and return two descriptors of
    its /dev/fuse connection: one for `serve`, to be given as "/dev/fd/N" (libfuse then serves it without mounting,
    and closes it when it stops), one for `kernel_unmount`. None where libfuse must mount (not root, or an
    /etc/mtab file to update).

    libfuse follows its own mount(2) with a fork and exec of `mount -f` to record the mount in /etc/mtab: ~2.5 ms
    of every mount, for nothing where /etc/mtab is the kernel's list (a symlink to /proc/self/mounts). The options
    are those libfuse derives from `serve`'s (allow_other, default_permissions, max_read; dev and suid as root;
    ro): tests/unionfs compare them with a mount libfuse made (`-f`)."""
    if os.geteuid() != 0 or not os.path.islink("/etc/mtab"):
        return None
    import ctypes  # noqa: PLC0415 - loaded by mfusepy already

    from .fuse import IO_SIZE  # noqa: PLC0415

    rootmode = os.stat(mountpoint).st_mode & 0o170000
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    data = (f"allow_other,default_permissions,max_read={IO_SIZE},fd={fd},rootmode={rootmode:o},"
            f"user_id={os.getuid()},group_id={os.getgid()}")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
    if libc.mount(fsname.encode(), os.fsencode(mountpoint), b"fuse.lamina-fs", 1 if read_only else 0,  # MS_RDONLY
                  data.encode()) != 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise OSError(err, f"fuse: mount failed: {os.strerror(err)}")
    return fd, os.dup(fd)


def kernel_unmount(mountpoint: str, fd: int) -> None:
    """After `serve` returns: unmount what `kernel_mount` mounted unless it is gone already (a umount ended the
    serving), as libfuse does for its own mounts. A connection the kernel still has is not in error."""
    import ctypes  # noqa: PLC0415
    import select  # noqa: PLC0415

    p = select.poll()
    p.register(fd, 0)
    gone = any(ev & select.POLLERR for _, ev in p.poll(0))
    os.close(fd)  # the connection ends here: no request may wait on a daemon that has stopped
    if not gone:
        ctypes.CDLL(None, use_errno=True).umount2(os.fsencode(mountpoint), 2)  # MNT_DETACH


class Starting:
    """A daemon forked by `start`: `wait` blocks until it has mounted (0) or failed (1, its last words in
    `error`)."""

    def __init__(self, pid: int, ready_fd: int) -> None:
        self.pid = pid
        self._r = ready_fd
        self._got = b""
        self.status: int | None = None
        self.error = ""

    def wait(self) -> int:
        if self.status is not None:
            return self.status
        while READY not in self._got:
            chunk = os.read(self._r, 65536)  # an interruption (Ctrl-C) leaves the state for another wait
            if not chunk:
                break
            self._got += chunk
        os.close(self._r)
        if READY in self._got:
            self.status = 0
            return 0
        os.waitpid(self.pid, 0)
        msg = self._got.decode("utf-8", "replace").strip().splitlines()
        self.error = msg[-1] if msg else "mount failed"
        self.status = 1
        return 1


def run(build: Callable[[], Overlay], mountpoint: str, *, foreground: bool, read_only: bool = False,
        debug: bool = False, fsname: str = "lamina-fs", log_path: str | None = None, prog: str = "lamina-fs") -> int:
    """Mount; in the background unless `foreground`. Returns the exit status for the calling command."""
    if foreground:
        from .fuse import serve  # noqa: PLC0415 - mfusepy loads libfuse at import: keep it out of argument checking

        os.umask(0)
        setup_logging(log_path, debug)
        serve(build(), mountpoint, read_only=read_only, debug=debug, fsname=fsname)
        return 0
    starting = start(build, mountpoint, read_only=read_only, debug=debug, fsname=fsname, log_path=log_path)
    if starting.wait() != 0:
        print(f"{prog}: {starting.error}", file=sys.stderr)
    return starting.status or 0


def _close_inherited(keep: tuple[int, ...]) -> None:
    """A daemon keeps none of its caller's descriptors (an end of a pipe or socket held here would keep the
    caller's other children from seeing it close)."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def start(build: Callable[[], Overlay], mountpoint: str, *, read_only: bool = False, debug: bool = False,
          fsname: str = "lamina-fs", log_path: str | None = None) -> Starting:
    """Fork the daemon that mounts `build()` at `mountpoint` and serves it; return at once."""
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid:
        os.close(w)
        return Starting(pid, r)
    os.close(r)
    opts = {"read_only": read_only, "debug": debug, "fsname": fsname, "log_path": log_path}
    _daemon(w, lambda: (build, mountpoint, opts))


class Standby:
    """A daemon forked before its mount is known, so that it detaches and loads the FUSE side (and `preload`'s
    modules) while its caller still works out what to mount; `mount` then hands it the mount. `cancel`, or the
    caller's exit (end of file on the job pipe), ends it unmounted."""

    def __init__(self, preload: tuple[str, ...] = ()) -> None:
        job_r, self._job_w = os.pipe2(os.O_CLOEXEC)
        r, w = os.pipe2(os.O_CLOEXEC)
        self.pid = os.fork()
        if self.pid:
            os.close(job_r)
            os.close(w)
            self._ready_r = r
            return
        os.close(self._job_w)
        os.close(r)
        _daemon(w, lambda: _read_job(job_r), preload, keep=(job_r,))

    def mount(self, factory: Callable[..., Callable[[], Overlay]], args: dict, mountpoint: str, *,
              read_only: bool = False, debug: bool = False, fsname: str = "lamina-fs",
              log_path: str | None = None) -> Starting:
        """Mount `factory(**args)()` (a module-level factory: the job is pickled) at `mountpoint`."""
        import pickle  # noqa: PLC0415

        job = pickle.dumps((factory, args, mountpoint, {"read_only": read_only, "debug": debug, "fsname": fsname,
                                                        "log_path": log_path}))
        # Length first: the daemon must not wait for end of file, which other children of the caller may delay.
        view = memoryview(struct.pack("!Q", len(job)) + job)
        try:
            while view:
                view = view[os.write(self._job_w, view):]
        except BrokenPipeError:
            pass  # the daemon died meanwhile: it says why on the ready pipe
        finally:
            os.close(self._job_w)
            self._job_w = -1
        return Starting(self.pid, self._ready_r)

    def cancel(self) -> None:
        """End a daemon that was never given its mount (it has mounted nothing)."""
        if self._job_w < 0:
            return
        os.close(self._job_w)
        os.close(self._ready_r)
        self._job_w = -1
        os.kill(self.pid, 9)  # SIGKILL (signal's import costs more than this whole call)
        os.waitpid(self.pid, 0)


def _read_job(fd: int) -> tuple[Callable[[], Overlay], str, dict]:
    data = b""
    size = 8
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            os._exit(0)  # end of file first: the caller needed no mount after all, or is gone
        data += chunk
        if size == 8 and len(data) == 8:
            size += struct.unpack("!Q", data)[0]
    os.close(fd)
    import pickle  # noqa: PLC0415

    factory, args, mountpoint, opts = pickle.loads(data[8:])
    return factory(**args), mountpoint, opts


def _daemon(w: int, job: Callable[[], tuple[Callable[[], Overlay], str, dict]], preload: tuple[str, ...] = (),
            keep: tuple[int, ...] = ()) -> NoReturn:
    """The daemon's side of `start` and `Standby`: detach, load the FUSE side, take the job, mount, serve."""
    import signal  # noqa: PLC0415 - see the imports

    for sig in (signal.SIGTERM, signal.SIGHUP):  # libfuse installs its handlers only over the defaults
        signal.signal(sig, signal.SIG_DFL)
    os.setsid()
    os.chdir("/")
    os.umask(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.dup2(w, 2)
    _close_inherited(keep=(w, devnull, *keep))
    ready = False
    log_path: str | None = None

    def on_ready() -> None:
        nonlocal ready
        ready = True
        os.write(w, READY)
        os.close(w)
        out = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if log_path else devnull
        os.dup2(out, 2)

    try:
        from .fuse import serve  # noqa: PLC0415 - imported here, in the daemon only

        for name in preload:
            importlib.import_module(name)
        build, mountpoint, opts = job()
        log_path = opts["log_path"]
        setup_logging(log_path, opts["debug"])
        ov = build()
        mounted = kernel_mount(mountpoint, read_only=opts["read_only"], fsname=opts["fsname"])
        try:
            serve(ov, mountpoint if mounted is None else f"/dev/fd/{mounted[0]}", read_only=opts["read_only"],
                  debug=opts["debug"], fsname=opts["fsname"], on_ready=on_ready)
        finally:
            if mounted is not None:
                kernel_unmount(mountpoint, mounted[1])
    except BaseException as e:  # noqa: BLE001 - the parent must hear about any failure before readiness
        if not ready:
            os.write(w, f"{e}\n".encode())
        os._exit(1)
    os._exit(0)
