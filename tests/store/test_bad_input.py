"""Bad input: a one-line error naming the problem, a non-zero exit, and a store left exactly as it was."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import tarfile

import pytest
import zstandard

from tests.store.conftest import make_tar, ti

GOOD = make_tar([(ti("etc", tarfile.DIRTYPE), None), (ti("etc/hostname"), b"good\n")])


def _symlink(name: str, target: str) -> tarfile.TarInfo:
    return ti(name, tarfile.SYMTYPE, linkname=target)


def _hardlink(name: str, target: str) -> tarfile.TarInfo:
    return ti(name, tarfile.LNKTYPE, linkname=target)


BAD_TARS = {
    "dotdot": ([(ti("../../../../../../tmp/lamina-escaped"), b"x")], "escapes the layer"),
    "dotdot-inside": ([(ti("a/../../escape"), b"x")], "escapes the layer"),
    "absolute": ([(ti("/etc/passwd"), b"x")], "absolute path"),
    "write-through-symlink": ([(_symlink("etc", "/tmp"), None), (ti("etc/lamina-escaped"), b"x\n")],
                              "parent /etc is a symlink"),
    "absolute-symlink-dir": ([(ti("/tmp/lamina-escaped"), b"x")], "absolute path"),
    "hardlink-missing": ([(_hardlink("a", "missing"), None)], "target is not in this layer"),
    "hardlink-outside": ([(_hardlink("a", "../../etc/shadow"), None)], "escapes the layer"),
    "hardlink-to-dir": ([(ti("d", tarfile.DIRTYPE), None), (_hardlink("a", "d"), None)], "target is a directory"),
    "duplicate": ([(ti("a"), b"1"), (ti("a"), b"2")], "duplicate entry"),
    "whiteout-dotdot": ([(ti("d/.wh.."), b"")], "whiteout escapes"),
    "symlink-target-not-utf8": ([(_symlink("link", "t\udcffarget"), None)], "non-UTF-8 symlink target"),
}


def check_refused(lamina, path, message: str) -> None:
    before_objects = lamina.objects()
    before_images = lamina("images", "--format", "json").stdout
    r = lamina("import", path, "-t", "bad", check=False)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lamina: "), r.stderr
    assert message in lines[0], lines[0]
    assert lamina("images", "--format", "json").stdout == before_images
    lamina.assert_clean()
    assert lamina.objects() == before_objects  # nothing staged or linked survives
    assert not os.listdir(lamina.root / "tmp")


@pytest.fixture
def seeded(lamina, tmp_path):
    (tmp_path / "good.tar").write_bytes(GOOD)
    lamina("import", tmp_path / "good.tar", "-t", "good")
    return lamina


@pytest.mark.parametrize("case", sorted(BAD_TARS))
def test_bad_layer_tars(seeded, tmp_path, case):
    members, message = BAD_TARS[case]
    p = tmp_path / f"{case}.tar"
    p.write_bytes(make_tar(members))
    check_refused(seeded, p, message)
    assert not os.path.lexists("/tmp/lamina-escaped")  # the store never writes outside its root


def test_truncated_and_corrupt_compression(seeded, tmp_path):
    big = make_tar([(ti("f"), os.urandom(1 << 20))])
    gz = gzip.compress(big)
    zs = zstandard.ZstdCompressor(write_checksum=True).compress(big)  # as the zstd CLI writes by default
    (tmp_path / "trunc.tar.gz").write_bytes(gz[: len(gz) // 2])
    check_refused(seeded, tmp_path / "trunc.tar.gz", "gzip")
    corrupt = bytearray(gz)
    corrupt[len(corrupt) // 2] ^= 0xFF
    (tmp_path / "corrupt.tar.gz").write_bytes(bytes(corrupt))
    check_refused(seeded, tmp_path / "corrupt.tar.gz", "gzip")
    corrupt = bytearray(zs)
    corrupt[len(corrupt) // 2] ^= 0xFF
    (tmp_path / "corrupt.tar.zst").write_bytes(bytes(corrupt))
    check_refused(seeded, tmp_path / "corrupt.tar.zst", "zstd")
    (tmp_path / "trunc.tar.zst").write_bytes(zs[: len(zs) // 2])
    check_refused(seeded, tmp_path / "trunc.tar.zst", "trunc")
    (tmp_path / "trunc.tar").write_bytes(big[: len(big) // 2])
    check_refused(seeded, tmp_path / "trunc.tar", "truncated")


def test_not_an_archive(seeded, tmp_path):
    (tmp_path / "junk").write_bytes(os.urandom(4096))
    check_refused(seeded, tmp_path / "junk", "not a")
    r = seeded("import", tmp_path / "missing", check=False)
    assert r.returncode != 0 and "no such file" in r.stderr


@pytest.fixture
def layout(seeded, tmp_path, busybox_dir):
    """An OCI layout made by skopeo from an image we saved, unpacked to a directory we can damage."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "hello").write_text("hello\n")
    seeded("import", src, "-t", "hello")
    seeded("save", "hello", "-o", tmp_path / "hello.tar")
    d = tmp_path / "layout"
    subprocess.run(["skopeo", "copy", f"oci-archive:{tmp_path}/hello.tar", f"oci:{d}:hello"], check=True,
                   capture_output=True)
    seeded("rmi", "hello")
    seeded("gc")
    return d


def _manifest(d):
    index = json.loads((d / "index.json").read_text())
    digest = index["manifests"][0]["digest"]
    return json.loads((d / "blobs/sha256" / digest.split(":")[1]).read_text()), digest


def _rewrite_manifest(d, manifest, old_digest):
    data = json.dumps(manifest).encode()
    new = "sha256:" + hashlib.sha256(data).hexdigest()
    (d / "blobs/sha256" / new.split(":")[1]).write_bytes(data)
    index = json.loads((d / "index.json").read_text())
    index["manifests"][0].update(digest=new, size=len(data))
    (d / "index.json").write_text(json.dumps(index))


def test_layout_missing_blob(seeded, layout):
    m, _ = _manifest(layout)
    (layout / "blobs/sha256" / m["layers"][0]["digest"].split(":")[1]).unlink()
    check_refused(seeded, layout, "missing")


def test_layout_blob_digest_mismatch(seeded, layout):
    m, _ = _manifest(layout)
    blob = layout / "blobs/sha256" / m["layers"][0]["digest"].split(":")[1]
    other = make_tar([(ti("hello"), b"HELLO\n")])
    blob.write_bytes(gzip.compress(other))
    check_refused(seeded, layout, "does not match")


def test_layout_diffid_mismatch(seeded, layout):
    m, digest = _manifest(layout)
    cfg_path = layout / "blobs/sha256" / m["config"]["digest"].split(":")[1]
    cfg = json.loads(cfg_path.read_text())
    cfg["rootfs"]["diff_ids"] = ["sha256:" + "0" * 64]
    data = json.dumps(cfg).encode()
    new = "sha256:" + hashlib.sha256(data).hexdigest()
    (layout / "blobs/sha256" / new.split(":")[1]).write_bytes(data)
    m["config"].update(digest=new, size=len(data))
    _rewrite_manifest(layout, m, digest)
    check_refused(seeded, layout, "DiffID")


def test_layout_unknown_media_type(seeded, layout):
    m, digest = _manifest(layout)
    m["layers"][0]["mediaType"] = "application/vnd.example.layer.v1.tar+lz4"
    _rewrite_manifest(layout, m, digest)
    check_refused(seeded, layout, "unknown media type")


def test_layout_config_digest_mismatch(seeded, layout):
    m, _ = _manifest(layout)
    cfg_path = layout / "blobs/sha256" / m["config"]["digest"].split(":")[1]
    cfg_path.write_bytes(cfg_path.read_bytes() + b" ")
    check_refused(seeded, layout, "does not match its digest")


def test_bad_tag_and_unknown_images(seeded, tmp_path):
    (tmp_path / "good.tar").write_bytes(GOOD)
    for args, msg in ((("import", tmp_path / "good.tar", "-t", "Bad Name"), "invalid reference"),
                      (("history", "nope"), "no such image"),
                      (("rmi", "nope"), "no such image"),
                      (("tag", "nope", "x"), "no such image"),
                      (("save", "nope", "-o", tmp_path / "x.tar"), "no such image")):
        r = seeded(*args, check=False)
        assert r.returncode != 0 and r.stderr.count("\n") == 1 and msg in r.stderr, (args, r.stderr)
    assert not (tmp_path / "x.tar").exists()
    seeded.assert_clean()


@pytest.mark.parametrize("index", ['{"manifests": [5]}', "[1]", "{not json", '{"manifests": [{"mediaType": 3}]}'])
def test_layout_malformed_index(seeded, layout, index):
    (layout / "index.json").write_text(index)
    check_refused(seeded, layout, "")
