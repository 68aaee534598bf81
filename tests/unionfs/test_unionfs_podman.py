"""lamina-fs as podman's mount program (`--storage-opt overlay.mount_program=`), like fuse-overlayfs."""
from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from fsharness import LAMINA_FS, docker_archive, is_mounted

pytestmark = pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed (scripts/setup.sh)")


# this host refuses raising rlimits (no CAP_SYS_RESOURCE) above podman's defaults: ask for low ones
LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", "--net", "none"]


def podman_on_lamina_fs(scratch: Path) -> Callable[..., subprocess.CompletedProcess]:
    """A podman command with its storage below `scratch` and lamina-fs as the overlay driver's mount program."""
    podman = ["podman", "--root", str(scratch / "root"), "--runroot", str(scratch / "run"),
              "--storage-driver", "overlay", "--storage-opt", f"overlay.mount_program={LAMINA_FS}",
              "--cgroup-manager", "cgroupfs", "--events-backend", "file", "--runtime", "runc"]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*podman, *args], capture_output=True, text=True, timeout=180)
    return run


def test_podman_container_runs_on_lamina_fs(scratch, busybox_dir):
    tar = scratch / "rootfs.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(busybox_dir, arcname=".")
    run = podman_on_lamina_fs(scratch)
    limits = LIMITS
    try:
        p = run("import", str(tar), "localhost/lamina-bb")
        assert p.returncode == 0, p.stderr
        p = run("run", "--name", "ufs", *limits, "localhost/lamina-bb", "/bin/sh", "-c",
                "echo written > /etc/new && cat /etc/new && rm /bin/true && ls /bin/true; "
                "grep ' / / ' /proc/self/mountinfo")
        assert p.returncode == 0, p.stderr
        out = p.stdout.splitlines()
        assert out[0] == "written"
        assert "fuse.lamina-fs" in out[-1]
        p = run("diff", "ufs")
        assert p.returncode == 0, p.stderr
        assert "A /etc/new" in p.stdout and "D /bin/true" in p.stdout
        p = run("start", "-a", "ufs")  # the container layer (lamina's upper) persists across runs
        assert p.returncode == 0 and p.stdout.splitlines()[0] == "written", p.stderr
    finally:
        run("rm", "-f", "-a")
        run("rmi", "-a", "-f")
    with open("/proc/self/mountinfo") as f:
        assert not any(str(scratch) in line and "lamina-fs" in line for line in f)
    assert not is_mounted(scratch / "root")


def test_podman_image_layer_redirect_cannot_read_the_host(scratch, busybox_dir):
    """The exploit of issue #11.1: an image layer's redirect xattr climbing to a host directory, through lamina-fs
    as podman's mount program, must not show that directory in the container."""
    host = scratch / "host"
    host.mkdir()
    (host / "secret").write_text("host only\n")
    top = scratch / "top"
    (top / "x").mkdir(parents=True)
    os.setxattr(top / "x", "user.overlay.redirect", ("/.." * 40 + str(host)).encode())
    archive = docker_archive([top, busybox_dir], scratch / "img.tar", "localhost/lamina-redirect:latest")
    run = podman_on_lamina_fs(scratch)
    try:
        p = run("load", "-i", str(archive))
        assert p.returncode == 0, p.stderr
        p = run("run", "--rm", *LIMITS, "localhost/lamina-redirect:latest", "/bin/sh", "-c",
                "cat /x/secret; ls /x; echo done")
        assert p.stdout.splitlines()[-1:] == ["done"], p.stderr
        assert "host only" not in p.stdout and "secret" not in p.stdout
    finally:
        run("rm", "-f", "-a")
        run("rmi", "-a", "-f")
