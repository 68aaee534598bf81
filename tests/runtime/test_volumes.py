"""Bind mounts and named volumes, seen from inside containers, and mount targets that try to leave the rootfs."""
from __future__ import annotations

import json
import os

from .conftest import mounts_under


def test_rw_bind_both_ways(lamina, image, tmp_path):
    host = tmp_path / "h"
    host.mkdir()
    (host / "from-host").write_text("hello\n")
    r = lamina.sh(image, "cat /data/from-host; echo back > /data/from-container", "-v", f"{host}:/data")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "hello\n"
    assert (host / "from-container").read_text() == "back\n"


def test_ro_bind_gives_erofs(lamina, image, tmp_path):
    host = tmp_path / "h"
    host.mkdir()
    (host / "f").write_text("x")
    r = lamina.sh(image, "cat /data/f; echo; grep ' /data ' /proc/self/mountinfo; touch /data/new",
                  "-v", f"{host}:/data:ro")
    assert r.returncode == 1
    content, mountinfo = r.stdout.splitlines()[:2]
    assert content == "x"
    assert mountinfo.split()[5].split(",")[0] == "ro"  # the per-mount options
    assert "Read-only file system" in r.stderr
    assert not (host / "new").exists()


def test_missing_host_dir_is_created(lamina, image, tmp_path):
    host = tmp_path / "a" / "b"
    r = lamina.sh(image, "echo hi > /x/f", "-v", f"{host}:/x")
    assert r.returncode == 0, r.stderr
    assert (host / "f").read_text() == "hi\n"


def test_file_bind(lamina, image, tmp_path):
    f = tmp_path / "conf"
    f.write_text("setting=1\n")
    r = lamina.sh(image, "cat /etc/app.conf", "-v", f"{f}:/etc/app.conf:ro")
    assert r.stdout == "setting=1\n", r.stderr


def test_named_volume_outlives_container_and_is_prefilled(lamina, image):
    r = lamina.sh(image, "ls /v; echo kept > /v/data", "-v", "shared:/v")
    assert r.returncode == 0, r.stderr
    r = lamina.sh(image, "cat /w/data", "-v", "shared:/w")
    assert r.stdout == "kept\n", r.stderr
    # pre-filled from the image's contents at the mount path on first use
    r = lamina.sh(image, "ls /etc; echo extra > /etc/extra", "-v", "etcvol:/etc")
    assert "passwd" in r.stdout.split()
    r = lamina.sh(image, "ls /mnt", "-v", "etcvol:/mnt")
    assert {"passwd", "group", "extra"} <= set(r.stdout.split())
    ls = lamina("volume", "ls").stdout
    assert "shared" in ls and "etcvol" in ls
    info = json.loads(lamina("volume", "inspect", "shared").stdout)[0]
    assert info["Name"] == "shared" and os.path.isfile(os.path.join(info["Mountpoint"], "data"))


def test_volume_commands(lamina, image):
    assert lamina("volume", "create", "v1").stdout.strip() == "v1"
    r = lamina("volume", "create", "bad/name")
    assert r.returncode != 0 and "invalid volume name" in r.stderr
    r = lamina("run", "--name", "user", "-v", "v1:/x", image, "true")
    assert r.returncode == 0, r.stderr
    r = lamina("volume", "rm", "v1")
    assert r.returncode == 1 and "in use" in r.stderr
    assert lamina("rm", "user").returncode == 0
    assert lamina("volume", "rm", "v1").returncode == 0
    assert "v1" not in lamina("volume", "ls", "-q").stdout.split()
    r = lamina("volume", "inspect", "v1")
    assert r.returncode == 1 and "no such volume" in r.stderr


def test_anonymous_volume_removed_with_rm(lamina, image):
    r = lamina.sh(image, "echo x > /scratch/f", "-v", "/scratch")
    assert r.returncode == 0, r.stderr
    assert lamina("volume", "ls", "-q").stdout.split() == []


def test_absolute_symlink_target_stays_inside(lamina, trap_image, tmp_path):
    host = tmp_path / "h"
    host.mkdir()
    (host / "f").write_text("in\n")
    # /abs -> /etc in the image: the bind lands on the rootfs's /etc/x, never the host's /etc/x
    r = lamina.sh(trap_image, "cat /etc/x/f", "-v", f"{host}:/abs/x")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "in\n"
    assert not os.path.exists("/etc/x")


def test_escaping_targets_are_refused_and_leave_nothing(lamina, trap_image, tmp_path):
    host = tmp_path / "h"
    host.mkdir()
    probe = f"lamina-escape-{os.getpid()}"
    fresh = tmp_path / "not" / "yet"
    for spec in (f"{host}:/escape/{probe}", f"{host}:/../../tmp/{probe}", f"named:/escape/{probe}"):
        r = lamina("run", "--rm", "-v", spec, trap_image, "true")
        assert r.returncode == 125, spec
        assert r.stderr.startswith("lamina: ") and len(r.stderr.strip().splitlines()) == 1
    assert not os.path.lexists(f"/tmp/{probe}")  # where /escape leads on the host
    # a host directory made for a bind that then fails (a directory onto the image's file) is taken back
    r = lamina("run", "--rm", "-v", f"{fresh}:/etc/passwd", trap_image, "true")
    assert r.returncode == 125 and "passwd" in r.stderr
    assert not (tmp_path / "not").exists()
    assert lamina.containers() == []
    assert lamina("volume", "ls", "-q").stdout.split() == []
    assert mounts_under(lamina.root) == []


def test_symlinked_proc_in_the_image_is_refused(lamina, busybox_dir, tmp_path):
    import shutil
    import subprocess
    evil = tmp_path / "evil"
    subprocess.run(["cp", "-a", str(busybox_dir), str(evil)], check=True)
    shutil.rmtree(evil / "proc")
    os.symlink("/etc", evil / "proc")  # followed before pivot_root, this would be the host's /etc
    r = lamina("run", "--rm", str(evil), "true")
    assert r.returncode == 125 and "/proc is not a directory" in r.stderr
    assert lamina.containers() == [] and mounts_under(lamina.root) == []
