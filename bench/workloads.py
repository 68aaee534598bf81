"""The filesystem workloads and the registry of every row, in report order.

A workload is prepared once per run in the parent (data sets, path lists), then for every trial: the runner mounts
the contender (unless the workload times the mount itself), calls `setup` (untimed), `run` (the measured value:
seconds, or bytes for memory) and `teardown`, in a child process, and unmounts. Workloads check what they read, so
a contender that answers wrongly fails the row instead of winning it.
"""
from __future__ import annotations

import os
import random
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bench import data
from bench.contenders import Contender
from bench.data import MiB, Profile

Medians = dict[str, float]


@dataclass
class Trial:
    """One contender, one fresh upper/work/mount point, for one measured repetition."""
    contender: Contender
    layers: list[Path]
    upper: Path
    work: Path
    mnt: Path
    tmp: Path
    profile: Profile
    state: dict = field(default_factory=dict)

    def mount(self) -> None:
        self.contender.mount(self.layers, self.upper, self.work, self.mnt)


@dataclass(frozen=True)
class Target:
    """A goal from the issues; `check(medians)` is True (met), False (missed) or None (cannot be judged)."""
    text: str
    check: Callable[[Medians], bool | None]


def lamina_of(m: Medians) -> float | None:
    """lamina's figure in a row: the store-backed mount, else lamina-fs over plain directories."""
    return m.get("lamina", m.get("lamina-fs"))


def at_most(ref: str, factor: float = 1.0) -> Callable[[Medians], bool | None]:
    def check(m: Medians) -> bool | None:
        mine, theirs = lamina_of(m), m.get(ref)
        return None if mine is None or theirs is None else mine <= factor * theirs
    return check


def below(limit: float) -> Callable[[Medians], bool | None]:
    def check(m: Medians) -> bool | None:
        mine = lamina_of(m)
        return None if mine is None else mine < limit
    return check


BEAT_FUSE = Target("lamina ≤ fuse-overlayfs", at_most("fuse-overlayfs"))


class Workload:
    name = ""
    title = ""
    unit = "s"  # "s" or "B"; lower is better unless higher_better
    higher_better = False
    premount = True
    mounts = True  # False: the row runs commands, contenders' mount availability and preparation do not apply
    reps: int | None = None  # None: the profile's
    # one untimed trial per contender first, so every contender's lower data (lamina's store objects included,
    # which the layer-directory warming in setup cannot reach) starts in the page cache
    warmup = False
    targets: tuple[Target, ...] = (BEAT_FUSE,)

    def __init__(self, profile: Profile, scratch: Path | None = None):
        self.p = profile
        self.scratch = scratch or Path("/var/tmp/lamina-bench")

    def image(self) -> tuple[str, list[Path]]:
        """The data set's key and its layer directories (built here, in the parent, cached)."""
        raise NotImplementedError

    def applies(self, c: Contender) -> str | None:
        """None when the row applies to `c`, else why not (shown as n/a)."""
        return None

    def prepare(self) -> None:
        """Once per run, in the parent, after the data exists."""

    def notes(self) -> list[str]:
        """Figures to print beside the row (after prepare)."""
        return []

    def refs(self) -> dict[str, float]:
        """Reference figures charted beside the contenders (after prepare), in the row's unit."""
        return {}

    def finish(self) -> None:
        """Once per run, in the parent, after the last trial (even a failed one)."""

    def setup(self, t: Trial) -> None:
        pass

    def run(self, t: Trial) -> float:
        raise NotImplementedError

    def teardown(self, t: Trial) -> None:
        pass


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def read_all(path: Path) -> int:
    buf = bytearray(MiB)
    n = 0
    with open(path, "rb", buffering=0) as f:
        while k := f.readinto(buf):
            n += k
    return n


def _expect(what: str, got, want) -> None:
    if got != want:
        raise RuntimeError(f"{what}: got {got}, expected {want}")


class OnSmall(Workload):
    """Rows on the busybox image (the write rows only need somewhere to write)."""
    top = "bin"

    def image(self):
        return "small", [data.small_image()]


class OnMany(Workload):
    """Rows on the large multi-layer image."""
    top = "usr"

    def image(self):
        return f"many{self.p.many_files}", data.many_image(self.p)


class OnBig(Workload):
    """Rows on the image holding the large files."""

    def image(self):
        return "big", [data.big_image(self.p)]


class OnTree(Workload):
    """Rows on the image holding the stat tree and the flat directory."""

    def image(self):
        return "tree", [data.tree_image(self.p)]


class MountSmall(OnSmall):
    """Mount time: from exec to the first listing of the root (a FUSE mount is served by then)."""
    name, title, premount = "mount-small", "mount, busybox image", False

    def run(self, t):
        t0 = time.perf_counter()
        t.mount()
        names = os.listdir(t.mnt)
        dt = time.perf_counter() - t0
        if self.top not in names:
            raise RuntimeError(f"mounted image has no {self.top}/")
        return dt


class MountMany(OnMany, MountSmall):
    name = "mount-many"
    targets = (BEAT_FUSE, Target("mount < 0.5 s", below(0.5)))

    @property
    def title(self):
        return f"mount, {self.p.many_files:,}-file image, {data.MANY_LAYERS} layers"


class ReadCold(OnBig):
    name = "read-cold"

    @property
    def title(self):
        return f"sequential read {self.p.big_file // MiB} MiB, cold cache"

    def setup(self, t):
        drop_caches()

    def run(self, t):
        t0 = time.perf_counter()
        n = read_all(t.mnt / "big" / "file")
        dt = time.perf_counter() - t0
        _expect("bytes read", n, self.p.big_file)
        return dt


class ReadWarm(ReadCold):
    name = "read-warm"
    targets = (BEAT_FUSE, Target("lamina ≥ 0.8 × kernel overlayfs throughput", at_most("kernel-overlay", 1 / 0.8)))

    @property
    def title(self):
        return f"sequential read {self.p.big_file // MiB} MiB, warm cache"

    def setup(self, t):
        read_all(t.mnt / "big" / "file")


class RandomReads(OnBig):
    name = "random-4k"
    warmup = True

    @property
    def title(self):
        return f"{self.p.random_reads:,} random 4 KiB reads"

    def setup(self, t):
        # the lower is warm in the page cache: the row measures the union layer, not the disk
        read_all(t.layers[0] / "big" / "file")
        rng = random.Random(5)
        pages = self.p.big_file // 4096
        t.state["offsets"] = [rng.randrange(pages) * 4096 for _ in range(self.p.random_reads)]

    def run(self, t):
        offsets = t.state["offsets"]
        fd = os.open(t.mnt / "big" / "file", os.O_RDONLY)
        try:
            t0 = time.perf_counter()
            n = sum(len(os.pread(fd, 4096, off)) for off in offsets)
            dt = time.perf_counter() - t0
        finally:
            os.close(fd)
        _expect("bytes read", n, 4096 * len(offsets))
        return dt


class StatTree(OnTree):
    name = "stat-tree"

    @property
    def title(self):
        return f"stat every file of a {self.p.tree_files:,}-file tree"

    def prepare(self):
        lower = self.image()[1][0]
        self.paths = sorted(str(p.relative_to(lower)) for p in (lower / "tree").rglob("*") if p.is_file())

    def run(self, t):
        root = str(t.mnt)
        t0 = time.perf_counter()
        for rel in self.paths:
            os.lstat(f"{root}/{rel}")
        return time.perf_counter() - t0


class ParallelRead(StatTree):
    """Concurrent callers: a single-threaded daemon serialises them (apptainer #665, REFERENCES.md §4)."""
    name = "parallel-read"
    procs = 4

    @property
    def title(self):
        return f"{self.procs} processes reading a quarter each of the {self.p.tree_files:,}-file tree"

    def run(self, t):
        root = str(t.mnt)
        t0 = time.perf_counter()
        pids = []
        for k in range(self.procs):
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    for rel in self.paths[k::self.procs]:
                        with open(f"{root}/{rel}", "rb") as f:
                            f.read()
                except BaseException:
                    code = 1
                os._exit(code)
            pids.append(pid)
        failed = sum(os.waitpid(pid, 0)[1] != 0 for pid in pids)
        dt = time.perf_counter() - t0
        if failed:
            raise RuntimeError(f"{failed} of {self.procs} readers failed")
        return dt


class Readdir(OnTree):
    name = "readdir"

    @property
    def title(self):
        return f"readdir of a {self.p.flat_entries:,}-entry directory"

    def run(self, t):
        t0 = time.perf_counter()
        with os.scandir(t.mnt / "flat") as it:
            n = sum(1 for _ in it)
        dt = time.perf_counter() - t0
        _expect("entries", n, self.p.flat_entries)
        return dt


class Storm(OnSmall):
    name = "create-unlink"

    @property
    def title(self):
        return f"create/write/close/unlink {self.p.storm_files:,} files"

    def setup(self, t):
        (t.mnt / "scratch" / "storm").mkdir()

    def run(self, t):
        d = f"{t.mnt}/scratch/storm"
        block = b"x" * 1024
        names = [f"{d}/f{i:06d}" for i in range(self.p.storm_files)]
        flags = os.O_CREAT | os.O_WRONLY | os.O_EXCL
        t0 = time.perf_counter()
        for n in names:
            fd = os.open(n, flags, 0o644)
            os.write(fd, block)
            os.close(fd)
        for n in names:
            os.unlink(n)
        dt = time.perf_counter() - t0
        _expect("files left", len(os.listdir(d)), 0)
        return dt


class FsyncWrite(OnSmall):
    name = "write-fsync"

    @property
    def title(self):
        return f"sequential write {self.p.fsync_write // MiB} MiB + fsync"

    def setup(self, t):
        t.state["block"] = os.urandom(MiB)

    def run(self, t):
        block = t.state["block"]
        t0 = time.perf_counter()
        fd = os.open(t.mnt / "scratch" / "out", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        try:
            for _ in range(self.p.fsync_write // MiB):
                os.write(fd, block)
            os.fsync(fd)
        finally:
            os.close(fd)
        return time.perf_counter() - t0

    def teardown(self, t):
        os.unlink(t.mnt / "scratch" / "out")


class CopyUp(OnBig):
    name = "copy-up"
    warmup = True
    targets = (BEAT_FUSE, Target("copy-up ≤ 1.5 × kernel overlayfs", at_most("kernel-overlay", 1.5)))

    @property
    def title(self):
        return f"copy-up of a {self.p.copyup_file // MiB} MiB lower file (open for write, 1-byte write)"

    def applies(self, c):
        return "no union, no copy-up" if c.name == "native" else None

    def setup(self, t):
        read_all(t.layers[0] / "cu" / "file")

    def run(self, t):
        t0 = time.perf_counter()
        fd = os.open(t.mnt / "cu" / "file", os.O_WRONLY)
        os.pwrite(fd, b"x", 0)
        os.close(fd)
        dt = time.perf_counter() - t0
        _expect("size after copy-up", os.stat(t.mnt / "cu" / "file").st_size, self.p.copyup_file)
        return dt


class Untar(OnSmall):
    name = "untar"

    @property
    def title(self):
        return "untar the Python stdlib into the container layer"

    def prepare(self):
        self.tar = data.stdlib_tar()

    def setup(self, t):
        (t.mnt / "scratch" / "untar").mkdir()

    def run(self, t):
        t0 = time.perf_counter()
        subprocess.run(["tar", "-xf", str(self.tar), "-C", str(t.mnt / "scratch" / "untar")], check=True)
        return time.perf_counter() - t0


APP_MODULES = ("json", "email.parser", "http.client", "asyncio", "decimal", "xml.etree.ElementTree", "argparse",
               "logging.handlers", "unittest", "concurrent.futures", "sqlite3", "csv", "zipfile", "tarfile",
               "urllib.request", "dataclasses", "typing", "pathlib", "subprocess", "hashlib")


APP_ENV = {"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"}


class AppImports(Workload):
    """python3 starting and importing modules in a chroot into the mount: on a debootstrap root filesystem
    (minbase + python3) in the full run, else on the host-made python root filesystem (data.python_rootfs)."""
    name = "app-python"
    rootfs = ""
    warmup = True

    @property
    def title(self):
        where = self.rootfs or "debootstrap minbase+python3 or host python rootfs"
        return f"python3 start + import {len(APP_MODULES)} stdlib modules (chroot, {where})"

    def image(self):
        if not self.rootfs and self.p.name == "full":
            try:
                self._layer, self.rootfs = data.debootstrap_rootfs("minbase+python3", ["python3"]), \
                    "debootstrap minbase+python3"
            except (RuntimeError, OSError, subprocess.SubprocessError):
                pass
        if not self.rootfs:
            self._layer, self.rootfs = data.python_rootfs(), "host python rootfs"
        return self.rootfs.split()[0], [self._layer]

    def _cmd(self, root: Path) -> list[str]:
        code = f"import {', '.join(APP_MODULES)}"
        return ["/usr/sbin/chroot", str(root), "/usr/bin/python3", "-I", "-c", code]

    def prepare(self):
        # warm the lower in the page cache, and prove the rootfs works before blaming a contender
        subprocess.run(self._cmd(self.image()[1][0]), check=True, env=APP_ENV)

    def run(self, t):
        t0 = time.perf_counter()
        subprocess.run(self._cmd(t.mnt), check=True, env=APP_ENV)
        return time.perf_counter() - t0


def vmrss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class DaemonRss(OnMany):
    name, unit = "daemon-rss", "B"
    targets = (BEAT_FUSE, Target("daemon < 150 MB resident", below(150e6)))

    @property
    def title(self):
        return f"daemon RSS after walking the {self.p.many_files:,}-file image"

    def applies(self, c):
        return None if c.has_daemon else "no daemon"

    def run(self, t):
        n = 0
        for top, dirs, files in os.walk(t.mnt):
            for f in files:
                os.lstat(os.path.join(top, f))
                n += 1
        _expect("files walked", n, self.p.many_files)
        pid = t.contender.daemon_pid(t.mnt)
        if pid is None:
            raise RuntimeError("daemon process not found")
        return float(vmrss(pid))


FS_WORKLOADS: list[type[Workload]] = [MountSmall, MountMany, ReadCold, ReadWarm, RandomReads, StatTree, ParallelRead,
                                      Readdir, Storm, FsyncWrite, CopyUp, Untar, AppImports, DaemonRss]


def registry() -> list[type[Workload]]:
    from bench import cli_rows
    return FS_WORKLOADS + cli_rows.CLI_WORKLOADS
