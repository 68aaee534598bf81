"""The root filesystem: lamina's FUSE daemon stays outside the container, and agrees with kernel overlayfs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from runtime import cgroups

from .conftest import cgroup_dirs


def _daemon_pids(marker: str) -> list[int]:
    """Processes holding /dev/fuse whose command line mentions `marker` (the daemon is forked by `lamina run`,
    or started as `lamina mount ... ROOTFS`)."""
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            if marker.encode() not in Path(f"/proc/{p}/cmdline").read_bytes():
                continue
            fds = [os.readlink(f"/proc/{p}/fd/{fd}") for fd in os.listdir(f"/proc/{p}/fd")]
        except OSError:
            continue
        if "/dev/fuse" in fds:
            out.append(int(p))
    return out


def test_fuse_daemon_lives_outside_the_container(lamina, image):
    name = f"fusecheck-{os.getpid()}"
    limits = ["--pids-limit", "20", "-m", "64m"] if cgroups.detect_version() == 1 else []
    r = lamina("run", "-d", "--name", name, *limits, image, "sleep", "60")
    assert r.returncode == 0, r.stderr
    c = lamina.containers()[0]
    daemons = _daemon_pids(name) + _daemon_pids(str(c.rootfs))
    assert daemons, "no union filesystem daemon serves the rootfs"
    inside = set(cgroups.from_json(c.data["cgroup"]).pids())
    assert c.data["pid"] in inside
    for pid in daemons:
        assert pid not in inside
        assert os.readlink(f"/proc/{pid}/ns/pid") == os.readlink("/proc/self/ns/pid")
        assert os.readlink(f"/proc/{pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt")
    assert all(d.is_dir() for d in cgroup_dirs(c))


@pytest.mark.skipif(cgroups.detect_version() != 1, reason="the init leaves the memory cgroup on v1 only")
def test_rootfs_survives_an_oom_kill_in_the_container(lamina, image):
    r = lamina("run", "-d", "--name", "survivor", "-m", "32m", "--memory-swap", "32m", image, "sh", "-c",
               "dd if=/dev/zero of=/dev/null bs=96M count=1; echo after-oom > /tmp/mark; sleep 60")
    assert r.returncode == 0, r.stderr
    out = ""
    for _ in range(200):
        out = lamina("exec", "survivor", "cat", "/tmp/mark").stdout
        if out:
            break
    assert out == "after-oom\n"
    r = lamina("exec", "survivor", "sh", "-c", "cat /etc/passwd | head -1; ls /bin | wc -l")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].startswith("root:")
    assert lamina("inspect", "survivor").returncode == 0


def test_store_image_matches_kernel_overlay(lamina, image, dir_image):
    # what an image defines: names, types, modes, owners, file sizes and link targets (directory sizes and link
    # counts are the filesystem's own business)
    script = ("find / -xdev \\( -path /proc -o -path /sys -o -path /dev \\) -prune -o -exec stat -c '%n %F %a %u %g' {} +"
              " | sort; find / -xdev -type f -exec stat -c '%n %s' {} + | sort; find /bin /usr -type l | head -50 |"
              " xargs -n1 readlink; echo new > /etc/new; rm /etc/group; ls -a /etc")
    a = lamina.sh(image, script)
    b = lamina.sh(dir_image, script)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout


def test_kernel_driver_runs_and_commits_like_fuse(lamina, image):
    """`lamina run --driver kernel`: kernel overlayfs, no daemon; the container's changes commit as FUSE's do."""
    script = "grep ' / / ' /proc/self/mountinfo; chmod 700 /bin/busybox; echo hi > /new; rm /etc/passwd"
    outs = {}
    for driver in ("kernel", "fuse"):
        r = lamina("run", "--driver", driver, "--name", f"kd-{driver}", image, "sh", "-c", script)
        assert r.returncode == 0, r.stderr
        outs[driver] = r.stdout
        assert lamina("commit", f"kd-{driver}", f"kd-{driver}:1").returncode == 0
        lamina("rm", f"kd-{driver}")
    assert " - overlay " in outs["kernel"] and " - fuse" in outs["fuse"]
    # both images run the committed busybox (its data stayed in the store under the kernel driver's metacopy)
    for driver in ("kernel", "fuse"):
        r = lamina("run", "--rm", f"kd-{driver}:1", "sh", "-c", "stat -c %a /bin/busybox; cat /new; ls /etc/passwd")
        assert r.stdout.splitlines()[:2] == ["700", "hi"] and r.returncode != 0, (r.stdout, r.stderr)
    assert lamina("history", "kd-kernel:1").stdout.count("\n") == lamina("history", "kd-fuse:1").stdout.count("\n")
    for driver in ("kernel", "fuse"):
        lamina("rmi", f"kd-{driver}:1")
