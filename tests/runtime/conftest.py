"""Fixtures for the runtime tests: a temporary LAMINA_ROOT for the session, the busybox image (from the suite's
busybox_dir), a `lamina` runner, and a sweep after every test that removes containers, volumes, mounts and cgroups
even when the test failed."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from runtime import cgroups, lifecycle, state

LAMINA = [sys.executable, "-m", "runtime.cli"]
TOP = Path(__file__).resolve().parents[2]


def mounts_under(path: Path) -> list[str]:
    p = str(path)
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(p)]


def cgroup_dirs(c: state.Container) -> list[Path]:
    """The container's cgroup directories, from its state."""
    return [p.parent for p in cgroups.from_json(c.data["cgroup"]).procs_file()]


class Lamina:
    def __init__(self, root: Path):
        self.root = root
        self.env = dict(os.environ, LAMINA_ROOT=str(root), PYTHONPATH=str(TOP))

    def __call__(self, *args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run([*LAMINA, *args], capture_output=True, text=True, env=self.env, timeout=timeout,
                              cwd=TOP, **kw)

    def popen(self, *args: str, **kw) -> subprocess.Popen:
        return subprocess.Popen([*LAMINA, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                stdin=subprocess.DEVNULL, env=self.env, cwd=TOP, **kw)

    def sh(self, image: str, script: str, *opts: str, **kw) -> subprocess.CompletedProcess:
        """`lamina run --rm OPTS IMAGE sh -c SCRIPT`"""
        return self("run", "--rm", *opts, image, "sh", "-c", script, **kw)

    def containers(self) -> list[state.Container]:
        return state.list_containers(self.root)


def sweep(root: Path) -> None:
    for c in state.list_containers(root):
        try:
            lifecycle.remove(str(root), c, force=True)
        except Exception:  # noqa: BLE001 - keep sweeping; the leftovers are asserted on by the tests themselves
            pass
    for mp in sorted(mounts_under(root), key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], capture_output=True)
    shutil.rmtree(root / "containers", ignore_errors=True)
    shutil.rmtree(root / "volumes", ignore_errors=True)


@pytest.fixture(scope="session")
def lamina_root(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("lamina-root")
    try:
        yield root
    finally:
        sweep(root)


@pytest.fixture(scope="session")
def dir_image(busybox_dir: Path) -> str:
    """The busybox rootfs directory as an image: mounted with kernel overlayfs, the reference."""
    return str(busybox_dir)


@pytest.fixture(scope="session")
def image(busybox_dir: Path, lamina_root: Path) -> str:
    """The image the runtime tests run: busybox imported into the store, mounted by lamina's union filesystem."""
    r = Lamina(lamina_root)("import", str(busybox_dir), "-t", "busybox:test", "-c", 'CMD ["/bin/sh"]')
    assert r.returncode == 0, r.stderr
    return "busybox:test"


@pytest.fixture(scope="session")
def trap_image(tmp_path_factory: pytest.TempPathFactory, busybox_dir: Path) -> str:
    """busybox plus symlinks that try to lead a bind mount out of the rootfs."""
    d = tmp_path_factory.mktemp("trap") / "rootfs"
    subprocess.run(["cp", "-a", str(busybox_dir), str(d)], check=True)
    os.symlink("../../../../../../../../tmp", d / "escape")
    os.symlink("/etc", d / "abs")
    return str(d)


@pytest.fixture
def lamina(lamina_root: Path):
    lam = Lamina(lamina_root)
    try:
        yield lam
    finally:
        sweep(lamina_root)


def block_device() -> str | None:
    """A block device of this machine (for I/O throttling), e.g. /dev/vda."""
    for name in sorted(os.listdir("/sys/block")):
        if name.startswith(("loop", "ram", "zram")):
            continue
        dev = f"/dev/{name}"
        if os.path.exists(dev):
            return dev
    return None
