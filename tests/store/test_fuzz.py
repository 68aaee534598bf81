"""Fuzzing the import (issue #11, "Tests"): hypothesis builds layer tars and OCI image archives from a grammar of
hostile cases (bad numbers and times, escaping and overlong names, sparse maps, whiteouts, links, devices) and
mutates their bytes (flips, cuts, zeroed or repeated blocks, compression). Every input must end in one of two
ways: exit 0 with the layer stored byte for byte (`lamina save` gives back the input's tar, its DiffID), or a
one-line `lamina: ...` error with the store as it was; never a traceback, never more than a fixed peak RSS, and
`lamina fsck` clean after either.

The suite runs 15 examples of each kind, derandomized (the same inputs each run). A longer, random run:

    LAMINA_FUZZ_EXAMPLES=2000 .venv/bin/python -m pytest -q tests/store/test_fuzz.py
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import tempfile
from pathlib import Path

import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.store.conftest import Lamina
from tests.store.test_hostile import IMPORT_RSS_BUDGET, run_measured

EXAMPLES = int(os.environ.get("LAMINA_FUZZ_EXAMPLES", "0")) or None
FUZZ = settings(max_examples=EXAMPLES or 15, derandomize=EXAMPLES is None, deadline=None, database=None,
                suppress_health_check=list(HealthCheck), print_blob=True)

NAMES = ["a", "b", "d", "d/f", "d/e/f", ".", "./", "./a", "../x", "a/../../x", "/abs", "d/.wh.f", ".wh.d",
         "d/.wh..wh..opq", ".wh..wh.plnk", ".wh..", "a/" * 2100 + "x", "n" * 256, "x\udcff", "d/" * 300 + "f"]
TYPES = [tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE,
         tarfile.FIFOTYPE, tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE, b"Z"]
PAX_KEYS = ["mtime", "uid", "gid", "size", "path", "linkpath", "atime", "SCHILY.xattr.user.x",
            "SCHILY.xattr.trusted.overlay.opaque", "GNU.sparse.map", "GNU.sparse.size", "GNU.sparse.major",
            "GNU.sparse.minor", "GNU.sparse.name", "GNU.sparse.realsize", "GNU.sparse.offset",
            "GNU.sparse.numbytes"]
PAX_VALUES = ["nan", "inf", "-inf", "1e999999999", "1.5", "-1.5", "10413792000.123456789", str(10**23), "-5", "abc",
              "", "0,1,2", "0,1", "1", "0", str(2**63), "9" * 40, "y", "d/f", "../../etc"]
NUMBERS = [0, 1, 1000, 2**21 - 1, 2**32 - 1, 10_413_792_000]

member = st.fixed_dictionaries({
    "name": st.one_of(st.sampled_from(NAMES), st.text(st.sampled_from("ab/.wh"), min_size=1, max_size=10)),
    "type": st.sampled_from(TYPES),
    "data": st.one_of(st.binary(max_size=40), st.sampled_from([b"", b"\0" * 5000, b"same\n"])),
    "linkname": st.sampled_from(["a", "d", "d/f", "../etc", "/etc/passwd", "x" * 5000, ""]),
    "pax": st.dictionaries(st.sampled_from(PAX_KEYS), st.one_of(st.sampled_from(PAX_VALUES),
                                                               st.text(max_size=6)), max_size=3),
    "mtime": st.sampled_from(NUMBERS),
    "uid": st.sampled_from(NUMBERS),
    "major": st.sampled_from([0, 1, 4095, 4096]),
})
mutation = st.tuples(st.sampled_from(["flip", "cut", "zero", "repeat", "garbage"]), st.floats(0, 1),
                     st.integers(1, 255))


def build_tar(members: list[dict], gnu: bool) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT if gnu else tarfile.PAX_FORMAT,
                      encoding="utf-8", errors="surrogateescape") as tf:
        for m in members:
            t = tarfile.TarInfo(m["name"])
            t.type, t.mtime, t.uid, t.gid = m["type"], m["mtime"], m["uid"], m["uid"]
            t.linkname, t.devmajor = m["linkname"], m["major"]
            t.mode = 0o755
            if not gnu:
                t.pax_headers = dict(m["pax"])
            data = m["data"] if m["type"] in (tarfile.REGTYPE, tarfile.CONTTYPE) else b""
            t.size = len(data)
            try:
                tf.addfile(t, io.BytesIO(data) if data else None)
            except (ValueError, UnicodeError, tarfile.HeaderError):
                continue  # a member tarfile itself will not write: the mutations make such bytes
    return buf.getvalue()


def mutate(data: bytes, mutations: list[tuple[str, float, int]]) -> bytes:
    b = bytearray(data)
    for op, where, n in mutations:
        if not b:
            break
        i = min(int(where * len(b)), len(b) - 1)
        if op == "flip":
            b[i] ^= n
        elif op == "cut":
            del b[i:]
        elif op == "zero":
            b[i - i % 512:i - i % 512 + 512] = bytes(len(b[i - i % 512:i - i % 512 + 512]))
        elif op == "repeat":
            start = i - i % 512
            b[start:start] = b[start:start + 512]
        else:
            b[i:i] = bytes((n * k) & 0xFF for k in range(n))
    return bytes(b)


def compress(data: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(data, compresslevel=1, mtime=0)
    if how == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Fuzzer:
    """One store for all examples of a test; each example is one import, checked either way."""

    def __init__(self) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="lamina-fuzz-")
        self.lamina = Lamina(Path(self.tmp.name) / "store")
        self.lamina("images")  # the store exists before the first "unchanged" comparison
        self.n = 0

    def state(self) -> tuple:
        return (self.lamina("images", "--format", "json").stdout, self.lamina.objects(),
                sorted(os.listdir(self.lamina.root / "tmp")))

    def run(self, src: Path, layer: bytes | None) -> None:
        """Imports `src`; `layer`: the uncompressed layer tar when `src` is one (its bytes must come back)."""
        self.n += 1
        tag = f"fuzz:{self.n}"
        before = self.state()
        rc, err, rss = run_measured(self.lamina, "import", src, "-t", tag, timeout=120)
        assert rss < IMPORT_RSS_BUDGET, f"peak RSS {rss >> 20} MiB"
        assert "Traceback" not in err, err
        if rc == 0:
            out = Path(self.tmp.name) / "saved.tar"
            self.lamina("save", tag, "-o", out)
            with tarfile.open(out) as tf:
                blobs = {sha256(tf.extractfile(m).read()) for m in tf.getmembers() if m.isfile()}
                cfg = [json.loads(tf.extractfile(m).read()) for m in tf.getmembers()
                       if m.isfile() and m.size < 1 << 16 and b'"rootfs"' in tf.extractfile(m).read()]
            out.unlink()
            diff_ids = cfg[0]["rootfs"]["diff_ids"]
            assert set(diff_ids) <= blobs  # each layer saved is the tar its DiffID names
            if layer is not None:
                assert diff_ids == [sha256(layer)]  # and is the input's tar, byte for byte
        else:
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("lamina: "), err
            assert self.state() == before
        self.lamina.assert_clean()

    def close(self) -> None:
        self.tmp.cleanup()


@FUZZ
@given(members=st.lists(member, max_size=6), gnu=st.booleans(), mutations=st.lists(mutation, max_size=3),
       how=st.sampled_from(["plain", "plain", "gzip", "zstd"]))
def test_fuzz_layer_tars(members, gnu, mutations, how):
    fz = _fuzzer("tar")
    layer = mutate(build_tar(members, gnu), mutations)
    src = Path(fz.tmp.name) / "input"
    src.write_bytes(compress(layer, how))
    fz.run(src, layer)


def _json_value():
    return st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=5)),
                        lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=5), c,
                                                                                   max_size=3)), max_leaves=8)


def build_archive(layer: bytes, damage: str, value, nest: int) -> bytes:
    """An OCI archive of one image whose layer is `layer`, with one part damaged as `damage` says."""
    layer_desc = {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha256(layer),
                  "size": len(layer)}
    config = {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [sha256(layer)]}}
    if damage == "config":
        config["rootfs"] = value
    cfg = json.dumps(config).encode()
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(cfg),
                           "size": len(cfg)}, "layers": [layer_desc]}
    if damage == "manifest":
        manifest["layers"] = value
    man = json.dumps(manifest).encode()
    index = {"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                                                 "digest": sha256(man), "size": len(man)}]}
    idx = json.dumps(index).encode()
    if damage == "index":
        idx = json.dumps(value).encode()
    elif damage == "nested":
        idx = b"[" * nest + b"]" * nest
    blobs = {sha256(b): b for b in (layer, cfg, man)}
    if damage == "missing-layer":
        del blobs[sha256(layer)]
    files = {"oci-layout": b'{"imageLayoutVersion": "1.0.0"}', "index.json": idx,
             **{f"blobs/sha256/{d[7:]}": b for d, b in blobs.items()}}
    return build_tar([{"name": n, "type": tarfile.REGTYPE, "data": b, "linkname": "", "pax": {}, "mtime": 0,
                       "uid": 0, "major": 0} for n, b in files.items()], gnu=False)


@FUZZ
@given(members=st.lists(member, max_size=4), damage=st.sampled_from(["none", "config", "manifest", "index",
                                                                    "nested", "missing-layer", "bytes"]),
       value=_json_value(), nest=st.sampled_from([10, 1000, 100_000]), mutations=st.lists(mutation, max_size=2))
def test_fuzz_oci_archives(members, damage, value, nest, mutations):
    fz = _fuzzer("oci")
    archive = build_archive(build_tar(members, gnu=False), damage, value, nest)
    if damage == "bytes":
        archive = mutate(archive, mutations)
    src = Path(fz.tmp.name) / "archive.tar"
    src.write_bytes(archive)
    fz.run(src, None)


_FUZZERS: dict[str, Fuzzer] = {}


def _fuzzer(kind: str) -> Fuzzer:
    if kind not in _FUZZERS:
        _FUZZERS[kind] = Fuzzer()
    return _FUZZERS[kind]


def teardown_module() -> None:
    for fz in _FUZZERS.values():
        fz.close()
    _FUZZERS.clear()
