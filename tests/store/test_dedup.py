"""`lamina dedup`: every strategy's bytes on small images whose overlaps are known by construction.

Fixed-block figures are exact by arithmetic; chunk and compressed figures are checked against an independent
recount (sha256 of each distinct piece, zstd/gzip of each distinct unit or tar), and CDC's resynchronisation after
an insertion against fixed blocks' lack of it.
"""
from __future__ import annotations

import hashlib
import json
import random
import sqlite3
import tarfile
import zlib

import pytest
import zstandard
from pyfastcdc import FastCDC

from store import dedup
from store.dedup_report import from_json, to_json
from store.root import Store
from tests.store.conftest import make_tar, sha256, ti

K = 1024
rng = random.Random(17)
A = rng.randbytes(256 * K)  # 64 blocks of 4 KiB, 4 of 64 KiB
A_MID = A[:128 * K + 5] + bytes([A[128 * K + 5] ^ 1]) + A[128 * K + 6:]  # one byte changed in the middle
A_INS = rng.randbytes(100) + A  # 100 bytes inserted at the front
B = rng.randbytes(10_000)  # hardlinked twice
SMALL = rng.randbytes(100)  # inlined in the index; whited out by an upper layer
C = rng.randbytes(50_000)  # identical in two different layers

L1 = make_tar([(ti("a"), A), (ti("empty"), b""), (ti("h1"), B), (ti("h2", tarfile.LNKTYPE, linkname="h1"), None),
               (ti("small"), SMALL)])
L2_ONE = make_tar([(ti(".wh.small"), b""), (ti("c"), C)])
L2_TWO = make_tar([(ti("a_mid"), A_MID), (ti("a_ins"), A_INS), (ti("a_ins2"), A_INS), (ti("copy"), C)])
DISTINCT = [A, B, SMALL, C, A_MID, A_INS]


def docker_archive(path, layers: list[bytes], tag: str) -> None:
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                      "rootfs": {"type": "layers", "diff_ids": [sha256(x) for x in layers]}}).encode()
    name = hashlib.sha256(cfg).hexdigest() + ".json"
    members = [(ti(name), cfg)] + [(ti(f"l{i}/layer.tar"), x) for i, x in enumerate(layers)]
    manifest = [{"Config": name, "RepoTags": [tag], "Layers": [f"l{i}/layer.tar" for i in range(len(layers))]}]
    path.write_bytes(make_tar(members + [(ti("manifest.json"), json.dumps(manifest).encode())]))


@pytest.fixture
def two_images(lamina, tmp_path):
    for tag, layers in (("one", [L1, L2_ONE]), ("two", [L1, L2_TWO])):
        docker_archive(tmp_path / f"{tag}.tar", layers, tag)
        lamina("import", tmp_path / f"{tag}.tar")
    return lamina


def pieces(data: bytes, strategy: str) -> list[bytes]:
    if strategy.startswith("cdc-"):
        return [bytes(c.data) for c in FastCDC(int(strategy[4:-1]) * K).cut_buf(data)]
    bs = int(strategy[6:-1]) * K
    return [data[i:i + bs] for i in range(0, len(data), bs)]


def recount(contents: list[bytes], strategy: str) -> tuple[int, int, int]:
    """(bytes, zstd bytes, units) of the distinct pieces of `contents`, counted independently."""
    z = zstandard.ZstdCompressor(level=3)
    units = {hashlib.sha256(p).digest(): p for c in contents for p in pieces(c, strategy)}
    return sum(map(len, units.values())), sum(len(z.compress(p)) for p in units.values()), len(units)


def run(lamina, *args) -> dict:
    return json.loads(lamina("dedup", *args, "--format", "json").stdout)


def test_every_strategy_gives_the_expected_bytes(two_images):
    out = run(two_images, "one", "two")
    s = {x["name"]: x for x in out["strategies"]}
    assert [x["name"] for x in out["strategies"]] == ["logical", "layer", "file", "fixed-4k", "fixed-64k",
                                                      "cdc-16k", "cdc-64k"]
    l1 = len(A) + len(B) + len(SMALL)  # the hardlinked content once, the empty file nothing
    two = len(A_MID) + 2 * len(A_INS) + len(C)  # a copy (not a hardlink) within a layer counts twice there
    assert s["logical"]["bytes"] == (l1 + len(C)) + (l1 + two)
    assert s["layer"]["bytes"] == l1 + len(C) + two and s["layer"]["objects"] == 3
    assert s["file"]["bytes"] == sum(map(len, DISTINCT)) and s["file"]["objects"] == 6
    # Fixed blocks: A_MID costs the one block holding the changed byte; A_INS shifts every block, so costs all.
    assert s["fixed-4k"]["bytes"] == len(A) + 4 * K + len(A_INS) + len(B) + len(SMALL) + len(C)
    assert s["fixed-4k"]["objects"] == 64 + 1 + 65 + 3 + 1 + 13
    assert s["fixed-64k"]["bytes"] == len(A) + 64 * K + len(A_INS) + len(B) + len(SMALL) + len(C)
    assert s["fixed-64k"]["objects"] == 4 + 1 + 5 + 1 + 1 + 1
    for name in ("fixed-4k", "fixed-64k", "cdc-16k", "cdc-64k"):
        assert (s[name]["bytes"], s[name]["zstd_bytes"], s[name]["objects"]) == recount(DISTINCT, name), name
    z = zstandard.ZstdCompressor(level=3)
    assert s["file"]["zstd_bytes"] == sum(len(z.compress(x)) for x in DISTINCT)
    gz = [zlib.compressobj(6, zlib.DEFLATED, 31) for _ in range(3)]
    tars = [L1, L2_ONE, L2_TWO]
    gzipped = [len(g.compress(t) + g.flush()) for g, t in zip(gz, tars)]
    assert s["layer"]["gzip_bytes"] == sum(gzipped)
    assert s["logical"]["gzip_bytes"] == 2 * gzipped[0] + gzipped[1] + gzipped[2]  # the shared layer per image

    def zstd_stream(t: bytes) -> int:  # as a registry's streaming compressor writes a layer
        c = z.compressobj(size=len(t))
        return len(c.compress(t) + c.flush())
    assert s["logical"]["zstd_bytes"] == sum(map(zstd_stream, [L1, L1, L2_ONE, L2_TWO]))
    assert [p["zstd_bytes"] for p in out["per_image"]["layer"]] == \
        [zstd_stream(L1) + zstd_stream(t) for t in (L2_ONE, L2_TWO)]
    assert s["layer"]["tar_bytes"] == sum(map(len, tars))
    assert s["logical"]["tar_bytes"] == 2 * len(L1) + len(L2_ONE) + len(L2_TWO)
    assert s["file"]["ratio"] == round(s["logical"]["bytes"] / s["file"]["bytes"], 3)


def test_per_image_and_shared_matrix(two_images):
    out = run(two_images, "one", "two")
    shared = len(A) + len(B) + len(SMALL) + len(C)
    f = out["shared"]["file"]
    assert f == [[shared, shared], [shared, shared + len(A_MID) + len(A_INS)]]
    one, two = out["per_image"]["file"]
    assert (one["unique_bytes"], one["shared_bytes"]) == (0, shared)
    assert (two["unique_bytes"], two["shared_bytes"]) == (len(A_MID) + len(A_INS), shared)
    # layer level shares only the common bottom layer: the identical C in two layers is stored twice
    l1 = len(A) + len(B) + len(SMALL)
    assert out["shared"]["layer"][0][1] == l1
    assert [x["images"] for x in out["layers"]] == [[0, 1], [0], [1]]
    assert out["layers"][0]["unique_bytes"] == len(A) + len(B) + len(SMALL)
    assert out["layers"][1]["unique_bytes"] == 0 and out["layers"][2]["unique_bytes"] == len(A_MID) + len(A_INS)


def test_cdc_resynchronises_after_an_insertion_fixed_blocks_do_not(lamina, tmp_path):
    for tag, data in (("orig", A), ("mid", A_MID), ("ins", A_INS)):
        docker_archive(tmp_path / f"{tag}.tar", [make_tar([(ti("f"), data)])], tag)
        lamina("import", tmp_path / f"{tag}.tar")
    out = run(lamina, "orig", "mid", "ins", "--no-compress")
    sh = out["shared"]
    assert sh["file"][0][1] == sh["file"][0][2] == 0
    assert sh["fixed-4k"][0][1] == len(A) - 4 * K  # one changed byte: one block lost
    assert sh["fixed-4k"][0][2] == 0 and sh["fixed-64k"][0][2] == 0  # 100 bytes in front: every block lost
    for name, avg in (("cdc-16k", 16 * K), ("cdc-64k", 64 * K)):
        # after the first cut point past the insertion the chunks are A's again: at most a chunk or two differ
        assert sh[name][0][2] >= len(A) - 2 * 4 * avg, name
        assert sh[name][0][2] > len(A) // 2, name
        assert sh[name][0][1] >= len(A) - 2 * 4 * avg, name
    assert out["strategies"][0]["zstd_bytes"] is None  # --no-compress


def test_large_objects_are_mapped_with_the_same_figures(two_images, monkeypatch):
    st = Store(str(two_images.root))
    imgs = dedup.select_images(st, ["one", "two"], False)
    before = dedup.analyse(st, imgs, compress=False)
    monkeypatch.setattr(dedup, "_MMAP_FROM", 8 * K)
    after = dedup.analyse(st, imgs, compress=False)
    assert [(s.name, s.bytes, s.objects, s.shared) for s in before.strategies] == \
           [(s.name, s.bytes, s.objects, s.shared) for s in after.strategies]
    assert after.scan_bytes == sum(map(len, DISTINCT))
    st.close()


def test_json_shape_is_stable(two_images):
    out = run(two_images, "--all", "--strategy", "file", "--strategy", "cdc-16k")
    back = to_json(from_json(out))  # read back whole, for reports drawn again
    back["scan"]["mb_per_s"] = out["scan"]["mb_per_s"]  # recomputed from the rounded seconds
    assert back == out
    assert out["format"] == "lamina-dedup/1"
    assert set(out) == {"format", "images", "strategies", "per_image", "shared", "layers", "scan", "seconds",
                        "peak_rss_bytes", "anon_rss_bytes", "compress"}
    assert [x["name"] for x in out["strategies"]] == ["logical", "file", "cdc-16k"]
    assert set(out["strategies"][0]) == {"name", "bytes", "zstd_bytes", "gzip_bytes", "tar_bytes", "objects",
                                         "ratio", "seconds"}
    assert set(out["per_image"]["file"][0]) == {"bytes", "zstd_bytes", "objects", "unique_bytes", "shared_bytes"}
    assert [i["tags"] for i in out["images"]] == [["one:latest"], ["two:latest"]]
    assert set(out["scan"]) == {"bytes", "seconds", "mb_per_s", "cpu_seconds"}


def test_csv_table_database_and_chart(two_images, tmp_path):
    lam = two_images
    csv_rows = lam("dedup", "--all", "--format", "csv", "--no-compress").stdout.splitlines()
    assert csv_rows[0].startswith("strategy,image,tags,bytes,")
    assert sum(1 for r in csv_rows if r.startswith("file,,")) == 1 and len(csv_rows) == 1 + 7 + 7 * 2
    text = lam("dedup", "one", "two", "--db", tmp_path / "r.db", "--chart", tmp_path / "c.png").stdout
    assert "cdc-16k" in text and "one:latest" in text
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lam("dedup", "two", "--db", tmp_path / "r.db", "--no-compress")  # a second run appends
    db = sqlite3.connect(tmp_path / "r.db")
    assert db.execute("SELECT count(*) FROM runs").fetchone()[0] == 2
    assert db.execute("SELECT bytes FROM strategies WHERE run_id=1 AND strategy='file'").fetchone()[0] == \
        sum(map(len, DISTINCT))
    # the README's queries: largest shared files, which images share a file, per-layer unique bytes
    rows = db.execute("SELECT path, size FROM files WHERE run_id=1 AND images > 1 ORDER BY size DESC").fetchall()
    assert rows == [("/a", len(A)), ("/c", len(C)), ("/h1", len(B)), ("/small", len(SMALL))]
    imgs = db.execute("SELECT i.tags FROM file_images f JOIN images i USING (run_id, image_id) "
                      "WHERE f.run_id=1 AND f.object=(SELECT object FROM files WHERE run_id=1 AND path='/a_ins')")
    assert [json.loads(t) for (t,) in imgs] == [["two:latest"]]
    assert sorted(u for (u,) in db.execute("SELECT unique_bytes FROM layers WHERE run_id=1")) == \
        [0, len(A) + len(B) + len(SMALL), len(A_MID) + len(A_INS)]
    idx = {r[1] for r in db.execute("SELECT * FROM sqlite_master WHERE type='index'")}
    assert "idx_files_run_id_size" in idx


def test_archives_given_as_paths_leave_the_store_alone(lamina, tmp_path):
    docker_archive(tmp_path / "one.tar", [L1, L2_ONE], "one")
    docker_archive(tmp_path / "two.tar", [L1, L2_TWO], "two")
    out = run(lamina, tmp_path / "one.tar", tmp_path / "two.tar", "--no-compress")
    assert {x["name"]: x["bytes"] for x in out["strategies"]}["file"] == sum(map(len, DISTINCT))
    assert lamina("images", "-q").stdout == ""
    (tmp_path / "garbage.tar").write_bytes(b"not an archive")
    r = lamina("dedup", tmp_path / "garbage.tar", check=False)
    assert r.returncode == 1 and r.stderr.startswith("lamina: ") and len(r.stderr.splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["nosuch"], "no such image: nosuch"),
    (["--all", "--strategy", "blocks"], "unknown strategy 'blocks'"),
    ([], "name images, or give --all"),
])
def test_bad_input_is_one_line(two_images, args, message):
    r = two_images("dedup", *args, check=False)
    assert r.returncode != 0 and r.stderr.strip().startswith("lamina: ") and message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
