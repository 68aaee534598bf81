"""Mount helpers and tree snapshots for the union filesystem tests (real mounts: lamina-fs and kernel overlayfs).

Every mount helper is a context manager that unmounts in `finally`, falling back to a lazy unmount, so a failing
test never leaves a mount behind.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

BIN = Path(sys.executable).parent
LAMINA_FS = str(BIN / "lamina-fs")
INTERNAL_XATTRS = ("trusted.overlay.origin", "trusted.overlay.impure", "trusted.overlay.uuid",
                   "trusted.overlay.nlink", "trusted.overlay.lamina.", "trusted.lamina.")
# mtimes before this (2017) are compared exactly (set so by tests, in lower layers); later ones only as "new"
RECENT_NS = 1_500_000_000 * 10**9


def tmpdir(prefix: str = "lamina-ufs-") -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def is_mounted(path: str | os.PathLike) -> bool:
    p = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == p for line in f)


def unmount(path: str | os.PathLike) -> None:
    """Unmount, trying hard: FUSE unmount, plain umount, then a lazy one."""
    for cmd in (["fusermount3", "-u", "-q", str(path)], ["umount", str(path)], ["umount", "-l", str(path)]):
        if not is_mounted(path):
            return
        subprocess.run(cmd, capture_output=True, timeout=60)
    if is_mounted(path):
        raise RuntimeError(f"could not unmount {path}")


def _wait_daemon_gone(pid: int | None) -> None:
    if pid is None:
        return
    for _ in range(200):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)


def lamina_pid(mnt: str | os.PathLike) -> int | None:
    """The pid of the lamina-fs daemon serving `mnt` (found through /proc: the daemon's argv names it)."""
    target = os.path.realpath(mnt)
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"lamina-fs" in a for a in argv[:2]) and any(os.fsdecode(a) == target for a in argv):
            return int(pid)
    return None


@contextlib.contextmanager
def lamina_mount(lowers: list[Path], mnt: Path, upper: Path | None = None, work: Path | None = None,
                 extra: str = "", log: Path | None = None) -> Iterator[Path]:
    opts = "lowerdir=" + ":".join(map(str, lowers))
    if upper is not None:
        opts += f",upperdir={upper},workdir={work}"
    if log is not None:
        opts += f",log={log}"
    if extra:
        opts += "," + extra
    p = subprocess.run([LAMINA_FS, "-o", opts, str(mnt)], capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise RuntimeError(f"lamina-fs failed ({p.returncode}): {p.stderr}")
    pid = lamina_pid(mnt)
    try:
        yield mnt
    finally:
        unmount(mnt)
        _wait_daemon_gone(pid)


@contextlib.contextmanager
def kernel_mount(lowers: list[Path], mnt: Path, upper: Path | None = None, work: Path | None = None,
                 extra: str = "") -> Iterator[Path]:
    opts = "lowerdir=" + ":".join(map(str, lowers))
    if upper is not None:
        opts += f",upperdir={upper},workdir={work}"
    opts += ",redirect_dir=off,index=off,metacopy=off,xino=off"
    if extra:
        opts += "," + extra
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)], check=True, capture_output=True,
                   timeout=60)
    try:
        yield mnt
    finally:
        unmount(mnt)


def xattrs(path: str, internal: bool = False) -> dict[str, bytes]:
    out = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return out
    for n in names:
        if not internal and n.startswith(INTERNAL_XATTRS):
            continue
        try:
            out[n] = os.getxattr(path, n, follow_symlinks=False)
        except OSError as e:
            out[n] = f"<{e.errno}>".encode()
    return out


def describe(path: str, *, dir_nlink: bool = True, upper_view: bool = False, mtimes: bool = False) -> tuple:
    st = os.lstat(path)
    fmt = stat.S_IFMT(st.st_mode)
    d: dict = {"mode": oct(st.st_mode), "uid": st.st_uid, "gid": st.st_gid}
    if mtimes:
        d["mtime"] = st.st_mtime_ns if st.st_mtime_ns < RECENT_NS else "new"
    if fmt == stat.S_IFREG:
        with open(path, "rb") as f:
            d["sha"] = hashlib.sha256(f.read()).hexdigest()[:16]
        d["size"] = st.st_size
        d["nlink"] = st.st_nlink
    elif fmt == stat.S_IFLNK:
        d["target"] = os.readlink(path)
        d["nlink"] = st.st_nlink
    elif fmt == stat.S_IFDIR:
        if dir_nlink:
            d["nlink"] = st.st_nlink
    else:
        d["rdev"] = st.st_rdev
        if not (upper_view and stat.S_ISCHR(st.st_mode) and st.st_rdev == 0):
            d["nlink"] = st.st_nlink  # the kernel shares one inode among its whiteouts
    xs = xattrs(path, internal=False)
    if upper_view:
        xs = {k: v for k, v in xattrs(path, internal=True).items() if not k.startswith(INTERNAL_XATTRS)}
    if xs:
        d["xattrs"] = xs
    return tuple(sorted(d.items()))


def snapshot(root: Path, *, dir_nlink: bool = True, upper_view: bool = False, check_ino: bool = False,
             mtimes: bool = False) -> dict:
    """Every path below `root` with its description. `check_ino` also asserts readdir's d_ino equals st_ino;
    `mtimes` adds modification times (see RECENT_NS)."""
    out: dict[str, tuple] = {}
    stack = [""]
    while stack:
        rel = stack.pop()
        base = os.path.join(root, rel) if rel else str(root)
        with os.scandir(base) as it:
            entries = list(it)
        for de in entries:
            r = f"{rel}/{de.name}" if rel else de.name
            p = os.path.join(base, de.name)
            if check_ino:
                st_ino = os.lstat(p).st_ino
                assert de.inode() == st_ino, f"{r}: d_ino {de.inode()} != st_ino {st_ino}"
            out[r] = describe(p, dir_nlink=dir_nlink, upper_view=upper_view, mtimes=mtimes)
            if de.is_dir(follow_symlinks=False):
                stack.append(r)
    return out


def make_layers(base: Path) -> list[Path]:
    """Three lower layers (top first) exercising merge, whiteouts, opaque dirs, symlinks, xattrs and modes."""
    l0, l1, l2 = base / "l0", base / "l1", base / "l2"
    for d in (l0, l1, l2):
        d.mkdir()
    (l2 / "a").write_text("bottom a\n")
    (l2 / "d" / "sub").mkdir(parents=True)
    (l2 / "d" / "x").write_text("x from l2\n")
    (l2 / "d" / "y").write_text("y from l2\n")
    (l2 / "d" / "sub" / "z").write_text("z\n")
    (l2 / "e").mkdir()
    (l2 / "e" / "e1").write_text("e1\n")
    os.symlink("a", l2 / "f")
    (l2 / "g").mkdir()
    (l2 / "g" / "h").write_text("h\n")
    (l2 / "p").write_text("private\n")
    os.chmod(l2 / "p", 0o600)
    os.setxattr(l2 / "p", "user.k", b"v")
    os.setxattr(l2 / "d", "user.dir", b"l2")
    (l1 / "d").mkdir()
    (l1 / "d" / "y").write_text("y from l1\n")
    (l1 / "d" / "w").write_text("w\n")
    os.mknod(l1 / "e", stat.S_IFCHR, os.makedev(0, 0))  # whiteout hides l2/e
    (l1 / "g").mkdir()
    os.setxattr(l1 / "g", "trusted.overlay.opaque", b"y")  # hides l2/g/h
    (l1 / "g" / "i").write_text("i\n")
    (l1 / "b").write_bytes(b"\0" * 5000 + b"b")
    os.chmod(l1 / "b", 0o755)
    (l0 / "c").write_text("top c\n")
    (l0 / "d").mkdir()
    (l0 / "d" / "v").write_text("v\n")
    os.chmod(l0 / "d", 0o750)
    return [l0, l1, l2]


def layer_tar(d: Path) -> bytes:
    """An OCI layer tar of directory `d`, overlay markers translated to `.wh.` entries, xattrs as PAX records."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for top, dirs, files in os.walk(d):
            dirs.sort()
            for name in sorted(dirs + files):
                p = Path(top) / name
                rel = str(p.relative_to(d))
                st = os.lstat(p)
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                    parent = str(Path(rel).parent)
                    t = tarfile.TarInfo((parent + "/" if parent != "." else "") + ".wh." + name)
                    tf.addfile(t, io.BytesIO(b""))
                    continue
                t = tf.gettarinfo(str(p), arcname=rel)
                xs = {k: v for k, v in ((n, os.getxattr(p, n, follow_symlinks=False))
                                        for n in os.listxattr(p, follow_symlinks=False))}
                opaque = xs.pop("trusted.overlay.opaque", None) == b"y"
                t.pax_headers = {f"SCHILY.xattr.{k}": v.decode("latin-1") for k, v in xs.items()}
                if t.isreg():
                    with open(p, "rb") as f:
                        tf.addfile(t, f)
                else:
                    tf.addfile(t)
                if opaque:
                    tf.addfile(tarfile.TarInfo(rel + "/.wh..wh..opq"), io.BytesIO(b""))
    return buf.getvalue()


def docker_archive(layers_top_first: list[Path], dest: Path, tag: str) -> Path:
    tars = [layer_tar(d) for d in reversed(layers_top_first)]
    diff_ids = ["sha256:" + hashlib.sha256(t).hexdigest() for t in tars]
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                      "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    cfg_name = hashlib.sha256(cfg).hexdigest() + ".json"
    manifest = [{"Config": cfg_name, "RepoTags": [tag], "Layers": [f"l{i}/layer.tar" for i in range(len(tars))]}]
    with tarfile.open(dest, "w") as tf:
        def add(name: str, data: bytes) -> None:
            t = tarfile.TarInfo(name)
            t.size = len(data)
            tf.addfile(t, io.BytesIO(data))
        add(cfg_name, cfg)
        for i, t in enumerate(tars):
            add(f"l{i}/layer.tar", t)
        add("manifest.json", json.dumps(manifest).encode())
    return dest


def lamina(root: Path, *args, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([str(BIN / "lamina"), "--root", str(root), *map(str, args)], capture_output=True, text=True,
                       timeout=120)
    if check and p.returncode != 0:
        raise AssertionError(f"lamina {args}: {p.returncode} {p.stderr}")
    return p


@contextlib.contextmanager
def store_mount(root: Path, image: str, mnt: Path, upper: Path | None = None, work: Path | None = None,
                *extra: str) -> Iterator[Path]:
    """`lamina mount` of a store image, taken down by `lamina umount` (then harder, if that fails)."""
    args = ["mount", image, mnt, *extra]
    if upper is not None:
        args += ["--upper", upper, "--work", work]
    lamina(root, *args)
    try:
        yield mnt
    finally:
        try:
            lamina(root, "umount", mnt)
        finally:
            unmount(mnt)
