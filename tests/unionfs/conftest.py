"""Fixtures for the union filesystem tests: scratch dirs under /tmp, layered lowers, and mounts that always unmount."""
from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from fsharness import is_mounted, make_layers, tmpdir, unmount  # noqa: E402


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A fresh directory under /tmp; anything mounted below it is unmounted and everything removed afterwards."""
    d = tmpdir()
    try:
        yield d
    finally:
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split()[4] for line in f]
        for m in reversed(mounts):
            if m.startswith(str(d) + "/") and is_mounted(m):
                unmount(m)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def layout(scratch: Path) -> dict[str, Path | list[Path]]:
    """Three lower layers plus empty upper, work and mountpoint dirs."""
    lowers = make_layers(scratch)
    out: dict[str, Path | list[Path]] = {"lowers": lowers}
    for name in ("upper", "work", "mnt"):
        (scratch / name).mkdir()
        out[name] = scratch / name
    return out
