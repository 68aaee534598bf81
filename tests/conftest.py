"""Fixtures shared by every part of the suite."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def busybox_dir(tmp_path_factory) -> Path:
    """A busybox root filesystem built from Debian's busybox-static (read-only for tests: copy it to change it)."""
    from runtime.busybox import build
    return build(tmp_path_factory.mktemp("busybox") / "rootfs")
