"""Mount bookkeeping: every mount the benchmark makes lives under one scratch root, so cleanup is a scan.

Cleanup does not trust in-memory state (a crashed trial child or a daemonised FUSE server may have made mounts we
never heard of): it reads /proc/self/mountinfo and unmounts, deepest first, everything under the scratch root.
"""
from __future__ import annotations

import subprocess
import time
from pathlib import Path


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and len(field[i + 1:i + 4]) == 3 and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below `root`, deepest first."""
    prefix = str(root).rstrip("/")
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = _unescape(line.split()[4])
            if mp == prefix or mp.startswith(prefix + "/"):
                found.append(mp)
    return sorted(set(found), key=lambda p: p.count("/"), reverse=True)


def is_mounted(path: Path) -> bool:
    return str(path).rstrip("/") in mounts_under(path)


def unmount(path: Path, timeout: float = 20.0) -> None:
    """Unmount `path` (FUSE or kernel); fall back to a lazy unmount so nothing is left behind."""
    p = str(path)
    for cmd in (["umount", p], ["fusermount3", "-u", p], ["umount", "-l", p]):
        if not is_mounted(path):
            return
        try:
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout)
        except (subprocess.TimeoutExpired, FileNotFoundError):
            continue
    if is_mounted(path):
        raise RuntimeError(f"could not unmount {p}")


def wait_gone(pid: int | None, timeout: float = 10.0) -> None:
    """Wait for a daemon to exit after its unmount, so its teardown does not overlap the next trial."""
    if not pid:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, IndexError):
            return
        if state in ("Z", "X"):  # exited, waiting to be reaped by whoever adopted it
            return
        time.sleep(0.01)


def cleanup_all(root: Path) -> list[str]:
    """Unmount everything under `root`; returns what was still mounted (a leak, when called after a trial)."""
    leaked = mounts_under(root)
    for mp in leaked:
        try:
            unmount(Path(mp))
        except RuntimeError:
            pass
    return leaked
