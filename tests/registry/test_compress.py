"""The gzip lamina pushes: blocks deflated in parallel form one standard gzip stream, the same for the same input."""
from __future__ import annotations

import gzip
import os
import subprocess

import pytest

from registry.push import GZIP_BLOCK, parallel_gzip


@pytest.mark.parametrize("size", [0, 1, GZIP_BLOCK - 1, GZIP_BLOCK, 3 * GZIP_BLOCK + 12345])
def test_parallel_gzip_is_standard_and_deterministic(size):
    text = (b"lamina layer bytes " * 70_000)[: size // 2]
    data = text + os.urandom(size - len(text))  # both compressible and incompressible runs
    whole = b"".join(parallel_gzip(iter([data])))
    assert gzip.decompress(whole) == data
    assert subprocess.run(["gzip", "-t"], input=whole).returncode == 0
    cut = [data[i:i + 7777] for i in range(0, len(data), 7777)]
    assert b"".join(parallel_gzip(iter(cut))) == whole  # however the input arrives


def test_blocks_see_the_previous_32k():
    """Each block is primed with the tail of the one before: a repeat across a block boundary compresses."""
    blob = os.urandom(20_000)
    data = os.urandom(GZIP_BLOCK - 20_000) + blob + blob
    assert len(b"".join(parallel_gzip(iter([data])))) < len(data) - 15_000
