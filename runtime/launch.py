"""The container's process tree and everything done inside its namespaces.

    supervisor (lamina run, or its detached shim; subreaper; outside every container namespace and cgroup)
     └─ P1 (`Prestart`, forked while the caller still prepares): joins the container cgroup, then receives its
        Launch and stdio over a socket; in a new mount namespace, still host root, binds the rootfs on itself with
        the volumes in it; unshares the user namespace (the supervisor writes uid/gid maps), then the UTS, IPC,
        network, PID and cgroup namespaces (and a mount namespace owned by the user namespace); forks P2, reports
        its pid and exits
         └─ P2 = PID 1 (this module's init): /proc, /dev, /sys, pivot_root, masked and read-only paths, hostname,
            lo up; forks P3 (held, with a memory limit on v1, until the supervisor has taken the init out of the
            memory cgroup), then reaps zombies and forwards signals until P3 exits, and exits with its status
            (128+N for a signal)
             └─ P3: the command: new session (controlling tty with -t), no_new_privs, Docker's capabilities,
                setgroups/setgid/setuid, fds >= 3 closed, execve. Exec failures are reported as 126/127.

Every step runs in a freshly forked single-threaded process: unshare(CLONE_NEWUSER) and setns into a mount namespace
fail in a threaded one. After pivot_root the init can import nothing, so all imports are at module level, and it
makes itself non-dumpable so a container process cannot open the host interpreter through /proc/1/exe.
`join` does the same for `lamina exec` with setns.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import pickle
import signal
import socket
import stat
import struct
import termios
from collections.abc import Callable
from dataclasses import dataclass, field

from . import linux, seccomp

FORWARDED = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2,
             signal.SIGWINCH, signal.SIGALRM, signal.SIGCONT, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
MASKED = ("/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
          "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware", "/sys/devices/virtual/powercap")
READONLY = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
NS_FILES = (("user", linux.CLONE_NEWUSER), ("ipc", linux.CLONE_NEWIPC), ("uts", linux.CLONE_NEWUTS),
            ("net", linux.CLONE_NEWNET), ("pid", linux.CLONE_NEWPID), ("cgroup", linux.CLONE_NEWCGROUP),
            ("mnt", linux.CLONE_NEWNS))


class StartError(Exception):
    def __init__(self, message: str, code: int = 125):
        super().__init__(message)
        self.code = code


@dataclass
class Process:
    """What P3 (or an exec'd process) runs and as whom."""
    argv: list[str]
    env: list[str]
    cwd: str = "/"
    uid: int = 0
    gid: int = 0
    groups: list[int] = field(default_factory=list)
    tty: bool = False
    caps: frozenset[int] = linux.DEFAULT_CAPS    # for root; a non-root user gets none
    seccomp: bool = True                         # runtime.seccomp's filter, loaded just before execve


@dataclass
class Launch:
    rootfs: str                                  # host path of the mounted rootfs
    hostname: str
    process: Process
    network: str = "none"
    userns: tuple[int, int] | None = None        # (first host uid/gid, count) mapped from container 0
    binds: list[tuple[str, str, bool]] = field(default_factory=list)  # (host source, host target in rootfs, ro)
    read_only: bool = False
    cgroup_version: int = 1
    cgroup_mounts: list[tuple[str, str]] = field(default_factory=list)  # v1: (dir name, mount options)
    tty_socket: int | None = None                # -t: the init sends the master of a pty made in the container here
    winsize: bytes | None = None                 # -t: the caller's struct winsize, set before the command starts
    hold_init: bool = False                      # the command waits until the supervisor has called release_init


# -- small helpers -------------------------------------------------------------------------------------------


def _send(fd: int, msg: dict) -> None:
    os.write(fd, (json.dumps(msg) + "\n").encode())


def _read_byte(fd: int) -> bytes:
    while True:
        try:
            return os.read(fd, 1)
        except InterruptedError:
            continue


def _write_file(path: str, data: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)


def exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


# -- P1 ------------------------------------------------------------------------------------------------------


class Prestart:
    """P1, forked before its Launch exists. It joins the container's cgroup at once: on cgroup v1 a move between
    cgroups waits for an RCU grace period (~10 ms), which so passes while the caller is still preparing (the root
    filesystem's daemon starting). Then it waits for `spawn` to send the Launch and the stdio descriptors.
    `cancel` ends it (a rollback); so does the caller's death (end of file on the socket)."""

    def __init__(self, add_to_cgroup: Callable[[int], None]) -> None:
        self.go, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.rep_r, rep_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                self.go.close()
                os.close(self.rep_r)
                _p1(add_to_cgroup, child, rep_w)
            except BaseException as e:  # noqa: BLE001 - anything must reach the supervisor as a message
                try:
                    _send(rep_w, {"error": f"container setup: {e}", "code": 125})
                except OSError:
                    pass
            os._exit(125)
        child.close()
        os.close(rep_w)

    def cancel(self) -> None:
        if self.pid:
            self.go.close()
            os.close(self.rep_r)
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass
            self.pid = 0


def spawn(L: Launch, stdio: tuple[int, int, int], pre: Prestart,
          release_init: Callable[[int], None] | None = None) -> tuple[int, list[dict]]:
    """Start the container in P1 `pre`; return (init's host pid, reports). Raises StartError if it could not be
    set up.

    With L.hold_init, `release_init(init_pid)` runs once the command is forked and before it execs (to take the
    init out of a limited memory cgroup, so that the OOM killer only ever chooses among the command's processes).
    Reports after the pid are P2's: {"started": true} once the command is exec'd, or {"error", "code"}.
    """
    pid1, go = pre.pid, pre.go
    reader = os.fdopen(pre.rep_r, "rb")
    init_pid = 0
    try:
        data = pickle.dumps(L)
        fds = [*stdio, *([L.tty_socket] if L.tty_socket is not None else [])]
        try:
            socket.send_fds(go, [struct.pack("!Q", len(data))], fds)
            go.sendall(data)
        except OSError:  # P1 died (it could not join the cgroup): its last words say why
            msg = json.loads(reader.readline() or b"{}")
            raise StartError(msg.get("error", "container setup failed"), msg.get("code", 125)) from None
        if L.userns:
            msg = json.loads(reader.readline() or b"{}")
            if not msg.get("userns"):
                raise StartError(msg.get("error", "container setup failed before the user namespace"))
            host, count = L.userns
            _write_file(f"/proc/{pid1}/uid_map", f"0 {host} {count}\n")
            _write_file(f"/proc/{pid1}/gid_map", f"0 {host} {count}\n")
            _go(go.fileno(), b"m", reader)
        msg = json.loads(reader.readline() or b"{}")
        if "pid" not in msg:
            raise StartError(msg.get("error", "container setup failed"), msg.get("code", 125))
        init_pid = msg["pid"]
        if L.hold_init:
            msg = json.loads(reader.readline() or b"{}")
            if "held" not in msg:
                raise StartError(msg.get("error", "container setup failed"), msg.get("code", 125))
            if release_init is not None:
                release_init(init_pid)
            _go(go.fileno(), b"r", reader)
        reports = [json.loads(line) for line in reader]  # until P2 closes its end: started, or an error
    except BaseException:
        if init_pid:
            try:
                os.kill(init_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        raise
    finally:
        reader.close()
        go.close()
        try:
            os.waitpid(pid1, 0)
        except ChildProcessError:
            pass
        pre.pid = 0
    return init_pid, reports


def _go(fd: int, byte: bytes, reader) -> None:
    try:
        os.write(fd, byte)
    except BrokenPipeError:  # P1 died: its last words say why
        msg = json.loads(reader.readline() or b"{}")
        raise StartError(msg.get("error", "container setup failed"), msg.get("code", 125)) from None


def _receive_launch(go: socket.socket) -> tuple[Launch, tuple[int, int, int]]:
    """The Launch and the descriptors `spawn` sends; end of file (the caller gave up) ends P1."""
    head, fds, _, _ = socket.recv_fds(go, 8, 4)
    while head and len(head) < 8:
        head += go.recv(8 - len(head))
    if len(head) < 8:
        os._exit(125)
    size = struct.unpack("!Q", head)[0]
    buf = bytearray()
    while len(buf) < size:
        chunk = go.recv(min(size - len(buf), 1 << 20))
        if not chunk:
            os._exit(125)
        buf += chunk
    L = pickle.loads(buf)
    if L.tty_socket is not None:
        L.tty_socket = fds[3]
    return L, (fds[0], fds[1], fds[2])


def _p1(add_to_cgroup: Callable[[int], None], go: socket.socket, rep_w: int) -> None:
    try:
        add_to_cgroup(os.getpid())  # first, the longest wait; before the cgroup namespace, which is rooted here
    except OSError as e:
        _send(rep_w, {"error": f"joining the container cgroup: {e}", "code": 125})
        os._exit(125)
    os.setsid()  # the terminal's Ctrl-C goes to the supervisor only, which forwards it once
    linux.close_fds_from(3, keep=(go.fileno(), rep_w))  # nothing the caller had open at the fork stays here
    # Best effort: the init should not be the OOM killer's choice (P3 resets this to 0 before exec). Lowering needs
    # CAP_SYS_RESOURCE, which some hosts withhold even from root; on v1 a limited init leaves the memory cgroup.
    try:
        _write_file("/proc/self/oom_score_adj", "-999")
    except PermissionError:
        pass
    L, stdio = _receive_launch(go)
    go_r = go.fileno()
    _bind_rootfs(L)
    if L.userns:
        linux.unshare(linux.CLONE_NEWUSER)
        _send(rep_w, {"userns": True})
        if _read_byte(go_r) != b"m":
            os._exit(125)
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
    flags = linux.CLONE_NEWUTS | linux.CLONE_NEWIPC | linux.CLONE_NEWPID | linux.CLONE_NEWCGROUP
    if L.userns:
        flags |= linux.CLONE_NEWNS  # a copy owned by the new user namespace, so that its root may mount
    if L.network == "none":
        flags |= linux.CLONE_NEWNET
    linux.unshare(flags)
    if L.userns:
        # Mounts copied into a user namespace's mount namespace are locked, and pivot_root refuses a locked new
        # root: bind it on itself once more, then step out and back in to stand on the new, unlocked mount.
        linux.mount(".", ".", None, linux.MS_BIND | linux.MS_REC)
        os.chdir("..")
        os.chdir(os.path.basename(L.rootfs.rstrip("/")))
    pid2 = os.fork()  # a new PID namespace applies to children only: this one is PID 1
    if pid2 == 0:
        try:
            _init(L, rep_w, stdio, go_r)
        except BaseException as e:  # noqa: BLE001
            try:
                _send(rep_w, {"error": f"container setup: {e}", "code": 125})
            except OSError:
                pass
        os._exit(125)
    _send(rep_w, {"pid": pid2})
    os._exit(0)


# -- P2: mounts ----------------------------------------------------------------------------------------------


def _mount_dev(R: str, L: Launch) -> None:
    dev = R + "/dev"
    linux.mount("tmpfs", dev, "tmpfs", linux.MS_NOSUID | (1 << 24), "mode=755,size=65536k")  # strictatime
    for n in DEVICES:
        p = f"{dev}/{n}"
        os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o666))
        linux.mount(f"/dev/{n}", p, None, linux.MS_BIND)
    os.mkdir(dev + "/pts", 0o755)
    opts = "newinstance,ptmxmode=0666,mode=0620" + ("" if L.userns else ",gid=5")
    linux.mount("devpts", dev + "/pts", "devpts", linux.MS_NOSUID | linux.MS_NOEXEC, opts)
    os.symlink("pts/ptmx", dev + "/ptmx")
    os.mkdir(dev + "/shm", 0o1777)
    linux.mount("shm", dev + "/shm", "tmpfs", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC,
                "mode=1777,size=65536k")
    os.mkdir(dev + "/mqueue", 0o755)
    linux.mount("mqueue", dev + "/mqueue", "mqueue", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2"), ("core", "/proc/kcore")):
        os.symlink(target, f"{dev}/{name}")


def _mount_sys(R: str, L: Launch) -> None:
    sysdir = R + "/sys"
    ro = linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC | linux.MS_RDONLY
    if L.userns and L.network == "host":
        # sysfs can only be mounted by the owner of the network namespace: bind the host's, read-only.
        linux.mount("/sys", sysdir, None, linux.MS_BIND | linux.MS_REC)
        linux.mount(None, sysdir, None, linux.MS_BIND | linux.MS_REMOUNT | ro)
        return
    linux.mount("sysfs", sysdir, "sysfs", ro)
    cg = sysdir + "/fs/cgroup"
    if not os.path.isdir(cg):
        return
    if L.cgroup_version == 2:
        linux.mount("cgroup2", cg, "cgroup2", ro)
        return
    if L.userns:
        return  # v1 hierarchies can only be mounted from the initial user namespace
    linux.mount("tmpfs", cg, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC, "mode=755")
    for name, opts in L.cgroup_mounts:
        os.mkdir(f"{cg}/{name}", 0o755)
        linux.mount("cgroup", f"{cg}/{name}", "cgroup", ro, opts)
    linux.mount(None, cg, None, linux.MS_REMOUNT | ro, "mode=755")


def _remount_ro(path: str) -> None:
    linux.remount(path, linux.MS_RDONLY)  # the other flags kept: a user namespace locks them


def _bind_rootfs(L: Launch) -> None:
    """In P1, still host root, in a new mount namespace: the rootfs bound on itself with the volumes in it, and the
    working directory set to it. Path lookups happen here, as host root: after unshare(CLONE_NEWUSER) the mapped
    root may not even traverse the store root's parents. Everything later is relative to this cwd."""
    R = L.rootfs
    linux.unshare(linux.CLONE_NEWNS)
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_SLAVE)
    linux.mount(R, R, None, linux.MS_BIND | linux.MS_REC)
    # The host's mount is nosuid,nodev (rootfs.Mounting). The container keeps nosuid: its processes run with
    # no_new_privs, under which a setuid bit grants nothing anyway, while a host user sharing a uid with one of
    # them could reach the bits through /proc/PID/root. Device nodes: on v1 the devices cgroup decides what the
    # container may open (Docker's rules), so nodev is lifted here; v2 has no devices cgroup (it takes an eBPF
    # program), so there it stays and no node an image carries opens.
    if L.cgroup_version == 1:
        linux.remount(R, clear=linux.MS_NODEV)
    else:
        linux.remount(R, add=linux.MS_NODEV)
    for src, target, ro in L.binds:
        linux.mount(src, target, None, linux.MS_BIND | linux.MS_REC)
        if ro:
            _remount_ro(target)
    os.chdir(R)


def _plain_dir(name: str) -> None:
    """Before pivot_root a symlink would be followed on the host's side: the image's /proc, /dev and /sys must be
    directories (made if missing), never links (runc's "mount destination is a symlink")."""
    try:
        st = os.lstat(name)
    except FileNotFoundError:
        os.mkdir(name, 0o755)
        return
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(errno.ENOTDIR, f"the image's /{name} is not a directory; refusing to mount there")


def _setup_mounts(L: Launch) -> None:
    """In P2 (PID 1), cwd at the rootfs: the kernel filesystems, then pivot_root, then masking."""
    R = "."
    _plain_dir("proc")
    linux.mount("proc", R + "/proc", "proc", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)
    _plain_dir("dev")
    _mount_dev(R, L)
    _plain_dir("sys")
    _mount_sys(R, L)
    linux.pivot_root(".", ".")
    linux.mount(None, ".", None, linux.MS_SLAVE | linux.MS_REC)
    linux.umount2(".", linux.MNT_DETACH)
    os.chdir("/")
    if L.read_only:
        _remount_ro("/")
    for p in MASKED:
        try:
            st = os.lstat(p)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            linux.mount("tmpfs", p, "tmpfs", linux.MS_RDONLY, "size=0")
        else:
            linux.mount("/dev/null", p, None, linux.MS_BIND)
    for p in READONLY:
        if os.path.lexists(p):
            linux.mount(p, p, None, linux.MS_BIND | linux.MS_REC)
            _remount_ro(p)


def _lo_up() -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        ifr = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(s, 0x8913, ifr))[1]  # SIOCGIFFLAGS
        fcntl.ioctl(s, 0x8914, struct.pack("16sH22x", b"lo", flags | 1))  # SIOCSIFFLAGS, IFF_UP
    finally:
        s.close()


def open_pty(uid: int, gid: int, winsize: bytes | None) -> tuple[int, int, str]:
    """A pty from the devpts at /dev/pts (the container's, once inside): (master, slave, slave path)."""
    master = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    fcntl.ioctl(master, 0x40045431, struct.pack("i", 0))  # TIOCSPTLCK: unlock
    n = struct.unpack("I", fcntl.ioctl(master, 0x80045430, b"\0" * 4))[0]  # TIOCGPTN
    slave_path = f"/dev/pts/{n}"
    slave = os.open(slave_path, os.O_RDWR | os.O_NOCTTY)
    os.fchown(slave, uid, gid)
    if winsize:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, winsize)
    return master, slave, slave_path


def _console(L: Launch) -> tuple[int, int, int]:
    """As runc's console socket: a pty from the container's own devpts (so the command sees /dev/pts/0 and
    /dev/console), its master handed to the supervisor over a unix socket."""
    master, slave, slave_path = open_pty(L.process.uid, 5 if not L.userns else L.process.gid, L.winsize)
    os.close(os.open("/dev/console", os.O_CREAT | os.O_WRONLY, 0o600))
    linux.mount(slave_path, "/dev/console", None, linux.MS_BIND)
    sock = socket.socket(fileno=L.tty_socket)
    socket.send_fds(sock, [b"m"], [master])
    sock.close()
    os.close(master)
    return slave, slave, slave


# -- P2: init ------------------------------------------------------------------------------------------------


def _set_title(title: bytes) -> None:
    """Show the init as `lamina-init` in the container's ps, not as the host's lamina command line: overwrite the
    argv area in place (what setproctitle does) and set the comm name."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end (fields 48 and 49)
        if end > start:
            with open("/proc/self/mem", "r+b", buffering=0) as mem:
                mem.seek(start)
                mem.write(title[: end - start - 1].ljust(end - start, b"\0"))
        linux.set_comm(title)
    except (OSError, ValueError, IndexError):
        pass


def _init(L: Launch, rep_w: int, stdio: tuple[int, int, int], go_r: int) -> None:
    _set_title(b"lamina-init")
    linux.prctl(linux.PR_SET_DUMPABLE, 0)
    _setup_mounts(L)
    if L.network == "none":
        _lo_up()
    linux.sethostname(L.hostname)
    child = [0]

    def forward(sig: int, _frame: object) -> None:
        if child[0]:
            try:
                os.kill(child[0], sig)
            except ProcessLookupError:
                pass

    for s in FORWARDED:
        signal.signal(s, forward)
    if L.tty_socket is not None:
        stdio = _console(L)
    er, ew = os.pipe2(os.O_CLOEXEC)
    hold_r, hold_w = os.pipe2(os.O_CLOEXEC)
    pid3 = os.fork()
    if pid3 == 0:
        os.close(er)
        os.close(hold_w)
        if L.hold_init and _read_byte(hold_r) != b"r":
            os._exit(125)
        os.close(hold_r)
        _exec(L.process, stdio, ew)
    child[0] = pid3
    os.close(ew)
    os.close(hold_r)
    if L.hold_init:
        _send(rep_w, {"held": True})
        if _read_byte(go_r) != b"r":
            os.kill(pid3, signal.SIGKILL)
            os._exit(125)
        os.write(hold_w, b"r")
    os.close(hold_w)
    for fd in set(stdio):
        if fd > 2:
            os.close(fd)
    err = b""
    while chunk := os.read(er, 4096):
        err += chunk
    os.close(er)
    if err:
        msg = json.loads(err)
        _send(rep_w, msg)
    else:
        _send(rep_w, {"started": True})
    os.close(rep_w)
    # Nothing of the host stays open in PID 1 either, not even the caller's terminal.
    linux.close_fds_from(3)
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(125)
        if pid == pid3:
            os._exit(exit_code(status))


# -- P3: the command -----------------------------------------------------------------------------------------


def _find(argv0: str, env: list[str]) -> str:
    if "/" in argv0:
        return argv0
    path = next((e[5:] for e in env if e.startswith("PATH=")), "/usr/local/bin:/usr/bin:/bin")
    denied = None
    for d in path.split(":"):
        cand = os.path.join(d or ".", argv0)
        try:
            st = os.stat(cand)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            if os.access(cand, os.X_OK):
                return cand
            denied = cand
    if denied:
        return denied
    raise FileNotFoundError(errno.ENOENT, f'exec: "{argv0}": executable file not found in $PATH')


def _exec(p: Process, stdio: tuple[int, int, int], ew: int) -> None:
    """Become the command. Never returns; failures go to `ew` as {"error", "code"} (126 or 127)."""
    try:
        try:
            linux.prctl(linux.PR_SET_DUMPABLE, 1)  # the init is not; this process's /proc files must be its own
            os.setsid()
            for i, fd in enumerate(stdio):
                if fd != i:
                    os.dup2(fd, i)
            if p.tty:
                fcntl.ioctl(0, termios.TIOCSCTTY, 0)
            for s in range(1, signal.NSIG):
                if s not in (signal.SIGKILL, signal.SIGSTOP):
                    try:
                        signal.signal(s, signal.SIG_DFL)
                    except (OSError, ValueError):
                        pass
            try:
                _write_file("/proc/self/oom_score_adj", "0")
            except OSError:
                pass
            linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)
            _become(p)
            try:
                os.chdir(p.cwd)
            except OSError as e:
                raise StartError(f"chdir to cwd ({p.cwd!r}) set in config.json failed: {e.strerror}", 126) from None
            path = _find(p.argv[0], p.env)
            if p.seccomp and seccomp.available():
                seccomp.load()
            linux.close_fds_from(3, keep=(ew,))
            env = dict(e.split("=", 1) for e in p.env)
            os.execve(path, p.argv, env)
        except StartError as e:
            _send(ew, {"error": str(e), "code": e.code})
        except FileNotFoundError as e:
            msg = e.strerror if e.strerror and e.strerror.startswith("exec:") else \
                f'exec: "{p.argv[0]}": stat {p.argv[0]}: no such file or directory'
            _send(ew, {"error": msg, "code": 127})
        except OSError as e:
            _send(ew, {"error": f'exec: "{p.argv[0]}": {e.strerror.lower() if e.strerror else e}', "code": 126})
    except BaseException:  # noqa: BLE001 - P3 must never return into the init's code
        pass
    os._exit(127)


def _become(p: Process) -> None:
    # Bounding set first, while CAP_SETPCAP is still ours; setuid to non-root then clears the rest.
    keep = p.caps if p.uid == 0 else frozenset()
    linux.drop_bounding(p.caps)
    try:
        os.setgroups(p.groups)
    except PermissionError:
        pass  # a user namespace with setgroups denied
    os.setresgid(p.gid, p.gid, p.gid)
    os.setresuid(p.uid, p.uid, p.uid)
    linux.set_capabilities(keep)


def _relay_tty(pid: int, master: int, stdio: tuple[int, int, int]) -> int:
    from .relay import Relay, copy_winsize  # noqa: PLC0415 - only `exec -t` needs it

    relay = Relay()
    relay.outs[master] = [stdio[1]]
    relay.ins[stdio[0]] = master
    signal.signal(signal.SIGWINCH, lambda s, f: copy_winsize(master))
    saved = None
    if os.isatty(stdio[0]):
        saved = termios.tcgetattr(stdio[0])
        raw = termios.tcgetattr(stdio[0])
        raw[3] &= ~(termios.ECHO | termios.ICANON | termios.ISIG | termios.IEXTEN)
        raw[0] &= ~(termios.IXON | termios.ICRNL)
        raw[1] &= ~termios.OPOST
        termios.tcsetattr(stdio[0], termios.TCSANOW, raw)
    try:
        return relay.run_until_exit(pid)
    finally:
        if saved is not None:
            termios.tcsetattr(stdio[0], termios.TCSADRAIN, saved)
        os.close(master)


# -- lamina exec ---------------------------------------------------------------------------------------------


def join(init_pid: int, p: Process, add_to_cgroup, stdio: tuple[int, int, int],
         release_path: str | None = None, winsize: bytes | None = None) -> int:
    """Run `p` in the namespaces and cgroup of the container whose init is `init_pid`; return its exit code.

    `release_path` (a v1 parent memory cgroup's cgroup.procs, opened here as host root) lets the intermediate
    process leave the memory cgroup once the command is forked, as the init does. With p.tty the command gets a
    pty from the container's devpts, relayed to `stdio` here."""
    fds = {}
    for name, flag in NS_FILES:
        try:
            if os.readlink(f"/proc/{init_pid}/ns/{name}") == os.readlink(f"/proc/self/ns/{name}"):
                continue
            fds[name] = (os.open(f"/proc/{init_pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC), flag)
        except FileNotFoundError:
            raise StartError("container is not running") from None
    root_fd = os.open(f"/proc/{init_pid}/root", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    release_fd = os.open(release_path, os.O_WRONLY | os.O_CLOEXEC) if release_path else None
    er, ew = os.pipe2(os.O_CLOEXEC)
    sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) if p.tty else (None, None)
    pid = os.fork()
    if pid == 0:
        os.close(er)
        try:
            add_to_cgroup(os.getpid())
            for name, _ in NS_FILES:  # user first: the others are owned by it
                if name in fds:
                    linux.setns(fds[name][0], fds[name][1])
            os.fchdir(root_fd)
            os.chroot(".")
            os.chdir("/")
        except BaseException as e:  # noqa: BLE001
            _send(ew, {"error": f"joining the container: {e}", "code": 126})
            os._exit(126)
        if p.uid == 0 and "user" in fds:
            os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
        if child_sock is not None:
            try:
                master, slave, _ = open_pty(p.uid, p.gid, winsize)
                socket.send_fds(child_sock, [b"m"], [master])
            except OSError as e:
                _send(ew, {"error": f"allocating a terminal: {e}", "code": 126})
                os._exit(126)
            os.close(master)
            child_sock.close()
            stdio = (slave, slave, slave)
        pid2 = os.fork()  # setns(pid) applies to children
        if pid2 == 0:
            _exec(p, stdio, ew)
        os.close(ew)
        if release_fd is not None:
            try:
                os.write(release_fd, b"0")  # this process only; the command stays in the memory cgroup
            except OSError:
                pass
        signal.signal(signal.SIGINT, lambda s, f: os.kill(pid2, s))
        signal.signal(signal.SIGTERM, lambda s, f: os.kill(pid2, s))
        _, status = os.waitpid(pid2, 0)
        os._exit(exit_code(status))
    os.close(ew)
    for fd, _ in fds.values():
        os.close(fd)
    os.close(root_fd)
    if release_fd is not None:
        os.close(release_fd)
    master = None
    if sock is not None:
        child_sock.close()
        _, got, _, _ = socket.recv_fds(sock, 1, 1)
        sock.close()
        master = got[0] if got else None
    err = b""
    while chunk := os.read(er, 4096):
        err += chunk
    os.close(er)
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, lambda sig, f: os.kill(pid, sig))
    if master is not None and not err:
        status = _relay_tty(pid, master, stdio)
    else:
        _, status = os.waitpid(pid, 0)
    if err:
        msg = json.loads(err.splitlines()[0])
        raise StartError(msg["error"], msg["code"])
    return exit_code(status)
