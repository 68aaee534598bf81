"""Hostile archives (issues #11 and #12): numbers, times, names and sizes beyond what the kernel or a tar reader
takes get a one-line error and leave the store as it was; what the kernel does take (64-bit seconds, negative
times, PATH_MAX paths) round-trips exactly."""
from __future__ import annotations

import gzip
import io
import os
import sqlite3
import subprocess
import signal
import sys
import tarfile
import tempfile

import pytest

from store.reader import open_store
from tests.conftest import BIN
from tests.store.conftest import make_tar, sha256, ti
from tests.store.test_bad_input import check_refused, seeded  # noqa: F401 (fixture)
from tests.trees import deep_tree


def pax(name: str, data: bytes = b"x", **headers: str) -> tuple[tarfile.TarInfo, bytes]:
    t = ti(name)
    t.pax_headers = dict(headers)
    return t, data


def header(name: str, typeflag: bytes, size: int, patch: dict[int, bytes] | None = None) -> bytes:
    """One GNU-format header block, with raw bytes patched in at offsets (checksum recomputed)."""
    t = ti(name, typeflag, size=size)
    buf = bytearray(t.tobuf(tarfile.GNU_FORMAT))
    for off, raw in (patch or {}).items():
        buf[off:off + len(raw)] = raw
    buf[148:156] = b" " * 8
    buf[148:156] = b"%06o\0 " % sum(buf)
    return bytes(buf[:512])


def blocks(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


END = b"\0" * 1024
SPARSE10 = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "f", "GNU.sparse.realsize": "9"}


def _sparse10(map_text: bytes) -> bytes:
    return make_tar([pax("GNUSparseFile.0/f", blocks(map_text) + b"123456789", **SPARSE10)])


BAD = {
    # issue #11.7: PAX numbers that are no numbers, or beyond what the kernel stores
    "mtime-nan": (lambda: make_tar([pax("f", mtime="nan")]), "bad PAX mtime"),
    "mtime-inf": (lambda: make_tar([pax("f", mtime="inf")]), "bad PAX mtime"),
    "mtime-minus-inf": (lambda: make_tar([pax("f", mtime="-inf")]), "bad PAX mtime"),
    "mtime-huge-exponent": (lambda: make_tar([pax("f", mtime="1e999999999")]), "bad PAX mtime"),
    "mtime-beyond-64-bit": (lambda: make_tar([pax("f", mtime=str(2**63))]), "outside 64-bit seconds"),
    "uid-10^23": (lambda: make_tar([pax("f", uid=str(10**23))]), "uid 100000000000000000000000 is outside"),
    "gid-2^40-header": (lambda: make_tar([(ti("f", gid=2**40), b"x")], tarfile.GNU_FORMAT), "gid 1099511627776"),
    "uid-minus-1": (lambda: make_tar([pax("f", uid="4294967295")]), "uid 4294967295 is outside"),
    "uid-not-a-number": (lambda: make_tar([pax("f", uid="12abc")]), "bad PAX uid"),
    "device-major-2^40": (lambda: make_tar([(ti("c", tarfile.CHRTYPE, devmajor=2**40), None)],
                                           tarfile.GNU_FORMAT), "device 1099511627776:0 is beyond"),
    "device-2^32-1:2^32-1": (lambda: make_tar([(ti("b", tarfile.BLKTYPE, devmajor=2**32 - 1, devminor=2**32 - 1),
                                                None)], tarfile.GNU_FORMAT), "is beyond Linux's"),
    # malformed GNU sparse maps (formats 0.1, 1.0, 0.0 and the old GNU 'S' header)
    "sparse-0.1-not-numbers": (lambda: make_tar([pax("f", **{"GNU.sparse.map": "0,x", "GNU.sparse.size": "9"})]),
                               "malformed GNU sparse map"),
    "sparse-0.1-odd": (lambda: make_tar([pax("f", **{"GNU.sparse.map": "0,1,2", "GNU.sparse.size": "9"})]),
                       "malformed GNU sparse map"),
    "sparse-1.0-huge-count": (lambda: _sparse10(b"99999999999999999999999\n"), "malformed GNU sparse map"),
    "sparse-1.0-no-newline": (lambda: _sparse10(b"7" * 600), "malformed GNU sparse map"),
    "sparse-1.0-count-beyond-data": (lambda: _sparse10(b"1000000\n0\n9\n"), "GNU sparse map"),
    "sparse-0.0-bad-offset": (lambda: make_tar([pax("f", **{"GNU.sparse.size": "9", "GNU.sparse.offset": "x",
                                                               "GNU.sparse.numbytes": "9"})]), "corrupt"),
    "sparse-old-gnu-extended-garbage": (
        lambda: header("f", tarfile.GNUTYPE_SPARSE, 0, {482: b"\1"}) + b"\xff" * 512 * 4 + END, "tar"),
    # issue #11.8: names the kernel could not make
    "path-16000-components": (lambda: make_tar([(ti("a/" * 16000 + "f"), b"x")]), "longer than PATH_MAX"),
    "path-4096-bytes": (lambda: make_tar([(ti("d/" * 2047 + "ff"), b"x")]), "longer than PATH_MAX"),
    "name-256-bytes": (lambda: make_tar([(ti("n" * 256), b"x")]), "longer than NAME_MAX"),
    "hardlink-target-too-long": (lambda: make_tar([(ti("f"), b"x"), (ti("l", tarfile.LNKTYPE,
                                                                        linkname="a/" * 3000), None)]),
                                 "hardlink target longer than PATH_MAX"),
    "symlink-target-too-long": (lambda: make_tar([(ti("l", tarfile.SYMTYPE, linkname="x" * 5000), None)]),
                                "symlink target longer than PATH_MAX"),
    # headers that claim more than any tar reader takes: read into memory whole by tarfile
    "pax-header-claims-1TB": (lambda: header("././@PaxHeader", tarfile.XHDTYPE, 10**12) + b"\0" * 4096,
                              "MiB"),
    "longname-claims-1TB": (lambda: header("././@LongLink", tarfile.GNUTYPE_LONGNAME, 10**12) + b"\0" * 4096,
                            "MiB"),
    "pax-header-claims-1TB-gzip": (lambda: gzip.compress(header("././@PaxHeader", tarfile.XHDTYPE, 10**12) +
                                                         b"\0" * 4096), "headers exceed 4 MiB"),
    "trailer-of-20MiB": (lambda: make_tar([(ti("f"), b"x")]) + b"\0" * (20 << 20), "follow the tar's end"),
    # a header with a bad checksum in the middle: tarfile takes it for the end and drops what follows
    "bad-checksum-mid-archive": (lambda: make_tar([(ti("f"), b"x")])[:1024] +
                                 header("g", tarfile.REGTYPE, 0).replace(b"g", b"h", 1) + END, "corrupt"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_hostile_tars_refused(seeded, tmp_path, case):
    build, message = BAD[case]
    p = tmp_path / f"{case}.tar"
    p.write_bytes(build())
    check_refused(seeded, p, message)


def test_load_of_dev_zero(seeded):
    """`lamina load -i /dev/zero`: not an archive, said at once (it read zeros forever)."""
    r = seeded("load", "-i", "/dev/zero", check=False)
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "not an image archive" in r.stderr, r.stderr
    seeded.assert_clean()


def test_index_json_nested_100000_deep(seeded, tmp_path):
    """An OCI layout whose index.json nests 100,000 arrays (a RecursionError traceback)."""
    d = tmp_path / "layout"
    (d / "blobs/sha256").mkdir(parents=True)
    (d / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (d / "index.json").write_text("[" * 100_000 + "]" * 100_000)
    check_refused(seeded, d, "index.json: JSON nested too deeply")
    (tmp_path / "archive.tar").write_bytes(make_tar([(ti("oci-layout"), b'{"imageLayoutVersion": "1.0.0"}'),
                                                     (ti("index.json"), b'{"a":' * 100_000 + b"1" +
                                                      b"}" * 100_000)]))
    check_refused(seeded, tmp_path / "archive.tar", "nested too deeply")


def test_endless_input_refused(seeded):
    """`import -` of an endless stream of zeros (an empty tar, then zeros forever) ends with an error."""
    with open("/dev/zero", "rb") as zero:
        r = seeded("import", "-", check=False, stdin=zero)
    assert r.returncode != 0 and r.stderr.startswith("lamina: ") and r.stderr.count("\n") == 1, r.stderr
    assert "follow the tar's end" in r.stderr
    seeded.assert_clean()


TIMES = [
    ("y2300", "10413792000", 10_413_792_000 * 10**9),
    ("y2300-frac", "10413792000.123456789", 10_413_792_000_123_456_789),
    ("before-1970", "-1.5", -1_500_000_000),  # 1.5 s before the epoch: second -2, +500,000,000 ns
    ("y1600", "-11676096000.000000001", -11_676_096_000_000_000_001),
    ("max-seconds", str(2**63 - 1), (2**63 - 1) * 10**9),
    ("min-seconds", str(-(2**63)), -(2**63) * 10**9),
]


def test_times_beyond_1970_2262_exact(lamina, tmp_path):
    """Issue #12.10: any time in 64-bit seconds, negative ones included, is kept to the nanosecond, and the layer
    still round-trips byte for byte."""
    tar = make_tar([pax(name, name.encode(), mtime=raw) for name, raw, _ in TIMES] +
                   [(ti("gnu-2300", mtime=10_413_792_000), b"g")], tarfile.PAX_FORMAT)
    (tmp_path / "t.tar").write_bytes(tar)
    lamina("import", tmp_path / "t.tar", "-t", "times")
    with open_store(str(lamina.root)) as s:
        img = s.image("times")
        r = s.reader()
        got = {name: r.lookup(img.layer_ids[0], "/" + name).mtime_ns for name, _, _ in TIMES}
        gnu = r.lookup(img.layer_ids[0], "/gnu-2300").mtime_ns
    assert got == {name: ns for name, _, ns in TIMES}
    assert gnu == 10_413_792_000 * 10**9
    lamina("save", "times", "-o", tmp_path / "out.tar")
    with tarfile.open(tmp_path / "out.tar") as tf:
        layers = [tf.extractfile(m).read() for m in tf.getmembers() if m.isfile() and m.size == len(tar)]
    assert sha256(tar) in {sha256(x) for x in layers}
    lamina.assert_clean()


def test_directory_dated_2300_imported(lamina, tmp_path):
    """Issue #12.10: a directory with a file dated 2300 and one dated 1902 imports (it died with an
    OverflowError and left a stray object), times exact."""
    d = tmp_path / "d"
    d.mkdir()
    (d / "future").write_bytes(os.urandom(8192))  # a file-backed object: a stray one was left behind
    (d / "past").write_text("past\n")  # 1902: ext4 keeps 1901-12-13 to 2446
    os.utime(d / "future", ns=(0, 10_413_792_000_123_456_789))
    os.utime(d / "past", ns=(0, -2_145_916_800_000_000_000))
    lamina("import", d, "-t", "d")
    with open_store(str(lamina.root)) as s:
        img = s.image("d")
        r = s.reader()
        assert r.lookup(img.layer_ids[0], "/future").mtime_ns // 10**9 == 10_413_792_000
        assert r.lookup(img.layer_ids[0], "/past").mtime_ns == -2_145_916_800_000_000_000
    lamina.assert_clean()


def test_deepest_and_longest_paths_kernel_takes(lamina, tmp_path):
    """A path of PATH_MAX - 1 bytes, 2,047 levels deep, and names of NAME_MAX bytes import."""
    deep = "d/" * 2046 + "fff"  # 4,095 bytes
    assert len(deep) == 4095
    tar = make_tar([(ti(deep), b"deep"), (ti("n" * 255), b"long name")])
    (tmp_path / "t.tar").write_bytes(tar)
    lamina("import", tmp_path / "t.tar", "-t", "deep")
    with open_store(str(lamina.root)) as s:
        img = s.image("deep")
        assert s.reader().lookup(img.layer_ids[0], "/" + deep).size == 4
    lamina.assert_clean()


def test_header_fields_roundtrip_in_base256(lamina, tmp_path):
    """GNU tar's base-256 numbers: a time of 2300 in the header itself (no PAX) keeps its value."""
    t = ti("f", mtime=10_413_792_000)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        tf.addfile(t, io.BytesIO(b""))
    raw = buf.getvalue()
    assert raw[136] & 0x80  # base-256 encoded
    (tmp_path / "t.tar").write_bytes(raw)
    lamina("import", tmp_path / "t.tar", "-t", "b256")
    with open_store(str(lamina.root)) as s:
        img = s.image("b256")
        assert s.reader().lookup(img.layer_ids[0], "/f").mtime_ns == 10_413_792_000 * 10**9


# Runs a command as its child and writes the child's peak RSS (KiB, from wait4) to the file argv[1]. The measured
# process must be a child of a small one: ru_maxrss keeps the high-water mark from before exec, and a process
# forked from pytest starts with pytest's resident set.
_RSS_SHIM = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status) % 256)
"""


def run_measured(lamina, *args: str, stdin=None, timeout: float = 300) -> tuple[int, str, int]:
    """Runs `lamina ARGS`; returns (exit status, stderr, its peak RSS in bytes)."""
    env = dict(os.environ, LAMINA_ROOT=str(lamina.root))
    with tempfile.TemporaryDirectory() as tmp:
        rss_file = os.path.join(tmp, "rss")
        p = subprocess.Popen([sys.executable, "-c", _RSS_SHIM, rss_file, str(BIN / "lamina"), *map(str, args)],
                             env=env, stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             start_new_session=True)
        try:
            _, err = p.communicate(timeout=timeout)
        finally:
            if p.returncode is None:
                os.killpg(p.pid, signal.SIGKILL)  # the shim and lamina under it
                p.wait()
        with open(rss_file) as f:
            rss = int(f.read()) * 1024
    return p.returncode, err.decode(errors="replace"), rss


IMPORT_RSS_BUDGET = 120 << 20


def test_many_entries_in_bounded_memory(lamina, tmp_path):
    """Issue #11.8: 200,000 empty files (a 1.2 MB gzip) took 223 MB; the rows now wait in a scratch SQLite file
    and tarfile no longer keeps every member, so the import stays within a fixed budget (62 MB measured; 1M
    entries: 932 MB -> 63 MB)."""
    p = tmp_path / "many.tar.gz"
    with gzip.open(p, "wb", compresslevel=1) as g, tarfile.open(fileobj=g, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for i in range(200_000):
            tf.addfile(tarfile.TarInfo(f"d{i // 1000}/f{i}"))
    rc, err, rss = run_measured(lamina, "import", p, "-t", "many")
    assert rc == 0, err
    assert rss < IMPORT_RSS_BUDGET, f"peak RSS {rss >> 20} MiB"
    with open_store(str(lamina.root)) as s:
        img = s.image("many")
        r = s.reader()
        assert len(r.children(img.layer_ids[0], "/d199")) == 1000
        assert r.lookup(img.layer_ids[0], "/d7/f7999").size == 0


def test_root_member_makes_no_second_root(lamina, tmp_path):
    """A tar's own "./" entry is the layer's root: it added a stray directory row (parent '/', name '')."""
    (tmp_path / "t.tar").write_bytes(make_tar([(ti("./", tarfile.DIRTYPE), None), (ti("./a"), b"a")]))
    lamina("import", tmp_path / "t.tar")
    db = sqlite3.connect(lamina.root / "index.db")
    assert db.execute("SELECT parent, name, implicit FROM entries WHERE name = ''").fetchall() == [("", "", 0)]
    db.close()


def test_import_directory_1100_levels_deep(lamina, tmp_path):
    """Issue #11.9: `lamina import DIR` of a 1,100-level tree (RecursionError in the directory-to-tar walk)."""
    (tmp_path / "deep").mkdir()
    try:
        deep_tree(tmp_path / "deep", 1100)
        lamina("import", tmp_path / "deep", "-t", "deep")
        with open_store(str(lamina.root)) as s:
            img = s.image("deep")
            assert s.reader().lookup(img.layer_ids[0], "/d" * 1100 + "/f").size == 5
        lamina.assert_clean()
    finally:
        subprocess.run(["rm", "-rf", str(tmp_path / "deep")], check=True)  # shutil.rmtree recurses too deep


def test_runs_of_zeros_stored_as_holes(lamina, tmp_path):
    """Issue #12.13 (the store's part): a 64 MiB file of zeros with a little data took 64 MiB in objects/;
    its zero runs are now holes, and the layer still round-trips byte for byte."""
    data = b"head" + bytes(32 << 20) + b"middle" + bytes(32 << 20) + b"tail"
    tar = make_tar([(ti("sparse"), data)])
    (tmp_path / "t.tar").write_bytes(tar)
    lamina("import", tmp_path / "t.tar", "-t", "sparse")
    (obj,) = [o for o in lamina.objects() if os.path.getsize(o) == len(data)]
    assert os.stat(obj).st_blocks * 512 < 1 << 20, os.stat(obj).st_blocks
    with open(obj, "rb") as f:
        assert f.read() == data
    lamina("save", "sparse", "-o", tmp_path / "out.tar")
    with tarfile.open(tmp_path / "out.tar") as tf:
        assert sha256(tar) in {sha256(tf.extractfile(m).read()) for m in tf.getmembers() if m.isfile()}
    lamina.assert_clean()


def test_manifest_layers_not_descriptors(seeded, tmp_path):
    """Found by the fuzz test: a manifest whose layers are [null] ended in an AttributeError traceback."""
    from tests.store.test_fuzz import build_archive, build_tar
    (tmp_path / "a.tar").write_bytes(build_archive(build_tar([], gnu=False), "manifest", [None], 0))
    check_refused(seeded, tmp_path / "a.tar", "layers is not a list of descriptors")
