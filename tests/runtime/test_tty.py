"""`run -it`: the command gets a pty from the container's own devpts, sized like the caller's terminal."""
from __future__ import annotations

import fcntl
import os
import select
import struct
import termios

from .conftest import LAMINA, TOP


def _run_in_pty(lamina, args: list[str], feed: bytes = b"") -> tuple[bytes, int]:
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    import subprocess
    p = subprocess.Popen([*LAMINA, *args], stdin=slave, stdout=slave, stderr=slave, env=lamina.env, cwd=TOP,
                         start_new_session=True)
    os.close(slave)
    out = b""
    try:
        if feed:
            os.write(master, feed)
        while True:
            # a guard against a hung test, not a timing assertion
            ready, _, _ = select.select([master], [], [], 60)
            if not ready:
                break
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: every slave handle is closed
                break
            if not data:
                break
            out += data
        return out, p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        os.close(master)


def test_tty_is_the_containers_own_pty(lamina, image):
    out, code = _run_in_pty(lamina, ["run", "--rm", "-it", image, "sh", "-c",
                                     "tty; stty size; echo $TERM; ls -l /dev/console; exit 3"])
    lines = out.decode().splitlines()
    assert code == 3
    assert lines[0] == "/dev/pts/0"
    assert lines[1] == "30 100"
    assert lines[2] == "xterm"
    assert lines[3].startswith("c")


def test_tty_input_reaches_the_command(lamina, image):
    out, code = _run_in_pty(lamina, ["run", "--rm", "-it", image, "sh", "-c", "read line; echo got:$line"],
                            feed=b"hello\n")
    assert code == 0
    assert b"got:hello" in out


def test_tty_job_control(lamina, image):
    # an interactive shell on a controlling terminal can put jobs in the background and list them
    out, code = _run_in_pty(lamina, ["run", "--rm", "-it", image, "sh", "-i"],
                            feed=b"sleep 5 &\njobs\nkill %1\nexit 0\n")
    assert code == 0
    assert b"Running" in out and b"sleep 5" in out


def test_exec_tty(lamina, image):
    r = lamina("run", "-d", "--name", "ttyexec", image, "sleep", "60")
    assert r.returncode == 0, r.stderr
    out, code = _run_in_pty(lamina, ["exec", "-it", "ttyexec", "sh", "-c", "tty; stty size; read x; echo got:$x; exit 4"],
                            feed=b"typed\n")
    lines = [x for x in out.decode().splitlines() if x != "typed"]  # the outer terminal echoes the typed line
    assert code == 4
    assert lines[0].startswith("/dev/pts/")
    assert lines[1] == "30 100"
    assert "got:typed" in lines


def test_window_size_follows_the_terminal(lamina, image):
    import signal
    import subprocess
    import time
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    p = subprocess.Popen([*LAMINA, "run", "--rm", "-it", image, "sh", "-c", "stty size; read x; stty size"],
                         stdin=slave, stdout=slave, stderr=slave, env=lamina.env, cwd=TOP, start_new_session=True)
    os.close(slave)
    out = b""
    try:
        deadline = time.monotonic() + 60  # a guard against a hang, not a timing assertion
        while b"30 100" not in out and time.monotonic() < deadline:
            if select.select([master], [], [], 1)[0]:
                out += os.read(master, 4096)
        assert b"30 100" in out
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 132, 0, 0))
        p.send_signal(signal.SIGWINCH)  # what the kernel sends a terminal's foreground group on a resize
        os.write(master, b"\n")
        while time.monotonic() < deadline:
            if not select.select([master], [], [], 1)[0]:
                continue
            try:
                data = os.read(master, 4096)
            except OSError:
                break
            if not data:
                break
            out += data
        assert p.wait(timeout=30) == 0
        assert b"50 132" in out
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        os.close(master)
