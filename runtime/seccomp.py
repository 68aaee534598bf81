"""A seccomp filter for the container's command, in the spirit of Docker's default profile, through libseccomp.

Docker's profile is an allow-list of ~350 syscalls; this is the deny-list of what that list leaves out and matters
most on a machine where the container runs with Docker's default capabilities: new namespaces (unshare, setns,
clone with CLONE_NEW* flags — otherwise container root gets a full capability set in a user namespace of its own),
the kernel keyring, module loading, kexec, bpf, perf events, userfaultfd, open_by_handle_at (the "shocker" escape),
the new mount API, clock and swap control, reboot. clone3 answers ENOSYS, as in Docker's profile, so that libc falls
back to clone, whose flags can be inspected. Everything else is allowed.

libseccomp (Debian's libseccomp2, which apt itself depends on) is driven through ctypes: it compiles the BPF program
and knows every architecture's syscall numbers. The library is loaded at import, on the host: after pivot_root the
container's filesystem may have no libseccomp at all.
"""
from __future__ import annotations

import ctypes
import errno

try:
    _lib: ctypes.CDLL | None = ctypes.CDLL("libseccomp.so.2", use_errno=True)
except OSError:
    _lib = None

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_MASKED_EQ = 7

DENIED = (
    "unshare", "setns", "add_key", "keyctl", "request_key", "kexec_load", "kexec_file_load", "bpf",
    "perf_event_open", "userfaultfd", "open_by_handle_at", "init_module", "finit_module", "delete_module",
    "create_module", "get_kernel_syms", "query_module", "reboot", "swapon", "swapoff", "acct", "lookup_dcookie",
    "quotactl", "quotactl_fd", "pivot_root", "mount", "umount", "umount2", "fsopen", "fsmount", "fsconfig",
    "fspick", "move_mount", "open_tree", "mount_setattr", "nfsservctl", "iopl", "ioperm", "syslog",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "stime", "uselib", "vm86", "vm86old",
    "_sysctl", "sysfs", "ustat",
)
NAMESPACE_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


def available() -> bool:
    return _lib is not None


def _act_errno(e: int) -> int:
    return 0x00050000 | (e & 0xFFFF)


def load() -> None:
    """Install the filter on the calling thread's process (needs no_new_privs or CAP_SYS_ADMIN)."""
    if _lib is None:
        raise OSError(errno.ENOSYS, "libseccomp.so.2 is not available")
    _lib.seccomp_init.restype = ctypes.c_void_p
    _lib.seccomp_init.argtypes = [ctypes.c_uint32]
    _lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    _lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                            ctypes.POINTER(_ArgCmp)]
    _lib.seccomp_load.argtypes = [ctypes.c_void_p]
    _lib.seccomp_release.argtypes = [ctypes.c_void_p]
    ctx = _lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        raise OSError(errno.ENOMEM, "seccomp_init failed")
    try:
        def rule(name: str, action: int, cmps: list[_ArgCmp] | None = None) -> None:
            nr = _lib.seccomp_syscall_resolve_name(name.encode())
            if nr < 0:
                return  # not a syscall of this architecture
            arr = (_ArgCmp * len(cmps))(*cmps) if cmps else None
            rc = _lib.seccomp_rule_add_array(ctx, action, nr, len(cmps or []), arr)
            if rc < 0:
                raise OSError(-rc, f"seccomp rule for {name}: {errno.errorcode.get(-rc, rc)}")

        for name in DENIED:
            rule(name, _act_errno(errno.EPERM))
        rule("clone3", _act_errno(errno.ENOSYS))
        for flag in NAMESPACE_FLAGS:
            rule("clone", _act_errno(errno.EPERM), [_ArgCmp(0, SCMP_CMP_MASKED_EQ, flag, flag)])
        rc = _lib.seccomp_load(ctx)
        if rc < 0:
            raise OSError(-rc, f"seccomp_load: {errno.errorcode.get(-rc, rc)}")
    finally:
        _lib.seccomp_release(ctx)
