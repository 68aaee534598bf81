"""A container holds its image in the store: gc keeps it and rmi refuses it (as docker does) until `rm`."""
from __future__ import annotations


def test_container_holds_its_image(lamina, busybox_dir):
    r = lamina("import", str(busybox_dir), "-t", "inuse:1")
    assert r.returncode == 0, r.stderr
    image_id = r.stdout.strip()
    assert lamina("run", "--name", "holder", "inuse:1", "true").returncode == 0
    r = lamina("rmi", "inuse:1")
    assert r.returncode == 1 and "in use by container:" in r.stderr
    assert lamina("rmi", "-f", "inuse:1").returncode == 0  # untagged, but the container still runs it
    lamina("gc")
    assert image_id in lamina("images", "-q", "--no-trunc").stdout
    assert lamina("rm", "holder").returncode == 0
    lamina("gc")
    assert image_id not in lamina("images", "-q", "--no-trunc").stdout
