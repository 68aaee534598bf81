"""The contenders: one way each of presenting the same lower layers plus a writable upper at a mount point.

A contender knows how to mount and unmount and which process serves the mount (for the memory row). Everything it
needs from the outside is a command on PATH; `probe()` mounts a tiny tree once per run and reports a contender whose
entry point fails as unavailable, with the reason, rather than dropping it from the report.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import data, mounts

MOUNT_TIMEOUT = 60.0


class Unavailable(Exception):
    """The contender cannot take part (missing tool, failing entry point, unsupported layout)."""


def _run(cmd: list[str], timeout: float = MOUNT_TIMEOUT) -> None:
    try:
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, timeout=timeout)
    except FileNotFoundError as e:
        raise Unavailable(f"{cmd[0]}: not found") from e
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"{' '.join(cmd[:2])}: no answer after {timeout:.0f} s") from e
    if p.returncode != 0:
        msg = (p.stderr.strip() or p.stdout.strip() or f"exit {p.returncode}").splitlines()
        raise RuntimeError(f"{Path(cmd[0]).name}: {msg[-1] if msg else ''} (exit {p.returncode})")


def tool(name: str) -> str | None:
    """A command from the venv that runs the benchmark first, then PATH."""
    venv = Path(sys.executable).parent / name
    return str(venv) if venv.exists() else shutil.which(name)


class Contender:
    name = ""
    has_daemon = False
    program = ""

    def check(self) -> None:
        """Raise Unavailable when the contender cannot run on this machine."""
        if self.program and not tool(self.program):
            raise Unavailable(f"{self.program} not installed")

    def prepare(self, layers: list[Path], key: str) -> None:
        """Untimed per-image preparation (the store-backed contender imports the layers here)."""

    def mount(self, layers: list[Path], upper: Path, work: Path, mnt: Path) -> None:
        raise NotImplementedError

    def unmount(self, mnt: Path) -> None:
        mounts.unmount(mnt)

    def daemon_pid(self, mnt: Path) -> int | None:
        """The process serving `mnt`: the live process whose argv names the mount point."""
        if not self.has_daemon:
            return None
        want = str(mnt).encode()
        for d in os.listdir("/proc"):
            if not d.isdigit() or int(d) == os.getpid():
                continue
            try:
                argv = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if want in argv and not argv[0].endswith((b"mount", b"umount", b"fusermount3")):
                return int(d)
        return None

    def version(self) -> str:
        exe = tool(self.program) if self.program else None
        if not exe:
            return ""
        for flag in ("--version", "-V"):
            try:
                p = subprocess.run([exe, flag], capture_output=True, text=True, timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                continue
            out = (p.stdout + p.stderr).strip().splitlines()
            if p.returncode == 0 and out:
                # the first line naming the program, not fusermount's or libfuse's own version
                mine = [ln for ln in out if ln.lower().startswith(self.program.split("-")[0])]
                return (mine or out)[0][:80]
        return ""


class Native(Contender):
    """The filesystem underneath: the layer bind-mounted read-only, with the upper bound on its `scratch/` dir.

    Writes land on the same ext4 as every other contender's upper, and the shared lower can never be modified.
    There is no union, so there is no copy-up and no daemon.
    """
    name = "native"

    def mount(self, layers, upper, work, mnt):
        if len(layers) != 1:
            raise Unavailable("native takes a single layer")
        _run(["mount", "--bind", str(layers[0]), str(mnt)])
        try:
            _run(["mount", "-o", "remount,bind,ro", str(mnt)])
            _run(["mount", "--bind", str(upper), str(mnt / "scratch")])
        except BaseException:
            mounts.cleanup_all(mnt)
            raise

    def unmount(self, mnt):
        mounts.cleanup_all(mnt)


class KernelOverlay(Contender):
    name = "kernel-overlay"

    def check(self):
        if "overlay" not in Path("/proc/filesystems").read_text():
            subprocess.run(["modprobe", "overlay"], capture_output=True)
            if "overlay" not in Path("/proc/filesystems").read_text():
                raise Unavailable("kernel has no overlay filesystem")

    def mount(self, layers, upper, work, mnt):
        opts = f"lowerdir={':'.join(map(str, layers))},upperdir={upper},workdir={work}"
        _run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)])

    def version(self):
        return "linux " + os.uname().release


class FuseOverlayfs(Contender):
    name, has_daemon, program = "fuse-overlayfs", True, "fuse-overlayfs"

    def mount(self, layers, upper, work, mnt):
        opts = f"lowerdir={':'.join(map(str, layers))},upperdir={upper},workdir={work}"
        _run([tool(self.program) or self.program, "-o", opts, str(mnt)])


class UnionfsFuse(Contender):
    name, has_daemon, program = "unionfs-fuse", True, "unionfs"

    def mount(self, layers, upper, work, mnt):
        branches = ":".join([f"{upper}=RW"] + [f"{layer}=RO" for layer in layers])
        _run([tool(self.program) or self.program, "-o", "cow,allow_other", branches, str(mnt)])


class LaminaFs(FuseOverlayfs):
    """lamina's drop-in for fuse-overlayfs, over the same plain directories: the same command line, by design."""
    name, has_daemon, program = "lamina-fs", True, "lamina-fs"


class LaminaStore(Contender):
    """lamina proper: the image imported into a lamina store once, then `lamina mount IMAGE MNT`."""
    name, has_daemon, program = "lamina", True, "lamina"

    def __init__(self, root: Path):
        self.root = root
        self.images: dict[tuple[str, ...], str] = {}

    def lamina(self, *args: str, timeout: float = MOUNT_TIMEOUT) -> None:
        _run([tool("lamina") or "lamina", "--root", str(self.root), *args], timeout=timeout)

    def check(self):
        super().check()
        for sub in (["import", "--help"], ["mount", "--help"], ["umount", "--help"]):
            try:
                self.lamina(*sub, timeout=30)
            except RuntimeError as e:
                raise Unavailable(f"lamina {sub[0]}: {e}") from e

    def prepare(self, layers, key):
        k = tuple(map(str, layers))
        if k in self.images:
            return
        name = f"bench-{key}"
        # one layer imports as a directory; several as the docker save archive a user would have
        src = layers[0] if len(layers) == 1 else data.docker_archive(key, layers)
        self.lamina("import", str(src), "-t", name, timeout=3600)
        self.images[k] = name

    def mount(self, layers, upper, work, mnt):
        image = self.images.get(tuple(map(str, layers)))
        if image is None:
            raise RuntimeError("image not prepared")
        self.lamina("mount", image, str(mnt), "--upper", str(upper), "--work", str(work))

    def unmount(self, mnt):
        try:
            self.lamina("umount", str(mnt))
        finally:
            mounts.unmount(mnt)

    def daemon_pid(self, mnt):
        return Contender.daemon_pid(self, mnt)


class LaminaKernel(LaminaStore):
    """lamina's kernel driver: the same store, `lamina mount --driver kernel` (kernel overlayfs over per-layer
    metadata trees). The trees are built in `prepare` (a first mount), so the mount rows time mounts with them built."""
    name, has_daemon = "lamina-kernel", False

    def check(self):
        super().check()
        from unionfs.kerneltree import supported  # noqa: PLC0415

        if not supported():
            raise Unavailable("kernel overlayfs without data-only lower layers and metacopy (Linux 6.5+)")

    def prepare(self, layers, key):
        fresh = tuple(map(str, layers)) not in self.images
        super().prepare(layers, key)
        if fresh:
            mnt = Path(tempfile.mkdtemp(prefix="lamina-ktrees-"))
            try:
                self.lamina("mount", "--driver", "kernel", "--read-only", self.images[tuple(map(str, layers))],
                            str(mnt), timeout=3600)
                self.lamina("umount", str(mnt))
            finally:
                mounts.unmount(mnt)
                shutil.rmtree(mnt, ignore_errors=True)

    def mount(self, layers, upper, work, mnt):
        image = self.images.get(tuple(map(str, layers)))
        if image is None:
            raise RuntimeError("image not prepared")
        self.lamina("mount", "--driver", "kernel", image, str(mnt), "--upper", str(upper), "--work", str(work))


def all_contenders(store_root: Path) -> list[Contender]:
    return [LaminaStore(store_root), LaminaKernel(store_root), LaminaFs(), FuseOverlayfs(), KernelOverlay(),
            UnionfsFuse(), Native()]


def probe(c: Contender, scratch: Path) -> None:
    """Mount a tiny tree, read and write through it, unmount. Raises Unavailable with the reason."""
    c.check()
    base = Path(tempfile.mkdtemp(prefix=f"probe-{c.name}-", dir=scratch))
    try:
        lower, upper, work, mnt = (base / n for n in ("lower", "upper", "work", "mnt"))
        for d in (lower / "scratch", upper, work, mnt):
            d.mkdir(parents=True)
        (lower / "hello").write_text("hello\n")
        try:
            c.prepare([lower], f"probe-{c.name}")
            c.mount([lower], upper, work, mnt)
        except RuntimeError as e:
            raise Unavailable(str(e)) from e
        try:
            if (mnt / "hello").read_text() != "hello\n":
                raise Unavailable("probe: lower file reads back wrong")
            (mnt / "scratch" / "w").write_text("w")
        except OSError as e:
            raise Unavailable(f"probe: {e}") from e
        finally:
            c.unmount(mnt)
    finally:
        mounts.cleanup_all(base)
        shutil.rmtree(base, ignore_errors=True)
