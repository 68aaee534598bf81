"""What an unprivileged host user can reach of lamina's containers: the exploit of CVE-2021-41091 as the test.

A store whose root, `containers/` or container directories are traversable, or a root filesystem mount that honours
setuid bits and device nodes, lets any host user run an image's setuid-root file as root or open its device nodes.
The test makes a real unprivileged user (removed afterwards) and tries exactly that, through a running container's
root filesystem and through a stopped container's layer.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from runtime import cgroups

from .conftest import Lamina, mounts_under, sweep


@pytest.fixture
def host_user():
    """A fresh unprivileged host user: (uid, gid)."""
    name = f"lmn{os.urandom(4).hex()}"
    subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", "--user-group", name], check=True)
    try:
        import pwd  # noqa: PLC0415

        pw = pwd.getpwnam(name)
        yield pw.pw_uid, pw.pw_gid
    finally:
        subprocess.run(["userdel", name], capture_output=True)


@pytest.fixture
def open_store(busybox_dir: Path):
    """A store whose parents any user may traverse (unlike pytest's private temp dirs), made by an older lamina:
    root and containers/ 0755, with an image carrying a setuid-root `id` and a 0666 device node."""
    top = Path(tempfile.mkdtemp(prefix="lamina-hostusers-", dir="/tmp"))
    os.chmod(top, 0o755)
    root = top / "store"
    (root / "containers").mkdir(parents=True)
    os.chmod(root, 0o755)
    os.chmod(root / "containers", 0o755)
    img = top / "img"
    subprocess.run(["cp", "-a", str(busybox_dir), str(img)], check=True)
    (img / "opt").mkdir()
    shutil.copyfile("/usr/bin/id", img / "opt/id")  # the host's own: runs from the host's side as it is
    os.chmod(img / "opt/id", 0o4755)
    os.mknod(img / "opt/null", 0o666 | 0o020000, os.makedev(1, 3))
    lam = Lamina(root)
    try:
        r = lam("import", str(img), "-t", "suid:1")
        assert r.returncode == 0, r.stderr
        yield lam
    finally:
        sweep(root)
        for mp in sorted(mounts_under(top), key=len, reverse=True):
            subprocess.run(["umount", "-l", mp], capture_output=True)
        shutil.rmtree(top, ignore_errors=True)


def _as_user(user: tuple[int, int], script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["/bin/sh", "-c", script, "sh", *args], user=user[0], group=user[1], extra_groups=[],
                          capture_output=True, text=True, cwd="/", timeout=30)


def _mode(p: Path) -> int:
    return p.stat().st_mode & 0o777


def test_host_user_gets_nothing_from_container_filesystems(open_store: Lamina, host_user):
    lam = open_store
    run = lam("run", "-d", "--name", "victim", "suid:1", "sleep", "600")
    assert run.returncode == 0, run.stderr
    c = lam.containers()[0]
    rootfs = c.rootfs

    # The store and the container directories are private, the store made by an older lamina included.
    assert _mode(lam.root) == 0o700
    assert _mode(lam.root / "containers") == 0o700 and _mode(c.dir) == 0o711
    # ... and the host's mount of the root filesystem honours neither setuid bits nor device nodes.
    with open("/proc/self/mountinfo") as f:
        opts = next(line.split()[5] for line in f if line.split()[4] == str(rootfs))
    assert {"nosuid", "nodev"} <= set(opts.split(","))

    # The exploit: run the image's setuid-root file, open its device node.
    r = _as_user(host_user, '"$1" -u; echo rc=$?; : < "$2" && echo opened', f"{rootfs}/opt/id", f"{rootfs}/opt/null")
    assert r.stdout.splitlines()[0] != "0", "a host user ran the image's setuid file as root"
    assert "opened" not in r.stdout, "a host user opened the image's device node"
    assert "rc=0" not in r.stdout

    # Inside, the container sees both as before and on v1 opens the node (its devices cgroup allows 1:3; v2 has
    # no devices cgroup, so there the rootfs is nodev inside too) ...
    inside = lam("exec", "victim", "sh", "-c", "stat -c %a /opt/id; echo x > /opt/null && echo null-ok")
    want = ["4755", "null-ok"] if cgroups.detect_version() == 1 else ["4755"]
    assert inside.stdout.split() == want, inside.stderr

    # ... and a setuid file the container made stays in its layer once it has stopped: out of reach too.
    lam("exec", "victim", "sh", "-c", "cp /opt/id /opt/id2 && chmod 4755 /opt/id2")
    assert lam("stop", "-t", "1", "victim").returncode == 0
    upper_id = c.upper / "opt/id2"
    assert upper_id.stat().st_mode & 0o4000 and upper_id.stat().st_uid == 0
    r = _as_user(host_user, '"$1" -u; echo rc=$?', str(upper_id))
    assert r.stdout.splitlines()[0] != "0", "a host user ran a stopped container's setuid file as root"
    assert "rc=0" not in r.stdout
