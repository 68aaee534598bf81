"""lamina's /etc/hostname, /etc/hosts and /etc/resolv.conf over images whose own are symlinks (systemd-resolved's
`resolv.conf -> ../run/systemd/resolve/stub-resolv.conf`, target missing; links climbing above the root; an /etc
that is itself a link) or where a volume covers /etc: the container starts as under podman, the links followed
inside the rootfs, missing parents made there, and nothing written outside it."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest


@pytest.fixture
def image_dir(busybox_dir: Path, tmp_path: Path) -> Path:
    d = tmp_path / "rootfs"
    subprocess.run(["cp", "-a", str(busybox_dir), str(d)], check=True)
    for name in ("hostname", "hosts", "resolv.conf"):
        if os.path.lexists(d / "etc" / name):
            os.unlink(d / "etc" / name)
    return d


def _host_resolv() -> str:
    try:
        return Path("/etc/resolv.conf").read_text()
    except OSError:
        return ""


def test_etc_files_that_are_links(lamina, image_dir, tmp_path):
    outside = tmp_path / "outside"  # where a link climbing out of the image would lead on the host
    os.symlink("../run/systemd/resolve/stub-resolv.conf", image_dir / "etc/resolv.conf")
    os.symlink("../" * 12 + str(outside / "hostname").lstrip("/"), image_dir / "etc/hostname")
    os.symlink("/var/lib/hosts.d/hosts", image_dir / "etc/hosts")
    r = lamina("run", "--rm", "--hostname", "linked", str(image_dir), "sh", "-c",
               "cat /etc/hostname; grep -c linked /etc/hosts; ls -d /run/systemd/resolve /var/lib/hosts.d; "
               "cat /etc/resolv.conf")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:4] == ["linked", "1", "/run/systemd/resolve", "/var/lib/hosts.d"]
    assert "\n".join(lines[4:]).strip() == _host_resolv().strip()
    assert not outside.exists()  # the climbing link stayed inside: nothing made on the host
    assert not (image_dir / "run/systemd").exists()  # made in the container layer, the image untouched


def test_etc_covered_by_volumes(lamina, image_dir, tmp_path):
    host_etc = tmp_path / "hostetc"
    host_etc.mkdir()
    r = lamina("run", "--rm", "-v", f"{host_etc}:/etc", str(image_dir), "ls", "-a", "/etc")
    assert r.returncode == 0, r.stderr
    assert list(host_etc.iterdir()) == []  # nothing written into the user's directory
    r = lamina("run", "--rm", "-v", "etcvol:/etc", str(image_dir), "sh", "-c", "cat /etc/passwd | head -1")
    assert r.returncode == 0 and r.stdout.startswith("root:"), r.stderr  # pre-filled from the image


def test_etc_that_is_a_link_covered_by_a_volume(lamina, image_dir, tmp_path):
    """/etc -> private/etc, and the user's directory mounted there: lamina's files are not bound into it."""
    os.rename(image_dir / "etc", image_dir / "private-etc")
    os.symlink("private-etc", image_dir / "etc")
    host_etc = tmp_path / "hostetc"
    host_etc.mkdir()
    r = lamina("run", "--rm", "-v", f"{host_etc}:/private-etc", str(image_dir), "ls", "-a", "/etc/")
    assert r.returncode == 0, r.stderr
    assert list(host_etc.iterdir()) == []


def test_image_without_etc(lamina, image_dir):
    subprocess.run(["rm", "-rf", str(image_dir / "etc")], check=True)
    r = lamina("run", "--rm", "--hostname", "bare", str(image_dir), "cat", "/etc/hostname")
    assert r.returncode == 0 and r.stdout == "bare\n", r.stderr
