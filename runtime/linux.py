"""Thin ctypes wrappers for the Linux calls Python 3.11 lacks: unshare, setns, mount, umount2, pivot_root,
sethostname, prctl and capset.

Why ctypes and not a library: os.unshare/os.setns only arrived in Python 3.12, and the maintained wrappers
(python-prctl, pyroute2) cover a fraction each while pulling in C builds or large dependencies. Every call raises
OSError with the real errno (use_errno=True), so callers can tell EPERM from EINVAL.
"""
from __future__ import annotations

import ctypes
import errno
import os
import platform

_libc = ctypes.CDLL(None, use_errno=True)

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_RELATIME = 1 << 21
MNT_DETACH = 2

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

# Docker's default capability set (moby oci/caps/defaults.go).
CAPS = {
    "CHOWN": 0, "DAC_OVERRIDE": 1, "FOWNER": 3, "FSETID": 4, "KILL": 5, "SETGID": 6, "SETUID": 7, "SETPCAP": 8,
    "NET_BIND_SERVICE": 10, "NET_RAW": 13, "SYS_CHROOT": 18, "MKNOD": 27, "AUDIT_WRITE": 29, "SETFCAP": 31,
}
DEFAULT_CAPS = frozenset(CAPS.values())

_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}.get(platform.machine(), 155)
_SYS_OPENAT2 = 437  # the same number on every architecture
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10


def _check(ret: int, what: str, path: str | None = None) -> int:
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}", path)
    return ret


def _b(s: str | bytes | None) -> bytes | None:
    if s is None or isinstance(s, bytes):
        return s
    return os.fsencode(s)


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def setns(fd: int, nstype: int = 0) -> None:
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), "setns")


def mount(source: str | None, target: str, fstype: str | None = None, flags: int = 0, data: str | None = None) -> None:
    _check(_libc.mount(_b(source), _b(target), _b(fstype), ctypes.c_ulong(flags), _b(data)), "mount", target)


# statvfs's f_flag bits for these are the MS_ values; a bind remount must repeat them or it clears them.
_PER_MOUNT = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC | 1024 | 2048  # noatime, nodiratime


def remount(path: str, add: int = 0, clear: int = 0) -> None:
    """Change the flags of the mount at `path` (this mount only, not its filesystem), keeping the others."""
    flags = (os.statvfs(path).f_flag & _PER_MOUNT | add) & ~clear
    mount(None, path, None, MS_BIND | MS_REMOUNT | flags)


def umount2(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_b(target), ctypes.c_int(flags)), "umount", target)


def pivot_root(new_root: str, put_old: str) -> None:
    _check(_libc.syscall(ctypes.c_long(_SYS_PIVOT_ROOT), _b(new_root), _b(put_old)), "pivot_root", new_root)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def openat2(dirfd: int, path: str, flags: int, resolve: int) -> int:
    """openat2(2): open `path` below `dirfd` under the `resolve` rules (RESOLVE_IN_ROOT: as if chrooted there)."""
    how = _OpenHow(flags | os.O_CLOEXEC, 0, resolve)
    return _check(_libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dirfd), _b(path), ctypes.byref(how),
                                ctypes.c_size_t(ctypes.sizeof(how))), "openat2", path)


def sethostname(name: str) -> None:
    b = name.encode()
    _check(_libc.sethostname(b, ctypes.c_size_t(len(b))), "sethostname")


def set_comm(name: bytes) -> None:
    """PR_SET_NAME: the process's comm (15 bytes at most)."""
    buf = ctypes.create_string_buffer(name[:15])
    _check(_libc.prctl(ctypes.c_int(15), buf, ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)), "prctl")


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(_libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(arg3),
                              ctypes.c_ulong(arg4), ctypes.c_ulong(arg5)), "prctl")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return 40


def drop_capabilities(keep: frozenset[int] = DEFAULT_CAPS) -> None:
    """Limit the bounding set to `keep` and set effective and permitted to it; clear inheritable and ambient."""
    drop_bounding(keep)
    set_capabilities(keep)


def drop_bounding(keep: frozenset[int]) -> None:
    """Remove every capability not in `keep` from the bounding set (needs CAP_SETPCAP: do it before setuid)."""
    for cap in range(last_cap() + 1):
        if cap not in keep:
            try:
                prctl(PR_CAPBSET_DROP, cap)
            except OSError as e:
                if e.errno != errno.EINVAL:  # EINVAL: a capability this kernel does not know
                    raise


def set_capabilities(keep: frozenset[int]) -> None:
    """Effective and permitted sets to `keep` (only lowering is possible); inheritable and ambient emptied, as
    Docker and podman leave them: an inheritable capability would pass to a program whose file grants it."""
    try:
        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    except OSError:
        pass
    mask = 0
    for cap in keep:
        mask |= 1 << cap
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        word = (mask >> (32 * i)) & 0xFFFFFFFF
        data[i].effective = data[i].permitted = word
    _check(_libc.capset(ctypes.byref(hdr), data), "capset")


def close_fds_from(low: int, keep: tuple[int, ...] = ()) -> None:
    """Close every fd >= low except `keep` (CVE-2024-21626: no host fd may reach the container's command)."""
    try:
        fds = [int(n) for n in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(low, 1024))
    for fd in fds:
        if fd >= low and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass
