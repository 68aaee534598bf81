"""`lamina run`: from a validated RunSpec to a running container and back to its exit code.

Preparation (rootfs mount, volumes, mount points, cgroup) happens in the calling process and is rolled back entirely
if any step fails, so bad input leaves nothing behind. Then a supervisor (this process in the foreground; a detached
shim with -d) starts the process tree of runtime.launch, relays the terminal or the log, forwards signals, records
the exit code (and OOM kills) in state.json and cleans up: cgroup removed, rootfs unmounted, container removed with
--rm.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import termios
import time
import tty
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import cgroups, linux, rootfs, state, volumes
from .ipam import NetworkError
from .launch import Launch, Prestart, Process, StartError, spawn
from .paths import EscapeError, make_mountpoint, resolve_in_root
from .relay import Relay, copy_winsize, winsize
from .spec import RunSpec, SpecError, VOLUME_NAME, capabilities, check_config, parse_exposed
from .users import resolve_user

if TYPE_CHECKING:
    from unionfs.daemon import Standby

    from .network import Attachment

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
USERNS_DEFAULT = (100000, 65536)


@dataclass
class Prepared:
    container: state.Container
    launch: Launch
    cgroup: cgroups.Cgroup
    image: rootfs.Image
    created_volumes: list[str] = field(default_factory=list)
    p1: Prestart | None = None      # the container's first process, already forked and in its cgroup
    memory_limited: bool = False    # -m: the init must then leave a v1 memory cgroup (see supervise)
    net: Attachment | None = None   # bridge networks: the address, ports and veth to set up
    port_socks: list[socket.socket] = field(default_factory=list)  # held for the container's life (network.py)


def userns_range() -> tuple[int, int]:
    """The host range for --userns: the `lamina` (else `root`) entry of /etc/subuid, else 100000:65536."""
    try:
        with open("/etc/subuid") as f:
            rows = [line.strip().split(":") for line in f if line.count(":") == 2]
        for who in ("lamina", "root"):
            for name, start, count in rows:
                if name == who:
                    return int(start), int(count)
    except (OSError, ValueError):
        pass
    return USERNS_DEFAULT


def _merge_env(base: list[str], extra: list[str]) -> list[str]:
    env: dict[str, str] = {}
    for e in base + extra:
        k, _, v = e.partition("=")
        env[k] = v
    return [f"{k}={v}" for k, v in env.items()]


def command_line(cfg: dict, cmd: list[str], entrypoint: str | None = None) -> list[str]:
    """Docker's rule: Entrypoint + (CMD arguments given, else the image's Cmd). `--entrypoint X` replaces the
    image's Entrypoint with [X] and drops its Cmd (`--entrypoint ""`: no entrypoint), as Docker does."""
    if entrypoint is not None:
        return ([entrypoint] if entrypoint else []) + list(cmd)
    entry = list(cfg.get("Entrypoint") or [])
    return entry + (list(cmd) if cmd else list(cfg.get("Cmd") or []))


def _v1_mounts() -> list[tuple[str, str]]:
    out = []
    for _, mp, fs, opts in cgroups._mountinfo():
        if fs == "cgroup" and mp.startswith("/sys/fs/cgroup/"):
            known = [o for o in opts.split(",") if o in ("cpu", "cpuacct", "cpuset", "memory", "devices", "freezer",
                                                           "blkio", "pids", "net_cls", "net_prio", "perf_event",
                                                           "hugetlb", "rdma", "misc") or o.startswith("name=")]
            if known:
                out.append((os.path.basename(mp), ",".join(known)))
    return out


def _etc_files(c: state.Container, R: str, hostname: str, userns: tuple[int, int] | None,
               covered: list[str], net: Attachment | None = None,
               add_hosts: list[list[str]] | None = None) -> list[tuple[str, str, str]]:
    """/etc/hostname, /etc/hosts and /etc/resolv.conf as Docker provides them: files of the container's own,
    bound over the image's, unless a user mount covers them (`covered`: the host paths of its targets, so that a
    volume on /etc, or on where a link in the image leads, counts). Returns (source, host target, container path
    of the mount point). As podman: an image's link there is followed inside the rootfs (a `..` above its root
    stays at the root, as in the container), the missing parents of its target are made there, and nothing is
    ever written outside it."""
    realroot = os.path.realpath(R)
    etc = resolve_in_root(R, "/etc", clamp=True)
    if os.path.lexists(etc) and not os.path.isdir(etc):
        return []  # an image whose /etc is no directory gets none of them
    try:
        with open("/etc/resolv.conf") as f:
            resolv = f.read()
    except OSError:
        resolv = ""
    hosts = f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n"
    if net is not None or add_hosts:
        from . import network  # noqa: PLC0415

        peers = network.peers_of(str(c.dir.parent.parent), net.network, c.id) if net and net.user_defined else []
        own = [c.name, *net.aliases] if net and net.user_defined else []
        hosts = network.hosts_text(hostname, net.address if net else None, add_hosts or [], peers, own)
        if net is not None:
            resolv = network.resolv_conf(resolv)
    contents = {"hostname": f"{hostname}\n", "hosts": hosts, "resolv.conf": resolv}
    out = []
    for name, text in contents.items():
        host = resolve_in_root(R, f"/etc/{name}", clamp=True)
        if any(host == t or host.startswith(t + "/") for t in covered):
            continue
        src = c.dir / name
        src.write_text(text)
        if userns:
            os.chown(src, userns[0], userns[0])
        target = make_mountpoint(R, f"/etc/{name}", False, clamp=True)
        out.append((str(src), target, "/" + os.path.relpath(target, realroot)))
    return out


def prepare(root: str, spec: RunSpec, early_p1: bool = True, daemon: Standby | None = None) -> Prepared:
    """Everything before the container's processes run. Raises SpecError/rootfs.ImageNotFound/OSError after
    rolling back. With `early_p1` the container's first process is forked here (by the process that will
    supervise it) and joins the cgroup while the root filesystem's daemon starts (in `daemon`, if one is standing
    by)."""
    if spec.name is not None:
        if not VOLUME_NAME.match(spec.name):
            raise SpecError(f"invalid container name {spec.name!r}: only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed")
        holder = next((c for c in state.list_containers(root) if c.name == spec.name), None)
        if holder is not None:  # early, before the image is looked up; state.create decides for good
            raise state.conflict(spec.name, holder)
    image = rootfs.resolve(root, spec.image)
    cfg = image.config = check_config(image.config, spec.image)
    argv = command_line(cfg, spec.cmd, spec.entrypoint)
    if not argv:
        raise SpecError("no command specified")
    cid = state.new_id()
    hostname = spec.hostname or cid[:12]
    user = spec.user or cfg.get("User") or "0"
    version = cgroups.detect_version()
    cg = cgroups.for_container(f"lamina-{cid}")
    # From here a SIGTERM or SIGHUP rolls back like Ctrl-C does (the union filesystem's daemon resets both for
    # libfuse to install its own).
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupted)
    try:
        c = state.create(root, cid, {
            "name": spec.name, "image": image.ref, "image_kind": image.kind, "image_path": image.path,
            "image_id": image.id, "argv": argv, "hostname": hostname, "rm": spec.rm, "status": "created",
            "mounts": [m.to_json() for m in spec.mounts], "network": spec.network, "userns": spec.userns,
            "user": user, "tty": spec.tty,
            # recorded first: if lamina dies from here on, `lamina rm` still finds the cgroup; the rootfs mount
            # takes no hold of the image (the container's own hold keeps it)
            "cgroup": cg.to_json(), "mount_hold": False,
        })
    except BaseException:
        shutil.rmtree(state.containers_dir(root) / cid, ignore_errors=True)  # e.g. the store refused the hold
        raise
    created: list[str] = []
    made_dirs: list[tuple[str, str]] = []  # (topmost created, leaf) host directories for bind sources
    mounting: rootfs.Mounting | None = None
    p1: Prestart | None = None
    net: Attachment | None = None
    socks: list[socket.socket] = []
    try:
        cg.create()
        try:
            cg.apply(spec.limits)
        except OSError as e:
            raise SpecError(f"setting cgroup limits: {e.strerror or e}") from None
        # Two waits overlap from here: P1 joining the cgroup (on v1 a move waits for an RCU grace period) and the
        # union filesystem's daemon starting (it loads its code after its fork); this process goes on meanwhile.
        if early_p1:
            p1 = Prestart(cg.add)
        userns = userns_range() if spec.userns else None
        mounting = rootfs.start_mount(root, image, str(c.upper), str(c.work), str(c.rootfs), userns, daemon,
                                      spec.driver)
        # v1's devices cgroup limits what may be opened; v2 would need an eBPF program, so there no node may be made.
        caps = linux.DEFAULT_CAPS if version == 1 else linux.DEFAULT_CAPS - {linux.CAPS["MKNOD"]}
        if spec.cap_add or spec.cap_drop:
            caps = capabilities(caps, spec.cap_add, spec.cap_drop) & linux.bounding_set()
        cgroup_mounts = _v1_mounts() if version == 1 else []
        mounting.wait()
        R = str(c.rootfs)
        uid, gid, groups, home = resolve_user(R, user)
        env = _merge_env([DEFAULT_PATH, f"HOSTNAME={hostname}", f"HOME={home}"] + (["TERM=xterm"] if spec.tty else []),
                         list(cfg.get("Env") or []) + spec.env)
        cwd = spec.workdir or cfg.get("WorkingDir") or "/"
        if not cwd.startswith("/"):
            raise SpecError(f"invalid working directory {cwd!r}: it must be absolute")
        # Resolve every target first: an escape must fail before anything is created.
        for m in spec.mounts:
            resolve_in_root(R, m.target)
        for path, _, _ in spec.tmpfs:
            resolve_in_root(R, path)
        resolve_in_root(R, cwd)
        binds: list[tuple[str, str, bool]] = []
        mounts_json = []
        for m in spec.mounts:
            if m.kind == "bind":
                src = m.source
                if not os.path.exists(src):
                    top = src
                    while not os.path.exists(os.path.dirname(top)):
                        top = os.path.dirname(top)
                    os.makedirs(src, exist_ok=True)  # Docker creates a missing host directory
                    made_dirs.append((top, src))
                target = make_mountpoint(R, m.target, os.path.isdir(src))
                binds.append((src, target, m.readonly))
                mounts_json.append(m.to_json())
                continue
            vname = m.source
            if m.kind == "anon" or not volumes.Volume(root, vname).exists():
                vol = volumes.create(root, vname or None, anonymous=m.kind == "anon")
                created.append(vol.name)
                if userns:
                    os.chown(vol.data, userns[0], userns[0])
            else:
                vol = volumes.get(root, vname)
            target = make_mountpoint(R, m.target, True)
            vol.prefill(target)
            binds.append((str(vol.data), target, m.readonly))
            mounts_json.append({**m.to_json(), "source": vol.name})
        if cwd != "/":
            make_mountpoint(R, cwd, True)
        if spec.network not in ("none", "host"):
            from . import network  # noqa: PLC0415 - pyroute2 loads only for networked containers

            ports = spec.publish + (parse_exposed(cfg) if spec.publish_all else [])
            c.update(add_hosts=spec.add_hosts)
            net, socks = network.join(root, cid, c.name, spec.network, spec.ip, spec.network_aliases, ports)
            c.update(net=net.to_json())
        # mounted by host root before the user namespace exists: owned by the container's root, as under Docker
        owner = f",uid={userns[0]},gid={userns[0]}" if userns else ""
        tmpfs = [(make_mountpoint(R, path, True), flags, data + ("" if "uid=" in data else owner))
                 for path, flags, data in spec.tmpfs]
        etc_files = _etc_files(c, R, hostname, userns, [t for _, t, _ in binds] + [t for t, _, _ in tmpfs], net,
                               spec.add_hosts)
        binds += [(src, target, False) for src, target, _ in etc_files]
        launch = Launch(
            rootfs=R, hostname=hostname, network=spec.network, userns=userns, binds=binds, tmpfs=tmpfs,
            read_only=spec.read_only,
            process=Process(argv=argv, env=env, cwd=cwd, uid=uid, gid=gid, groups=groups, tty=spec.tty, caps=caps),
            cgroup_version=version, cgroup_mounts=cgroup_mounts, hold_net=net is not None,
        )
        # The container's config as Docker keeps it: the image's, with the run's command, env, workdir and user.
        config = {k: v for k, v in cfg.items() if k not in ("Env", "Cmd", "WorkingDir", "User")}
        config.update(Env=_merge_env(list(cfg.get("Env") or []), spec.env), Cmd=list(spec.cmd) or cfg.get("Cmd"),
                      WorkingDir=spec.workdir or cfg.get("WorkingDir") or "", User=spec.user or cfg.get("User") or "")
        if spec.entrypoint is not None:
            config.update(Entrypoint=[spec.entrypoint] if spec.entrypoint else None, Cmd=list(spec.cmd) or None)
        c.update(config=config, caps=sorted(caps), mounts=mounts_json, etc_files=[t for _, _, t in etc_files],
                 env=env, cwd=cwd, uid=uid, gid=gid, groups=groups)
        return Prepared(c, launch, cg, image, created, p1, spec.limits.memory is not None, net, socks)
    except BaseException:
        for s in socks:
            s.close()
        if p1 is not None:
            p1.cancel()  # before the cgroup goes: P1 stands in it
        if mounting is not None:
            try:
                mounting.wait()  # a daemon still starting would mount after the rollback's unmount
            except OSError:
                pass
        _rollback(root, c, image.kind, cg, created)
        for top, leaf in made_dirs:  # only while still empty: nothing of the user's is ever removed
            d = leaf
            while True:
                try:
                    os.rmdir(d)
                except OSError:
                    break
                if d == top:
                    break
                d = os.path.dirname(d)
        raise


def _interrupted(sig: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {sig}")


def _rollback(root: str, c: state.Container, kind: str, cg: cgroups.Cgroup | None, created: list[str]) -> None:
    _leave_network(root, c)
    if cg is not None:
        try:
            cg.remove()
        except OSError:
            pass
    try:
        rootfs.umount(root, kind, str(c.rootfs))
    except OSError:
        pass
    for v in created:
        try:
            volumes.remove(root, v, force=True)
        except volumes.VolumeError:
            pass
    state.remove_dir(c)


def _leave_network(root: str, c: state.Container) -> None:
    if c.data.get("net"):
        from . import network  # noqa: PLC0415

        try:
            network.leave(root, c)
        except Exception as e:  # noqa: BLE001 - netlink's, nft's or the store's: said, and the rest still goes
            print(f"lamina: removing the network of {c.id[:12]}: {e}", file=sys.stderr)


def cleanup(root: str, c: state.Container) -> None:
    """After the init is gone: cgroup and rootfs mount away, address and ports released, the network's veth (and
    with its last container, the default network's bridge and rules) removed; with --rm the container and
    anonymous volumes too."""
    cgj = c.data.get("cgroup")
    if cgj:
        cg = cgroups.from_json(cgj)
        for pid in cg.pids():  # stragglers, e.g. `lamina exec` processes outside the PID namespace
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            cg.remove()
        except OSError:
            pass
    _leave_network(root, c)
    try:
        # containers of older lamina versions were mounted through `lamina mount`, which held the image too
        rootfs.umount(root, c.data.get("image_kind", "dir"), str(c.rootfs), c.data.get("mount_hold", True))
    except OSError as e:
        print(f"lamina: unmounting {c.rootfs}: {e}", file=sys.stderr)
    if c.data.get("rm"):
        remove_container(root, c)


def remove_container(root: str, c: state.Container) -> None:
    anon = [m["source"] for m in c.data.get("mounts", []) if m["kind"] == "anon"]
    state.remove_dir(c)
    for v in anon:
        try:
            volumes.remove(root, v, force=True)
        except volumes.VolumeError:
            pass


# -- supervision ---------------------------------------------------------------------------------------------


def supervise(root: str, p: Prepared, stdio_mode: str, interactive: bool, notify_fd: int | None = None) -> int:
    """Start the container and wait for it. stdio_mode: "relay" (foreground), "tty" (-t), "log" (detached)."""
    c, L = p.container, p.launch
    linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 1)
    log_fd = os.open(c.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
    relay = Relay()
    close_after: list[int] = []
    saved_tty = None
    init_pid = [0]
    pending: list[int] = []  # signals that came while the container was starting, for its init once it exists

    def forward(sig: int, _f: object) -> None:
        if not init_pid[0]:
            pending.append(sig)
            return
        try:
            os.kill(init_pid[0], sig)
        except ProcessLookupError:
            pass

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(s, forward)
    devnull = os.open(os.devnull, os.O_RDWR)
    close_after.append(devnull)
    tty_sock = None
    if stdio_mode == "tty":
        tty_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        L.tty_socket = child_sock.detach()
        L.winsize = winsize()
        close_after.append(L.tty_socket)
        stdio = (devnull, devnull, devnull)
    elif stdio_mode == "relay":
        o_r, o_w = os.pipe2(os.O_CLOEXEC)
        e_r, e_w = os.pipe2(os.O_CLOEXEC)
        stdio = (0 if interactive else devnull, o_w, e_w)
        close_after += [o_w, e_w]
        relay.outs[o_r] = [1, log_fd]
        relay.outs[e_r] = [2, log_fd]
    else:
        stdio = (devnull, log_fd, log_fd)
    try:
        try:
            # With a memory limit on v1 the init leaves the container's memory cgroup before the command runs,
            # so that the OOM killer only ever chooses among the command's processes. Without one there is no
            # memory cgroup OOM to fear, and no second move between cgroups to wait for.
            release = getattr(p.cgroup, "release_from_memory", None) if p.memory_limited else None
            L.hold_init = release is not None
            pre, p.p1 = p.p1 or Prestart(p.cgroup.add), None
            configure = None
            if p.net is not None:
                from .network import attach  # noqa: PLC0415

                configure = lambda pid1: attach(pid1, p.net)  # noqa: E731
            pid, reports = spawn(L, stdio, pre, release, configure)
            init_pid[0] = pid
            for sig in pending:
                forward(sig, None)
            c.update(status="running", pid=pid, pid_start=state.proc_start_time(pid), started_at=time.time(),
                     shim_pid=os.getpid(), shim_start=state.proc_start_time(os.getpid()))
        except StartError as e:
            reports, pid = [{"error": str(e), "code": e.code}], 0
        except (OSError, ValueError) as e:  # e.g. writing the uid map: still a runtime error, still cleaned up
            reports, pid = [{"error": f"starting the container: {e}", "code": 125}], 0
        for fd in close_after:
            os.close(fd)
        close_after = []
        err = next((r for r in reports if "error" in r), None)
        if err is not None:
            code = int(err.get("code", 125))
            if pid:
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass
            c.update(status="exited", exit_code=code, error=err["error"], finished_at=time.time(), pid=None)
            if notify_fd is not None:
                _notify(notify_fd, {"error": err["error"], "code": code})
            else:
                print(f"lamina: {err['error']}", file=sys.stderr)
            _restore(saved_tty)
            saved_tty = None
            cleanup(root, c)
            return code
        if notify_fd is not None:
            _notify(notify_fd, {"started": True})
        if tty_sock is not None:
            master = _receive_master(tty_sock)
            relay.outs[master] = [1, log_fd]
            if interactive:
                relay.ins[0] = master
            signal.signal(signal.SIGWINCH, lambda s, f: copy_winsize(master))
            if interactive and os.isatty(0):
                saved_tty = termios.tcgetattr(0)
                tty.setraw(0, termios.TCSANOW)  # TCSAFLUSH would drop typed-ahead input
        status = relay.run_until_exit(pid)
        code = _code(status)
    finally:
        _restore(saved_tty)
        for fd in close_after:
            os.close(fd)
    oom = p.cgroup.oom_killed()
    c.update(status="exited", exit_code=code, oom_killed=oom, finished_at=time.time(), pid=None)
    cleanup(root, c)
    for s in p.port_socks:
        s.close()
    os.close(log_fd)
    return code


def _receive_master(sock: socket.socket) -> int:
    _, fds, _, _ = socket.recv_fds(sock, 1, 1)
    sock.close()
    if not fds:
        raise OSError("the container sent no terminal")
    return fds[0]


def _code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _restore(saved: object) -> None:
    if saved is not None:
        termios.tcsetattr(0, termios.TCSADRAIN, saved)


def _notify(fd: int, msg: dict) -> None:
    try:
        os.write(fd, (json.dumps(msg) + "\n").encode())
        os.close(fd)
    except OSError:
        pass


def run(root: str, spec: RunSpec, daemon: Standby | None = None) -> int:
    """The whole of `lamina run`; returns the exit code to exit with (125 for lamina's own errors). `daemon`: the
    root filesystem's, forked early (rootfs.standby)."""
    try:
        # detached, the container's processes belong to the shim forked below: no early P1 from here
        p = prepare(root, spec, early_p1=not spec.detach, daemon=daemon)
    except (SpecError, rootfs.ImageNotFound, EscapeError, volumes.VolumeError, NetworkError) as e:
        print(f"lamina: {e}", file=sys.stderr)
        return 125
    except OSError as e:
        print(f"lamina: {e.strerror or e}{': ' + str(e.filename) if e.filename else ''}", file=sys.stderr)
        return 125
    except KeyboardInterrupt:
        print("lamina: interrupted before the container started; nothing was kept", file=sys.stderr)
        return 130
    if not spec.detach:
        return supervise(root, p, "tty" if spec.tty else "relay", spec.interactive)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setsid()
            if os.fork() != 0:
                os._exit(0)
            fd = os.open(os.devnull, os.O_RDWR)
            os.dup2(fd, 0)
            logfd = os.open(p.container.dir / "shim.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
            os.dup2(logfd, 1)
            os.dup2(logfd, 2)
            linux.close_fds_from(3, keep=(w, *(s.fileno() for s in p.port_socks)))
            supervise(root, p, "log", False, notify_fd=w)
        except BaseException as e:  # noqa: BLE001 - the shim has no caller left to raise to: shim.log gets it
            import traceback  # noqa: PLC0415

            traceback.print_exc()
            _notify(w, {"error": str(e), "code": 125})
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    data = b""
    while chunk := os.read(r, 4096):
        data += chunk
    os.close(r)
    msg = json.loads(data.splitlines()[0]) if data else {"error": "the container's supervisor died", "code": 125}
    if "error" in msg:
        print(f"lamina: {msg['error']}", file=sys.stderr)
        return int(msg.get("code", 125))
    print(p.container.id)
    return 0
