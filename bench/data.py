"""The shared data: every contender reads the very same layer directories, built once and cached on disk.

Each data set is a directory tree (one layer) under the cache root, built by a deterministic function of the
profile's sizes and marked complete only when fully written, so an interrupted build is redone, never half-used.
Every layer has an empty `scratch/` directory: the write workloads work below it (see contenders.Native).
"""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import peers

CACHE = Path(os.environ.get("LAMINA_BENCH_CACHE", "/var/tmp/lamina-bench/data"))
MiB = 1 << 20


@dataclass(frozen=True)
class Profile:
    """Sizes of one benchmark run; `quick` fits in 5 minutes on 2 cores, `full` is the issue's figures."""
    name: str
    reps: int
    many_files: int  # the large image: mount time and daemon memory
    tree_files: int  # stat of every file
    flat_entries: int  # readdir of one directory
    big_file: int  # sequential and random reads
    copyup_file: int
    random_reads: int
    storm_files: int
    fsync_write: int
    import_small: int
    timeout: float  # per trial

    def asdict(self) -> dict:
        return asdict(self)


QUICK = Profile("quick", reps=3, many_files=20_000, tree_files=5_000, flat_entries=5_000, big_file=128 * MiB,
                copyup_file=64 * MiB, random_reads=2_000, storm_files=1_000, fsync_write=64 * MiB,
                import_small=5_000, timeout=120)
FULL = Profile("full", reps=5, many_files=100_000, tree_files=20_000, flat_entries=10_000, big_file=1024 * MiB,
               copyup_file=256 * MiB, random_reads=20_000, storm_files=10_000, fsync_write=256 * MiB,
               import_small=20_000, timeout=900)
TINY = Profile("tiny", reps=1, many_files=200, tree_files=100, flat_entries=100, big_file=1 * MiB,
               copyup_file=1 * MiB, random_reads=50, storm_files=50, fsync_write=1 * MiB, import_small=100,
               timeout=60)
PROFILES = {p.name: p for p in (QUICK, FULL, TINY)}


def _cached(key: str, build) -> Path:
    """The directory for `key`, building it with `build(dir)` unless a complete copy exists."""
    d = CACHE / key
    stamp = CACHE / f"{key}.complete"
    if stamp.exists() and d.exists():
        return d
    shutil.rmtree(d, ignore_errors=True)
    stamp.unlink(missing_ok=True)
    d.mkdir(parents=True)
    build(d)
    stamp.touch()
    return d


def _payload(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(n)


def _file_tree(root: Path, n: int, seed: int, per_dir: int = 100, max_size: int = 4096) -> None:
    rng = random.Random(seed)
    for i in range(n):
        d = root / f"d{i // per_dir:05d}"
        if i % per_dir == 0:
            d.mkdir(parents=True)
        (d / f"f{i % per_dir:03d}").write_bytes(_payload(rng, rng.randrange(0, max_size)))


def _big(path: Path, size: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # os.urandom seeded-free is fine: content only has to be incompressible and shared by every contender
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 16 * MiB)
            f.write(os.urandom(n))
            left -= n


def small_image() -> Path:
    """A busybox root filesystem from Debian's busybox-static: the binary and its applet symlinks."""
    def build(d: Path) -> None:
        (d / "scratch").mkdir()
        for sub in ("bin", "etc", "tmp", "proc", "dev", "sys", "root"):
            (d / sub).mkdir()
        shutil.copy2("/bin/busybox", d / "bin" / "busybox")
        applets = subprocess.run(["/bin/busybox", "--list"], capture_output=True, text=True, check=True).stdout
        for a in applets.split():
            if a != "busybox":
                (d / "bin" / a).symlink_to("busybox")
        (d / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        (d / "etc" / "group").write_text("root:x:0:\n")
    return _cached("small-busybox", build)


MANY_LAYERS = 4


def many_image(p: Profile) -> list[Path]:
    """The large image: many_files files in MANY_LAYERS layers, returned top layer first (overlay's lowerdir order).

    Directories are dealt round-robin to the layers, so every directory lookup has layers to search; each upper
    layer also replaces 10 files of the bottom layer, so merged directories occur and the count stays many_files.
    """
    def build(d: Path) -> None:
        rng = random.Random(1)
        per_dir = 100
        for k in range(MANY_LAYERS):
            (d / f"layer{k}" / "scratch").mkdir(parents=True)
        for i in range(p.many_files):
            k = (i // per_dir) % MANY_LAYERS
            sub = d / f"layer{k}" / "usr" / f"d{i // per_dir:05d}"
            if i % per_dir == 0:
                sub.mkdir(parents=True)
            (sub / f"f{i % per_dir:03d}").write_bytes(_payload(rng, rng.randrange(0, 2048)))
        for k in range(1, MANY_LAYERS):
            sub = d / f"layer{k}" / "usr" / "d00000"
            sub.mkdir(parents=True)
            for j in range(min(10, p.many_files)):
                (sub / f"f{j:03d}").write_bytes(f"layer {k} replaces file {j}\n".encode())
    d = _cached(f"many-{p.many_files}-{MANY_LAYERS}", build)
    return [d / f"layer{k}" for k in reversed(range(MANY_LAYERS))]


def docker_archive(key: str, layers: list[Path]) -> Path:
    """A `docker save` archive of `layers` (top first), the way a multi-layer image reaches lamina's store."""
    def build(d: Path) -> None:
        import hashlib
        import json
        names, diff_ids = [], []
        for k, layer in enumerate(reversed(layers)):  # docker lists the bottom layer first
            tar = d / f"l{k}.tar"
            subprocess.run(["tar", "-C", str(layer), "--numeric-owner", "--sort=name", "-cf", str(tar), "."],
                           check=True)
            h = hashlib.sha256()
            with open(tar, "rb") as f:
                while b := f.read(MiB):
                    h.update(b)
            (d / h.hexdigest()).mkdir()
            tar.rename(d / h.hexdigest() / "layer.tar")
            names.append(f"{h.hexdigest()}/layer.tar")
            diff_ids.append(f"sha256:{h.hexdigest()}")
        config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                             "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
        cid = hashlib.sha256(config).hexdigest()
        (d / f"{cid}.json").write_bytes(config)
        (d / "manifest.json").write_text(json.dumps(
            [{"Config": f"{cid}.json", "RepoTags": [f"bench-{key}:latest"], "Layers": names}]))
        subprocess.run(["tar", "-C", str(d), "-cf", str(d / "image.tar"), "manifest.json", f"{cid}.json",
                        *{n.split("/")[0] for n in names}], check=True)
    return _cached(f"archive-{key}-{len(layers)}", build) / "image.tar"


def tree_image(p: Profile) -> Path:
    """`tree/` with tree_files files for the stat row and `flat/` with flat_entries names for the readdir row."""
    def build(d: Path) -> None:
        (d / "scratch").mkdir()
        _file_tree(d / "tree", p.tree_files, seed=2)
        (d / "flat").mkdir()
        for i in range(p.flat_entries):
            (d / "flat" / f"entry-{i:06d}").touch()
    return _cached(f"tree-{p.tree_files}-{p.flat_entries}", build)


def big_image(p: Profile) -> Path:
    """`big/file` for reads, `cu/file` for copy-up."""
    def build(d: Path) -> None:
        (d / "scratch").mkdir()
        _big(d / "big" / "file", p.big_file, seed=3)
        _big(d / "cu" / "file", p.copyup_file, seed=4)
    return _cached(f"big-{p.big_file}-{p.copyup_file}", build)


def _ldd(binary: str) -> list[str]:
    out = subprocess.run(["ldd", binary], capture_output=True, text=True).stdout
    libs = []
    for line in out.splitlines():
        parts = line.split()
        for tok in parts:
            if tok.startswith("/"):
                libs.append(tok)
                break
    return libs


def _copy_into(root: Path, path: str) -> None:
    """Copy host file `path` into `root` at the same path, resolving symlinks the way the merged-/usr host does."""
    real = os.path.realpath(path)
    dst = root / real.lstrip("/")
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(real, dst)
    # the name the loader asks for (a soname link, or a path through /lib -> usr/lib)
    alias = root / os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path)).lstrip("/")
    if alias != dst and not alias.exists() and not alias.is_symlink():
        alias.parent.mkdir(parents=True, exist_ok=True)
        alias.symlink_to(os.path.relpath(dst, alias.parent))


def python_rootfs() -> Path:
    """A real, minimal Debian root filesystem for one application: busybox, python3.11, its stdlib and libraries,
    copied from this host's Debian packages (merged /usr, so /bin, /lib, /lib64 are links into usr/)."""
    def build(d: Path) -> None:
        (d / "scratch").mkdir()
        for sub in ("usr/bin", "usr/lib", "usr/lib64", "etc", "tmp", "proc", "dev", "root"):
            (d / sub).mkdir(parents=True)
        for link, target in (("bin", "usr/bin"), ("lib", "usr/lib"), ("lib64", "usr/lib64"), ("sbin", "usr/bin")):
            (d / link).symlink_to(target)
        shutil.copy2("/bin/busybox", d / "usr/bin/busybox")
        (d / "usr/bin/sh").symlink_to("busybox")
        shutil.copytree("/usr/lib/python3.11", d / "usr/lib/python3.11", symlinks=True,
                        ignore=shutil.ignore_patterns("site-packages", "dist-packages", "test", "idlelib"))
        shutil.copy2("/usr/bin/python3.11", d / "usr/bin/python3.11")
        (d / "usr/bin/python3").symlink_to("python3.11")
        binaries = ["/usr/bin/python3.11"] + [str(p) for p in Path("/usr/lib/python3.11/lib-dynload").glob("*.so")]
        for b in binaries:
            for lib in _ldd(b):
                _copy_into(d, lib)
        (d / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    return _cached("rootfs-python3.11", build)


def stdlib_tar() -> Path:
    """A tarball of a real source tree: the Python standard library of this host (no tests, no site-packages)."""
    def build(d: Path) -> None:
        with tarfile.open(d / "stdlib.tar", "w") as tf:
            tf.add("/usr/lib/python3.11", arcname="python3.11", filter=lambda ti: None if any(
                s in ti.name.split("/") for s in ("site-packages", "dist-packages", "test", "__pycache__")) else ti)
    return _cached("stdlib-tar", build) / "stdlib.tar"


def small_files(p: Profile) -> Path:
    """`import_small` files of 0–4 KiB of distinct random content, 100 to a directory."""
    def build(d: Path) -> None:
        _file_tree(d / "files", p.import_small, seed=6)
    return _cached(f"smallfiles-{p.import_small}", build)


def _mirror() -> str:
    """The Debian mirror apt is configured with (the only place the network reaches)."""
    for f in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        try:
            lines = f.read_text().splitlines()
        except OSError:
            continue
        for ln in lines:
            words = ln.split()
            urls = words[1:] if words[:1] == ["URIs:"] else words[1:2] if words[:1] == ["deb"] else []
            for u in urls:
                if u.startswith("http") and u.rstrip("/").endswith("/debian"):
                    return u
    return "http://deb.debian.org/debian"


def _suite() -> str:
    for ln in Path("/etc/os-release").read_text().splitlines():
        if ln.startswith("VERSION_CODENAME="):
            return ln.split("=", 1)[1].strip('"')
    return "bookworm"


def debootstrap_tar(name: str, pkgs: list[str]) -> Path:
    """A Debian root filesystem (minbase plus `pkgs`) built by debootstrap from apt's mirror, as a layer tar."""
    path = CACHE / f"corpus-debootstrap-{name}.tar"
    if path.exists():
        return path
    if peers.ensure(["debootstrap"]):
        raise RuntimeError("debootstrap not installable")
    target = CACHE / f"debootstrap-{name}.build"
    shutil.rmtree(target, ignore_errors=True)
    (CACHE / "debs").mkdir(parents=True, exist_ok=True)
    cmd = ["debootstrap", "--variant=minbase", f"--cache-dir={CACHE / 'debs'}",
           *([f"--include={','.join(pkgs)}"] if pkgs else []), _suite(), str(target), _mirror()]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if p.returncode != 0:
            raise RuntimeError(f"debootstrap {name}: {(p.stdout + p.stderr).strip().splitlines()[-1:]}")
        for deb in (target / "var/cache/apt/archives").glob("*.deb"):
            deb.unlink()  # what an image build removes too
        part = path.with_suffix(".part")
        subprocess.run(["tar", "-C", str(target), "--numeric-owner", "-cf", str(part), "."], check=True)
        part.rename(path)
    finally:
        shutil.rmtree(target, ignore_errors=True)
    return path


def debootstrap_rootfs(name: str, pkgs: list[str]) -> Path:
    """The same root filesystem as a layer directory (with the `scratch/` every layer here has)."""
    tar = debootstrap_tar(name, pkgs)

    def build(d: Path) -> None:
        subprocess.run(["tar", "-C", str(d), "--numeric-owner", "-xpf", str(tar)], check=True)
        (d / "scratch").mkdir(exist_ok=True)
    return _cached(f"debootstrap-{name}", build)
