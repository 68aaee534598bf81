"""Rows that time lamina's commands rather than a filesystem: `run --rm IMAGE /bin/true` against podman, store
size of a dedup corpus against the sum of its layer tars, and import throughput.

These rows do not mount anything themselves; each maps the report's columns to what it compares: in the run row the
kernel-overlay and fuse-overlayfs columns are podman + runc on kernel overlayfs and on fuse-overlayfs.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

from bench import data, mounts, peers
from bench.contenders import Contender, tool
from bench.workloads import Target, Trial, Workload, at_most, lamina_of

CMD_TIMEOUT = 1800


def lamina(root: Path, *args: str, capture: bool = False) -> str:
    exe = tool("lamina") or "lamina"
    p = subprocess.run([exe, "--root", str(root), *args], stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=CMD_TIMEOUT)
    if p.returncode != 0:
        msg = (p.stderr.strip() or p.stdout.strip() or "").splitlines()
        raise RuntimeError(f"lamina {args[0]}: {msg[-1] if msg else ''} (exit {p.returncode})")
    return p.stdout


def has_command(*words: str) -> str | None:
    """None when `lamina WORDS --help` works, else why not."""
    exe = tool("lamina")
    if not exe:
        return "lamina not installed"
    p = subprocess.run([exe, *words, "--help"], capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        msg = (p.stderr.strip() or p.stdout.strip()).splitlines()
        return f"lamina {' '.join(words)}: {msg[-1] if msg else 'exit %d' % p.returncode}"
    return None


class CliWorkload(Workload):
    mounts = False
    premount = False
    commands: tuple[str, ...] = ("import",)

    def applies(self, c: Contender) -> str | None:
        if c.name != "lamina":
            return "lamina only"
        missing = [r for r in (has_command(w) for w in self.commands) if r]
        return f"not available: {missing[0]}" if missing else None


class ImportLarge(CliWorkload):
    name, unit, higher_better = "import-large", "MB/s", True
    targets = (Target("import ≥ 150 MB/s", lambda m: None if lamina_of(m) is None else lamina_of(m) >= 150),)

    @property
    def title(self):
        return f"import throughput, {(self.p.big_file + self.p.copyup_file) >> 20} MiB in 2 large files"

    def image(self):
        return "big", [data.big_image(self.p)]

    def prepare(self):
        self.src = self.image()[1][0]
        self.amount = sum(f.stat().st_size for f in self.src.rglob("*") if f.is_file()) / 1e6  # MB

    def run(self, t: Trial) -> float:
        t0 = time.perf_counter()
        lamina(t.tmp / "store", "import", str(self.src), "-t", "bench-import")
        return self.amount / (time.perf_counter() - t0)


class ImportSmall(ImportLarge):
    name, unit = "import-small", "files/s"
    targets = (Target("import ≥ 5,000 files/s", lambda m: None if lamina_of(m) is None else lamina_of(m) >= 5000),)

    @property
    def title(self):
        return f"import throughput, {self.p.import_small:,} small files"

    def image(self):
        return "smallfiles", [data.small_files(self.p)]

    def prepare(self):
        self.src = self.image()[1][0]
        self.amount = sum(1 for f in self.src.rglob("*") if f.is_file())


HOST_CORPUS = {  # image name -> host trees added to the python root filesystem (see data.python_rootfs)
    "py": [],
    "py-perl": ["/usr/share/perl"],
    "py-zoneinfo-include": ["/usr/share/zoneinfo", "/usr/include"],
}
DEBOOTSTRAP_CORPUS = {"minbase": [], "minbase+python3": ["python3"], "minbase+curl+git": ["curl", "git"]}


def debootstrap_corpus() -> list[Path]:
    """Three Debian root filesystems built independently by debootstrap, as single-layer tars (cached)."""
    return [data.debootstrap_tar(name, pkgs) for name, pkgs in DEBOOTSTRAP_CORPUS.items()]


def host_corpus() -> list[Path]:
    """Three images from this host's Debian files sharing a base: the python rootfs, plus perl, plus zoneinfo and
    /usr/include. Needs no network, so --quick uses it."""
    base = data.python_rootfs()
    tars = []
    for name, extras in HOST_CORPUS.items():
        path = data.CACHE / f"corpus-{name}.tar"
        if not path.exists():
            tmp = path.with_suffix(".part")
            with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
                tf.add(base, arcname=".")
                for e in extras:
                    tf.add(e, arcname="." + e)
            tmp.rename(path)
        tars.append(path)
    return tars


class StoreSize(CliWorkload):
    """Single-layer images of Debian root filesystems built independently, imported side by side.

    The full run uses three debootstrap root filesystems (minbase, + python3, + curl and git), as the store issue
    asks; --quick, or a full run where debootstrap fails, uses the host corpus (see host_corpus), and says so.
    Each image is one layer tar, so layer-level sharing (Docker's model) saves nothing unless two tars are
    identical: only file-level dedup can.
    """
    name, unit = "store-size", "B"
    reps = 1
    commands = ("import", "df")
    corpus = "host"

    @property
    def title(self):
        if self.corpus == "debootstrap":
            return f"store bytes on disk, debootstrap corpus ({', '.join(DEBOOTSTRAP_CORPUS)})"
        return f"store bytes on disk, host corpus ({', '.join(HOST_CORPUS)})"

    targets = (Target("store ≤ 0.5 × sum of layer tars", at_most("sum of layer tars", 0.5)),)

    def image(self):
        return "rootfs", [data.python_rootfs()]

    def prepare(self):
        self.why_not_debootstrap = ""
        self.tars = []
        if self.p.name == "full":
            try:
                self.tars, self.corpus = debootstrap_corpus(), "debootstrap"
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                self.why_not_debootstrap = f"debootstrap corpus failed ({e}); host corpus used"
        if not self.tars:
            self.tars, self.corpus = host_corpus(), "host"
        digests = {}
        for p in self.tars:
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while b := f.read(1 << 20):
                    h.update(b)
            digests[h.hexdigest()] = p.stat().st_size
        self.tar_sum = sum(p.stat().st_size for p in self.tars)
        self.layer_sharing = sum(digests.values())

    def refs(self) -> dict[str, float]:
        return {"sum of layer tars": float(self.tar_sum), "layer-level sharing": float(self.layer_sharing)}

    def notes(self) -> list[str]:
        return [f"sum of layer tars {self.tar_sum / 1e6:.1f} MB",
                f"layer-level sharing (Docker's model) {self.layer_sharing / 1e6:.1f} MB",
                *([self.why_not_debootstrap] if self.why_not_debootstrap else [])]

    def run(self, t: Trial) -> float:
        root = t.tmp / "store"
        for i, tar in enumerate(self.tars):
            lamina(root, "import", str(tar), "-t", f"corpus-{i}")
        df = json.loads(lamina(root, "df", "--format", "json", capture=True))
        if "disk_bytes" not in df:
            raise RuntimeError("lamina df --format json has no disk_bytes")
        return float(df["disk_bytes"])


class RunTrue(CliWorkload):
    """`lamina run --rm IMAGE /bin/true` against podman with runc, on kernel overlayfs and on fuse-overlayfs."""
    name = "run-true"
    title = "run --rm busybox /bin/true (other columns: podman + runc on that filesystem as mount program or driver)"
    targets = (Target("run no slower than podman (runc + kernel overlay)", lambda m: None if lamina_of(m) is None
                      or "kernel-overlay" not in m else lamina_of(m) <= m["kernel-overlay"]),)
    PODMAN = {"kernel-overlay": [],
              "fuse-overlayfs": ["--storage-opt", "overlay.mount_program=/usr/bin/fuse-overlayfs"],
              # lamina's drop-in as podman's mount program (the union filesystem issue asks that it work as one)
              "lamina-fs": ["--storage-opt", f"overlay.mount_program={tool('lamina-fs') or 'lamina-fs'}"]}

    def image(self):
        return "small", [data.small_image()]

    def applies(self, c):
        if c.name not in ("lamina", *self.PODMAN):
            return "no container runtime on this contender"
        if reason := has_command("run"):
            return f"not available: {reason}"
        if c.name != "lamina" and self.missing:
            return f"not available: {' '.join(self.missing)} not installed"
        return None

    def prepare(self):
        self.missing, self.broken = [], {}
        if has_command("run") is not None:
            return  # the row compares lamina with podman: no lamina run, no row, no podman install
        self.missing = peers.ensure(["podman", "runc"])
        rootfs = self.image()[1][0]
        self.tar = data.CACHE / "small-busybox.tar"
        if not self.tar.exists():
            subprocess.run(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(self.tar), "."], check=True)
        self.base = self.scratch / "run-row"
        self.runroot = Path(tempfile.mkdtemp(prefix="lamina-bench-", dir="/run"))
        # a column whose image cannot be set up fails in its trials (run() raises), the others still run
        try:
            lamina(self.base / "lamina", "import", str(rootfs), "-t", "bench-busybox")
        except RuntimeError as e:
            self.broken["lamina"] = str(e)
        for name in [] if self.missing else self.PODMAN:
            p = subprocess.run(self._podman(name, "import", str(self.tar), "bench-busybox"),
                               stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
            if p.returncode != 0:
                self.broken[name] = f"podman import: {(p.stderr.strip().splitlines() or ['?'])[-1]}"

    def finish(self):
        if getattr(self, "base", None):
            mounts.cleanup_all(self.base)
        if getattr(self, "runroot", None):
            mounts.cleanup_all(self.runroot)
            shutil.rmtree(self.runroot, ignore_errors=True)

    def _podman(self, name: str, *args: str) -> list[str]:
        d = self.base / name
        # podman refuses a runroot longer than 50 characters
        return ["podman", "--root", str(d / "root"), "--runroot", str(self.runroot / name[0]), "--storage-driver", "overlay",
                *self.PODMAN[name], "--runtime", "runc", "--cgroup-manager", "cgroupfs", "--events-backend", "none",
                *args]

    def run(self, t):
        if t.contender.name in self.broken:
            raise RuntimeError(self.broken[t.contender.name])
        if t.contender.name == "lamina":
            # --network none on both sides (podman's below): the row measures the runtime and the mount, not
            # bridge set-up (Docker's default network since lamina has one; podman's default differs by version)
            cmd = [tool("lamina") or "lamina", "--root", str(self.base / "lamina"), "run", "--rm", "--network", "none",
                   "bench-busybox", "/bin/true"]
        else:
            # podman raises nofile/nproc to values a root without CAP_SYS_RESOURCE (this VM) may not set: pin them
            cmd = self._podman(t.contender.name, "run", "--rm", "--network", "none", "--ulimit", "nofile=4096:4096",
                               "--ulimit", "nproc=4096:4096", "bench-busybox", "/bin/true")
        t0 = time.perf_counter()
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        dt = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(f"{cmd[0]} run: {(p.stderr.strip().splitlines() or ['?'])[-1]} (exit {p.returncode})")
        return dt


CLI_WORKLOADS: list[type[Workload]] = [RunTrue, StoreSize, ImportLarge, ImportSmall]
