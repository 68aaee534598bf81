"""kill -9 at any moment of an import leaves a clean store with no half-visible image; imports run side by side."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from tests.conftest import BIN


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus") / "tree"
    for i in range(40):
        sub = d / f"dir{i}"
        sub.mkdir(parents=True)
        for j in range(50):
            (sub / f"f{j}").write_bytes(os.urandom(64) + f"{i}/{j}".encode())
    (d / "big").write_bytes(os.urandom(64 << 20))
    return d


def _start(root, *args) -> subprocess.Popen:
    env = dict(os.environ, LAMINA_ROOT=str(root))
    return subprocess.Popen([str(BIN / "lamina"), *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.parametrize("delay", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.9])
def test_kill_9_during_import(lamina, busybox_dir, corpus, delay):
    lamina("import", busybox_dir, "-t", "base")
    baseline = lamina.objects()
    p = _start(lamina.root, "import", corpus, "-t", "victim")
    time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    p.wait()
    lamina.assert_clean()
    tags = {(r["repository"], r["tag"]) for r in json.loads(lamina("images", "--format", "json").stdout)}
    finished = ("victim", "latest") in tags
    assert tags == {("base", "latest"), ("victim", "latest")} if finished else tags == {("base", "latest")}
    if not finished:
        lamina("gc")
        assert lamina.objects() == baseline
    assert not os.listdir(lamina.root / "tmp")
    lamina("import", corpus, "-t", "victim")  # and the store still takes the import
    lamina.assert_clean()


def test_two_imports_at_once_and_readers_not_blocked(lamina, busybox_dir, corpus, tmp_path):
    lamina("import", busybox_dir, "-t", "base")
    other = tmp_path / "other"
    other.mkdir()
    (other / "big").write_bytes(os.urandom(48 << 20))
    (other / "shared").write_bytes((corpus / "dir0/f0").read_bytes())
    a = _start(lamina.root, "import", corpus, "-t", "a")
    b = _start(lamina.root, "import", other, "-t", "b")
    reads = 0
    while a.poll() is None or b.poll() is None:
        assert "base" in lamina("images").stdout  # a reader gets an answer while both imports run
        reads += 1
    assert a.returncode == 0 and b.returncode == 0, (a.stderr.read(), b.stderr.read())
    tags = {r["repository"] for r in json.loads(lamina("images", "--format", "json").stdout)}
    assert tags == {"base", "a", "b"} and reads > 0
    lamina.assert_clean()
