"""Copying bytes between the caller's terminal or pipes, a container's pty or pipes, and its log, until a process
exits; and the terminal's window size. Used by the supervisor of `lamina run` and by `lamina exec -t`.
"""
from __future__ import annotations

import errno
import fcntl
import os
import select
import signal
import termios


class Relay:
    """Copies container output to the terminal and the log, and terminal input to a pty; wakes on SIGCHLD."""

    def __init__(self) -> None:
        self.outs: dict[int, list[int]] = {}
        self.ins: dict[int, int] = {}
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def run_until_exit(self, pid: int) -> int:
        """Relay until `pid` (a child) has exited and its output is drained; return its wait status."""
        signal.signal(signal.SIGCHLD, lambda s, f: None)  # a handler, so that the wakeup fd hears of it
        signal.set_wakeup_fd(self.wake_w)
        status = None
        try:
            while True:
                if status is None:
                    try:
                        p, st = os.waitpid(pid, os.WNOHANG)
                    except ChildProcessError:
                        p, st = pid, 0
                    if p == pid:
                        status = st
                fds = list(self.outs) + list(self.ins)
                if status is not None and not self.outs:
                    break
                # After the exit, drain what is buffered without waiting for writers that may linger.
                r, _, _ = select.select(fds + [self.wake_r], [], [], 0 if status is not None else None)
                if not r and status is not None:
                    break
                for fd in r:
                    if fd == self.wake_r:
                        try:
                            os.read(self.wake_r, 4096)
                        except BlockingIOError:
                            pass
                        continue
                    try:
                        data = os.read(fd, 65536)
                    except OSError as e:
                        data = b"" if e.errno in (errno.EIO, errno.EBADF) else b""
                    if fd in self.outs:
                        if not data:
                            del self.outs[fd]
                            continue
                        for dst in self.outs[fd]:
                            _write_all(dst, data)
                    else:
                        if not data:
                            del self.ins[fd]
                            continue
                        _write_all(self.ins[fd], data)
        finally:
            signal.set_wakeup_fd(-1)
        return status


def _write_all(fd: int, data: bytes) -> None:
    while data:
        try:
            n = os.write(fd, data)
        except InterruptedError:
            continue
        except OSError:
            return
        data = data[n:]


def winsize() -> bytes | None:
    for fd in (0, 1):
        try:
            return fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8)
        except OSError:
            continue
    return None


def copy_winsize(master: int) -> None:
    ws = winsize()
    if ws is not None:
        try:
            fcntl.ioctl(master, termios.TIOCSWINSZ, ws)
        except OSError:
            pass
