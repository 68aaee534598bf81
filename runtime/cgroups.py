"""Container cgroups: creation under the caller's own cgroup, limits, membership, OOM status and removal, for
cgroup v1 and cgroup v2.

Which version is detected at run time from /proc/self/mountinfo: a host with v1 controller hierarchies is v1 even if
it also mounts a controller-less cgroup2 "unified" tree (hybrid, as runc and k3s treat it); v2 only when cgroup2 is
the sole hierarchy. Both writers take a root directory so they can be tested against a temporary tree laid out like
cgroupfs. Limits are Docker's: -m, --memory-swap, --cpus, --pids-limit, --device-{read,write}-bps.
"""
from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

CPU_PERIOD = 100_000
V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "blkio", "freezer", "devices")
# Docker's default device rules: any node may be created, only these may be opened (moby's DefaultCapabilities
# companion, oci/devices_linux.go). Without them container root could mknod the host's disk and read it.
DEVICE_RULES = ("c *:* m", "b *:* m", "c 1:3 rwm", "c 1:5 rwm", "c 1:7 rwm", "c 1:8 rwm", "c 1:9 rwm",
                "c 5:0 rwm", "c 5:1 rwm", "c 5:2 rwm", "c 136:* rwm", "c 10:200 rwm")


def _oom_kills(path: Path) -> bool:
    """Whether the kernel's "oom_kill N" counter (v1 memory.oom_control, v2 memory.events) is above zero."""
    try:
        for line in path.read_text().splitlines():
            k, _, v = line.partition(" ")
            if k == "oom_kill" and int(v) > 0:
                return True
    except OSError:
        pass
    return False


@dataclass
class Limits:
    memory: int | None = None         # bytes
    memory_swap: int | None = None    # bytes of memory + swap; -1 = unlimited swap
    cpus: float | None = None
    pids: int | None = None           # -1 or None = unlimited
    read_bps: list[tuple[str, int]] = field(default_factory=list)   # ("MAJ:MIN", bytes per second)
    write_bps: list[tuple[str, int]] = field(default_factory=list)

    def swap_total(self) -> int | None:
        """memory+swap limit as Docker computes it: unset --memory-swap with -m means twice the memory."""
        if self.memory is None:
            return None
        if self.memory_swap is None:
            return 2 * self.memory
        return self.memory_swap


def _write(path: Path, value: str) -> None:
    """One value per write, as the kernel parses it. O_APPEND and no O_CREAT: on cgroupfs the file must exist (a
    missing one means the controller is absent), and in a test tree laid out like cgroupfs every write is kept."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, (value + "\n").encode())
    finally:
        os.close(fd)


_CGROUP_MAGICS = {0x27E0EB, 0x63677270}  # CGROUP_SUPER_MAGIC, CGROUP2_SUPER_MAGIC


def _on_cgroupfs(path: Path) -> bool:
    import ctypes
    
    class Statfs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_long * 15)]

    libc = ctypes.CDLL(None, use_errno=True)
    buf = Statfs()
    if libc.statfs(os.fsencode(str(path)), ctypes.byref(buf)) != 0:
        return False
    return buf.f_type in _CGROUP_MAGICS


def _mountinfo() -> list[tuple[str, str, str, str]]:
    """(root, mountpoint, fstype, super options) of each mount."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, post = line.split(" - ", 1)
            a, b = pre.split(), post.split()
            out.append((a[3], a[4], b[0], b[2] if len(b) > 2 else ""))
    return out


def _own_cgroups(pid: str = "self") -> dict[str, str]:
    """Controller (or "" for v2) -> the process's cgroup path."""
    out: dict[str, str] = {}
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            for c in ctrls.split(",") if ctrls else [""]:
                out[c] = path
    return out


def detect_version() -> int:
    """1 or 2. LAMINA_CGROUP_VERSION=2 picks v2 on a hybrid host (its cgroup2 mount has no controllers, so no
    limits apply, but placement, the cgroup namespace and freezing are v2's): how the v2 path is tested here."""
    mounts = _mountinfo()
    has_v1 = any(fs == "cgroup" for _, _, fs, _ in mounts)
    has_v2 = any(fs == "cgroup2" for _, _, fs, _ in mounts)
    forced = os.environ.get("LAMINA_CGROUP_VERSION")
    if forced == "2" and has_v2:
        return 2
    if forced == "1" and has_v1:
        return 1
    if has_v1:
        return 1
    if has_v2:
        return 2
    raise OSError(errno.ENOENT, "no cgroup filesystem mounted")


class CgroupV1:
    """One directory per controller, each nested under the caller's cgroup in that hierarchy."""

    version = 1

    def __init__(self, dirs: dict[str, Path]):
        self.dirs = dirs

    @classmethod
    def for_container(cls, name: str, controllers: tuple[str, ...] = V1_CONTROLLERS) -> "CgroupV1":
        own = _own_cgroups()
        dirs: dict[str, Path] = {}
        for root, mp, fs, opts in _mountinfo():
            if fs != "cgroup":
                continue
            for c in opts.split(","):
                if c in controllers and c not in dirs:
                    rel = own.get(c, "/")
                    # The mount's root may itself be a sub-cgroup (inside a cgroup namespace).
                    if rel.startswith(root) and root != "/":
                        rel = rel[len(root):] or "/"
                    dirs[c] = Path(mp) / rel.lstrip("/") / name
        return cls(dirs)

    def to_json(self) -> dict:
        return {"version": 1, "dirs": {k: str(v) for k, v in self.dirs.items()}}

    def create(self) -> None:
        for d in self.dirs.values():
            d.mkdir(exist_ok=True)
        dev = self.dirs.get("devices")
        if dev is not None:
            _write(dev / "devices.deny", "a")
            for rule in DEVICE_RULES:
                _write(dev / "devices.allow", rule)

    def apply(self, lim: Limits) -> None:
        if "memory" in self.dirs and lim.memory is not None:
            d = self.dirs["memory"]
            total = lim.swap_total()
            memsw = d / "memory.memsw.limit_in_bytes"
            has_swap = memsw.exists()
            # memsw must stay >= memory at every step: raise whichever the order requires.
            if has_swap and total is not None and total != -1:
                try:
                    _write(d / "memory.limit_in_bytes", str(lim.memory))
                    _write(memsw, str(total))
                except OSError:
                    _write(memsw, str(total))
                    _write(d / "memory.limit_in_bytes", str(lim.memory))
            else:
                _write(d / "memory.limit_in_bytes", str(lim.memory))
                if has_swap:
                    _write(memsw, "-1")
        if "cpu" in self.dirs and lim.cpus is not None:
            d = self.dirs["cpu"]
            _write(d / "cpu.cfs_period_us", str(CPU_PERIOD))
            _write(d / "cpu.cfs_quota_us", str(int(lim.cpus * CPU_PERIOD)))
        if "pids" in self.dirs and lim.pids is not None:
            _write(self.dirs["pids"] / "pids.max", "max" if lim.pids <= 0 else str(lim.pids))
        if "blkio" in self.dirs:
            d = self.dirs["blkio"]
            for dev, rate in lim.read_bps:
                _write(d / "blkio.throttle.read_bps_device", f"{dev} {rate}")
            for dev, rate in lim.write_bps:
                _write(d / "blkio.throttle.write_bps_device", f"{dev} {rate}")

    def add(self, pid: int) -> None:
        for d in self.dirs.values():
            _write(d / "cgroup.procs", str(pid))

    def release_from_memory(self, pid: int) -> None:
        """Move `pid` back to the parent memory cgroup (v1 hierarchies are independent, the others stay)."""
        d = self.dirs.get("memory")
        if d is not None:
            _write(d.parent / "cgroup.procs", str(pid))

    def procs_file(self) -> list[Path]:
        return [d / "cgroup.procs" for d in self.dirs.values()]

    def oom_killed(self) -> bool:
        d = self.dirs.get("memory")
        return d is not None and _oom_kills(d / "memory.oom_control")

    def pids(self) -> list[int]:
        out: set[int] = set()
        for p in self.procs_file():
            try:
                out.update(int(x) for x in p.read_text().split())
            except OSError:
                pass
        return sorted(out)

    def freeze(self, frozen: bool) -> None:
        d = self.dirs.get("freezer")
        if d is None:
            raise OSError(errno.ENOTSUP, "no freezer cgroup")
        _write(d / "freezer.state", "FROZEN" if frozen else "THAWED")
        want = "FROZEN" if frozen else "THAWED"
        for _ in range(200):
            if (d / "freezer.state").read_text().strip() == want:
                return
            time.sleep(0.01)

    def remove(self) -> None:
        for d in self.dirs.values():
            _rmdir(d)


class CgroupV2:
    """A single directory in the unified hierarchy, under the caller's cgroup."""

    version = 2

    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def for_container(cls, name: str) -> "CgroupV2":
        own = _own_cgroups().get("", "/")
        for root, mp, fs, _ in _mountinfo():
            if fs == "cgroup2":
                rel = own[len(root):] if root != "/" and own.startswith(root) else own
                return cls(Path(mp) / rel.lstrip("/") / name)
        raise OSError(errno.ENOENT, "no cgroup2 mount")

    def to_json(self) -> dict:
        return {"version": 2, "path": str(self.path)}

    def create(self) -> None:
        parent = self.path.parent
        # Controllers must be enabled in the parent before the child's files appear.
        avail = (parent / "cgroup.controllers").read_text().split() if (parent / "cgroup.controllers").exists() else []
        want = [c for c in ("cpu", "memory", "pids", "io") if c in avail]
        if want:
            try:
                _write(parent / "cgroup.subtree_control", " ".join("+" + c for c in want))
            except OSError as e:
                # EBUSY: the parent has processes of its own (no internal processes rule); limits then cannot apply.
                if e.errno != errno.EBUSY:
                    raise
        self.path.mkdir(exist_ok=True)

    def apply(self, lim: Limits) -> None:
        p = self.path
        need = {"memory": lim.memory is not None, "cpu": lim.cpus is not None, "pids": lim.pids is not None,
                "io": bool(lim.read_bps or lim.write_bps)}
        try:
            enabled = (p / "cgroup.controllers").read_text().split()
        except OSError:
            enabled = []
        for ctrl, wanted in need.items():
            if wanted and ctrl not in enabled:
                raise OSError(errno.ENOTSUP, f"the {ctrl} controller is not available in {p.parent} (cgroup v2: run "
                              f"lamina from a cgroup of its own with {ctrl} delegated, e.g. systemd-run --scope)")
        if lim.memory is not None:
            _write(p / "memory.max", str(lim.memory))
            total = lim.swap_total()
            if total is not None:
                _write(p / "memory.swap.max", "max" if total == -1 else str(max(0, total - lim.memory)))
        if lim.cpus is not None:
            _write(p / "cpu.max", f"{int(lim.cpus * CPU_PERIOD)} {CPU_PERIOD}")
        if lim.pids is not None:
            _write(p / "pids.max", "max" if lim.pids <= 0 else str(lim.pids))
        devs: dict[str, list[str]] = {}
        for dev, rate in lim.read_bps:
            devs.setdefault(dev, []).append(f"rbps={rate}")
        for dev, rate in lim.write_bps:
            devs.setdefault(dev, []).append(f"wbps={rate}")
        for dev, parts in devs.items():
            _write(p / "io.max", f"{dev} {' '.join(parts)}")

    def add(self, pid: int) -> None:
        _write(self.path / "cgroup.procs", str(pid))

    def procs_file(self) -> list[Path]:
        return [self.path / "cgroup.procs"]

    def oom_killed(self) -> bool:
        return _oom_kills(self.path / "memory.events")

    def pids(self) -> list[int]:
        try:
            return sorted(int(x) for x in (self.path / "cgroup.procs").read_text().split())
        except OSError:
            return []

    def freeze(self, frozen: bool) -> None:
        _write(self.path / "cgroup.freeze", "1" if frozen else "0")
        want = f"frozen {1 if frozen else 0}"
        for _ in range(200):  # the kernel reports completion in cgroup.events
            try:
                if want in (self.path / "cgroup.events").read_text().splitlines():
                    return
            except OSError:
                return
            time.sleep(0.01)

    def remove(self) -> None:
        _rmdir(self.path)


Cgroup = CgroupV1 | CgroupV2


def for_container(name: str) -> Cgroup:
    return CgroupV1.for_container(name) if detect_version() == 1 else CgroupV2.for_container(name)


def from_json(d: dict) -> Cgroup:
    if d.get("version") == 2:
        return CgroupV2(Path(d["path"]))
    return CgroupV1({k: Path(v) for k, v in d["dirs"].items()})


def _rmdir(d: Path) -> None:
    # rmdir first: on cgroupfs it is all it takes. A test tree laid out like cgroupfs has real files to remove.
    # A cgroup can only be removed once empty; processes may take a moment to be reaped after a kill.
    for _ in range(100):
        try:
            os.rmdir(d)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno == errno.ENOTEMPTY and not _on_cgroupfs(d):
                for f in d.iterdir():
                    if f.is_file():
                        f.unlink()
                continue
            if e.errno != errno.EBUSY:
                raise
            time.sleep(0.02)
    os.rmdir(d)
