"""The benchmark's mount sweep finds and removes every mount under its scratch root, odd names included."""
from __future__ import annotations

import os
import subprocess

import pytest

from bench import mounts

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")


def test_sweep_unmounts_nested_mounts_with_odd_names(tmp_path):
    src = tmp_path / "src"
    outer = tmp_path / "a dir\twith space"
    (src / "sub").mkdir(parents=True)
    outer.mkdir()
    try:
        subprocess.run(["mount", "--bind", str(src), str(outer)], check=True)
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(outer / "sub")], check=True)
        found = mounts.mounts_under(tmp_path)
        assert found == [str(outer / "sub"), str(outer)]  # deepest first
        assert mounts.is_mounted(outer)
        assert mounts.cleanup_all(tmp_path) == found
        assert mounts.mounts_under(tmp_path) == []
    finally:
        for mp in mounts.mounts_under(tmp_path):
            subprocess.run(["umount", "-l", mp])
