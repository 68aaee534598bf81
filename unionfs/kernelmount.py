"""Mounting and unmounting kernel overlayfs for the kernel driver (`kerneltree`): the mount(2) call and its options.

mount(2) through libc, not mount(8): one syscall, no fork, and the options reach the kernel exactly as written.
"""
from __future__ import annotations

import ctypes
import os

from .kerneltree import MOUNT_OPTS

_libc = ctypes.CDLL(None, use_errno=True)
_MS_RDONLY = 1
_MNT_DETACH = 2
# The kernel copies mount options into one page.
_OPTS_MAX = 4095


def options(lowers: list[str], data: str, upper: str | None, work: str | None) -> str:
    """overlayfs options for metadata trees `lowers` (topmost first) over data-only layer `data`."""
    for p in (*lowers, data, upper or "", work or ""):
        if any(c in p for c in ",:\\"):
            raise OSError(f"{p}: overlayfs cannot take a path holding ',', ':' or '\\\\'")
    opts = f"lowerdir={':'.join(lowers)}::{data},{MOUNT_OPTS}"
    if upper is not None:
        opts += f",upperdir={upper},workdir={work}"
    if len(opts) > _OPTS_MAX:
        raise OSError(f"overlayfs options for {len(lowers)} layers exceed one page ({len(opts)} bytes)")
    return opts


def mount_overlay(lowers: list[str], data: str, target: str, upper: str | None, work: str | None,
                  read_only: bool = False) -> None:
    """Mounts the union of `lowers` (topmost first) over data-only layer `data` with an optional upper at
    `target`; OSError (naming the errno) on failure."""
    opts = options(lowers, data, upper, work)
    if _libc.mount(b"lamina", os.fsencode(target), b"overlay", _MS_RDONLY if read_only else 0,
                   opts.encode()) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"kernel overlayfs mount: {os.strerror(e)}", target)


def umount(target: str) -> None:
    if _libc.umount2(os.fsencode(target), 0) != 0:
        _libc.umount2(os.fsencode(target), _MNT_DETACH)
