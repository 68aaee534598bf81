"""Store fixtures: a fresh store root per test and a runner for the real `lamina` command."""
from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import BIN


@dataclass
class Lamina:
    root: Path

    def __call__(self, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        env = dict(os.environ, LAMINA_ROOT=str(self.root))
        p = subprocess.run([str(BIN / "lamina"), *map(str, args)], env=env, capture_output=True, text=True,
                           timeout=300, **kw)
        if check and p.returncode != 0:
            raise AssertionError(f"lamina {' '.join(map(str, args))} exited {p.returncode}: {p.stderr}")
        return p

    def objects(self) -> set[str]:
        out = set()
        for d, _, files in os.walk(self.root / "objects"):
            out.update(os.path.join(d, f) for f in files)
        return out

    def assert_clean(self) -> None:
        """fsck finds nothing wrong, and gc finds nothing to collect but what it is told."""
        r = self("fsck", check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        assert " 0 problems" in r.stdout


@pytest.fixture
def lamina(tmp_path) -> Lamina:
    return Lamina(tmp_path / "store")


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_tar(members: list[tuple[tarfile.TarInfo, bytes | None]], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for ti, data in members:
            if data is not None:
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
            else:
                tf.addfile(ti)
    return buf.getvalue()


def ti(name: str, kind: bytes = tarfile.REGTYPE, **kw) -> tarfile.TarInfo:
    t = tarfile.TarInfo(name)
    t.type = kind
    t.mode = kw.pop("mode", 0o755 if kind == tarfile.DIRTYPE else 0o644)
    t.mtime = kw.pop("mtime", 1_700_000_000)
    for k, v in kw.items():
        setattr(t, k, v)
    return t
