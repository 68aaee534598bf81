"""`lamina commit`: the container layer becomes a store layer (whiteouts included, volumes excluded)."""
from __future__ import annotations

import json

from store import reader as store_reader


def _top(lamina, ref):
    st = store_reader.open_store(str(lamina.root))
    img = st.image(ref)
    return img, st.reader(), img.layer_ids[-1]


def test_commit_stopped_container(lamina, image, tmp_path):
    r = lamina("run", "--name", "src", "-v", f"{tmp_path}:/vol", image, "sh", "-c",
               "echo x > /added; rm /etc/group; mkdir -p /var/d; echo y > /var/d/f; echo v > /vol/inside")
    assert r.returncode == 0, r.stderr
    r = lamina("commit", "src", "committed:v1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith("sha256:")
    img, reader, top = _top(lamina, "committed:v1")
    assert reader.lookup(top, "/added").kind == "f"
    assert reader.lookup(top, "/var/d/f").kind == "f"
    assert reader.lookup(top, "/etc/group").kind == "w"
    assert reader.lookup(top, "/vol") is None  # the volume's mount point and contents stay out
    assert reader.lookup(img.layer_ids[0], "/bin/busybox") is not None
    assert "lamina commit" in lamina("history", "committed:v1").stdout


def test_commit_running_container_pauses_and_resumes(lamina, image):
    r = lamina("run", "-d", "--name", "live", image, "sh", "-c", "echo a > /a; while true; do sleep 0.1; done")
    assert r.returncode == 0, r.stderr
    for _ in range(100):
        if lamina("exec", "live", "cat", "/a").stdout == "a\n":
            break
    r = lamina("commit", "live", "live:snap")
    assert r.returncode == 0, r.stderr
    assert "Up " in lamina("ps").stdout  # thawed, still running
    assert lamina("exec", "live", "true").returncode == 0
    img, reader, top = _top(lamina, "live:snap")
    assert reader.lookup(top, "/a").kind == "f"


def test_commit_unknown_container(lamina):
    r = lamina("commit", "nope", "x:y")
    assert r.returncode == 1 and "no such container" in r.stderr


def test_committed_image_runs_with_the_new_layer(lamina, image):
    r = lamina("run", "--name", "cfgsrc", "-e", "GREETING=hello", "-w", "/srv", image, "sh", "-c",
               "echo $GREETING from $(pwd) > /srv/msg; rm /etc/group")
    assert r.returncode == 0, r.stderr
    assert lamina("commit", "cfgsrc", "withlayer:1").returncode == 0
    r = lamina("run", "--rm", "withlayer:1", "sh", "-c", "cat /srv/msg; ls /etc/group")
    assert r.stdout == "hello from /srv\n"
    assert "No such file" in r.stderr


def test_commit_writes_the_containers_config(lamina, image):
    """As docker commit: the new image runs what the container ran, with its env and workdir."""
    r = lamina("run", "--name", "cfgsrc", "-e", "FROM_RUN=1", "-w", "/tmp", image, "sh", "-c", "echo hi > /f")
    assert r.returncode == 0, r.stderr
    assert lamina("commit", "cfgsrc", "committed:cfg").returncode == 0
    cfg = json.loads(lamina("inspect", "committed:cfg").stdout)[0]["Config"]
    assert cfg["Cmd"] == ["sh", "-c", "echo hi > /f"]
    assert "FROM_RUN=1" in cfg["Env"] and cfg["WorkingDir"] == "/tmp"
    r = lamina("run", "--rm", "committed:cfg")  # runs the committed command, in /tmp
    assert r.returncode == 0, r.stderr
    lamina("rm", "cfgsrc")
