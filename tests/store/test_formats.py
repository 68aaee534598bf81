"""Import and export of every format, with archives made by third-party tools (GNU tar, umoci, skopeo, podman)
as well as by lamina itself; layers must round-trip byte for byte."""
from __future__ import annotations

import gzip
import json
import os
import shutil
import stat
import subprocess
import tarfile

import pytest
import zstandard

from store.reader import open_store
from tests.store.conftest import make_tar, sha256, ti


def run(*cmd: str, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=300, **kw)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.strip()}")
    return p


@pytest.fixture
def rich_dir(tmp_path, busybox_dir):
    """A tree with every kind of entry: hardlinks, symlinks, fifo, devices, xattrs, owners, ns mtimes, long names."""
    d = tmp_path / "rich"
    shutil.copytree(busybox_dir, d, symlinks=True)
    (d / "data").mkdir()
    (d / "data/a.txt").write_text("same content\n")
    os.link(d / "data/a.txt", d / "data/a-hardlink.txt")
    os.symlink("../etc/passwd", d / "data/link")
    os.mkfifo(d / "data/fifo")
    os.mknod(d / "data/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(d / "data/blk", 0o660 | stat.S_IFBLK, os.makedev(7, 0))
    long = d / "data" / ("x" * 120) / ("y" * 120)
    long.mkdir(parents=True)
    (long / "deep.txt").write_text("deep\n")
    os.setxattr(d / "data/a.txt", "user.origin", b"lamina\x00\xff")
    os.chown(d / "data/a.txt", 1234, 5678)
    os.utime(d / "data/a.txt", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    (d / "data/big.bin").write_bytes(os.urandom(3 << 20))
    return d


def layer_of(saved: str, diff_id: str) -> bytes:
    with tarfile.open(saved) as tf:
        for m in tf.getmembers():
            if m.isfile():
                data = tf.extractfile(m).read()
                if sha256(data) == diff_id:
                    return data
    raise AssertionError(f"{diff_id} not found in {saved}")


def gnu_tar(src, out, *extra) -> bytes:
    opts = list(extra) or ["--format=posix", "--xattrs", "--xattrs-include=*"]
    run("tar", "--numeric-owner", *opts, "-C", str(src), "-cf", str(out), ".")
    return open(out, "rb").read()


def test_gnu_tar_plain_gzip_zstd_share_one_layer_and_round_trip(lamina, rich_dir, tmp_path):
    raw = gnu_tar(rich_dir, tmp_path / "l.tar")
    (tmp_path / "l.tar.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "l.tar.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    ids = [lamina("import", tmp_path / n, "-t", f"t:{i}").stdout.strip() for i, n in
           enumerate(["l.tar", "l.tar.gz", "l.tar.zst"])]
    inspected = json.loads(lamina("inspect", "t:0", "t:1", "t:2").stdout)
    diff_ids = {i["RootFS"]["Layers"][0] for i in inspected}
    assert diff_ids == {sha256(raw)}
    st = open_store(str(lamina.root)).store
    assert st.db.execute("SELECT count(*) FROM layers").fetchone()[0] == 1
    # export: the layer is byte-identical to the GNU tar we imported
    lamina("save", "t:0", "-o", tmp_path / "out.tar")
    assert layer_of(str(tmp_path / "out.tar"), sha256(raw)) == raw
    assert len(set(ids)) >= 1
    lamina.assert_clean()


def test_directory_import_keeps_every_kind_of_entry(lamina, rich_dir):
    lamina("import", rich_dir, "-t", "rich")
    s = open_store(str(lamina.root))
    img = s.image("rich")
    r = s.reader()
    lid = img.layer_ids[0]
    a = r.lookup(lid, "/data/a.txt")
    h = r.lookup(lid, "/data/a-hardlink.txt")
    assert a.ino == h.ino and a.nlink == h.nlink == 2
    assert (a.uid, a.gid) == (1234, 5678)
    assert a.mtime_ns == 1_600_000_000_123_456_789  # PAX mtime to the nanosecond
    assert a.xattrs == {"user.origin": b"lamina\x00\xff"}
    assert os.read(r.open_object(a.object), 100) == b"same content\n"
    assert r.lookup(lid, "/data/link").linkname == "../etc/passwd"
    assert r.lookup(lid, "/data/fifo").kind == "p"
    null = r.lookup(lid, "/data/null")
    assert null.kind == "c" and null.rdev == os.makedev(1, 3)
    assert r.lookup(lid, "/data/blk").rdev == os.makedev(7, 0)
    assert r.lookup(lid, "/data/" + "x" * 120 + "/" + "y" * 120 + "/deep.txt").size == 5
    names = {n for n, _ in r.children(lid, "/data")}
    assert {"a.txt", "a-hardlink.txt", "link", "fifo", "null", "blk", "big.bin", "x" * 120} == names
    lamina.assert_clean()


def test_identical_files_in_unrelated_images_are_stored_once(lamina, busybox_dir, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(busybox_dir / "bin/busybox", other / "renamed-busybox")
    lamina("import", busybox_dir, "-t", "a")
    st = open_store(str(lamina.root)).store
    before = {h for (h,) in st.db.execute("SELECT hash FROM objects")}
    files_before = lamina.objects()
    lamina("import", other, "-t", "b")
    added = {h for (h,) in st.db.execute("SELECT hash FROM objects")} - before
    skeleton = st.db.execute("SELECT tarsplit FROM layers ORDER BY id DESC LIMIT 1").fetchone()[0]
    assert added == {skeleton}  # only the new layer's tar skeleton; the 2 MB binary is shared
    assert lamina.objects() == files_before  # and that skeleton is small enough to live in the index
    df = json.loads(lamina("df", "--format", "json").stdout)
    bb = os.path.getsize(busybox_dir / "bin/busybox")
    per = {v["tags"][0]: v for v in df["per_image"].values()}
    assert per["b:latest"]["shared_bytes"] == bb
    assert per["a:latest"]["shared_bytes"] == bb
    assert per["a:latest"]["size_bytes"] == per["a:latest"]["shared_bytes"] + per["a:latest"]["unique_bytes"]
    assert df["content_bytes"] < df["layers_bytes"]


def test_repeated_contents_within_one_import_are_stored_once(lamina, tmp_path):
    """The same small (inlined), mid-size and large contents several times in one layer."""
    small, mid, big = b"same\n", os.urandom(100_000), os.urandom(3 << 20)
    members = [(ti(f"{kind}{i}"), data) for i in range(3) for kind, data in (("s", small), ("m", mid), ("b", big))]
    (tmp_path / "rep.tar").write_bytes(make_tar(members))
    lamina("import", tmp_path / "rep.tar", "-t", "rep")
    st = open_store(str(lamina.root)).store
    sizes = sorted(n for (n,) in st.db.execute("SELECT size FROM objects"))
    assert [n for n in sizes if n in (len(small), len(mid), len(big))] == [len(small), len(mid), len(big)]
    lamina.assert_clean()


def test_umoci_layout_dir_and_tar(lamina, busybox_dir, tmp_path):
    layout, bundle = tmp_path / "layout", tmp_path / "bundle"
    run("umoci", "init", "--layout", str(layout))
    run("umoci", "new", "--image", f"{layout}:v1")
    run("umoci", "unpack", "--image", f"{layout}:v1", str(bundle))
    shutil.copytree(busybox_dir, bundle / "rootfs", symlinks=True, dirs_exist_ok=True)
    run("umoci", "repack", "--image", f"{layout}:v1", str(bundle))
    shutil.rmtree(bundle)
    run("umoci", "unpack", "--image", f"{layout}:v1", str(bundle))
    (bundle / "rootfs/etc/passwd").unlink()
    (bundle / "rootfs/etc/hostname").write_text("second\n")
    run("umoci", "repack", "--image", f"{layout}:v1", str(bundle))
    run("umoci", "config", "--image", f"{layout}:v1", "--config.cmd", "/bin/sh", "--config.workingdir", "/tmp")
    lamina("import", layout, "-t", "umoci:dir")
    run("tar", "-C", str(layout), "-cf", str(tmp_path / "layout.tar"), ".")
    lamina("import", tmp_path / "layout.tar", "-t", "umoci:tar")
    info = json.loads(lamina("inspect", "umoci:dir").stdout)[0]
    assert info["Config"]["Cmd"] == ["/bin/sh"] and info["Config"]["WorkingDir"] == "/tmp"
    assert len(info["RootFS"]["Layers"]) == 2
    assert json.loads(lamina("inspect", "umoci:tar").stdout)[0]["Id"] == info["Id"]
    s = open_store(str(lamina.root))
    top = s.image("umoci:dir").layer_ids[1]
    assert s.reader().lookup(top, "/etc/passwd").kind == "w"  # umoci's .wh.passwd is a whiteout entry
    # our export goes back through umoci: it unpacks it and finds the change
    lamina("save", "umoci:dir", "-o", tmp_path / "back.tar")
    back = tmp_path / "back"
    back.mkdir()
    run("tar", "-C", str(back), "-xf", str(tmp_path / "back.tar"))
    run("umoci", "unpack", "--image", f"{back}:umoci:dir", str(tmp_path / "b2"))
    assert (tmp_path / "b2/rootfs/etc/hostname").read_text() == "second\n"
    assert not (tmp_path / "b2/rootfs/etc/passwd").exists()
    lamina.assert_clean()


def test_skopeo_reads_our_archives_and_we_read_skopeos(lamina, busybox_dir, tmp_path):
    lamina("import", busybox_dir, "-t", "bb", "-c", 'CMD ["/bin/sh"]')
    image_id = lamina("images", "-q", "--no-trunc").stdout.split()[0]
    for fmt, transport in (("oci", "oci-archive"), ("docker", "docker-archive")):
        out = tmp_path / f"bb-{fmt}.tar"
        lamina("save", "bb", "-o", out, "--format", fmt)
        info = json.loads(run("skopeo", "inspect", "--config", f"{transport}:{out}").stdout)
        assert info["config"]["Cmd"] == ["/bin/sh"]
    # skopeo converts to gzip and zstd OCI layouts and to a docker archive; all import to the same image id
    run("skopeo", "copy", f"oci-archive:{tmp_path}/bb-oci.tar", f"oci:{tmp_path}/gz:bb")
    run("skopeo", "copy", "--dest-compress-format", "zstd", "--dest-compress",
        f"oci-archive:{tmp_path}/bb-oci.tar", f"oci:{tmp_path}/zst:bb")
    run("skopeo", "copy", f"oci-archive:{tmp_path}/bb-oci.tar", f"docker-archive:{tmp_path}/d.tar:bb:skopeo")
    for src in ("gz", "zst", "d.tar"):
        assert lamina("import", tmp_path / src).stdout.strip() == image_id
    assert "Loaded image: bb:skopeo" in lamina("load", "-i", tmp_path / "d.tar").stdout
    # skopeo names it docker.io/library/bb:skopeo, which docker (and lamina) show in familiar form
    assert ("bb", "skopeo") in {(r["repository"], r["tag"])
                                for r in json.loads(lamina("images", "--format", "json").stdout)}
    lamina.assert_clean()


PODMAN = ["podman", "--storage-driver", "vfs"]


@pytest.fixture
def podman(tmp_path):
    import tempfile
    root = tmp_path / "podman-root"
    runroot = tempfile.mkdtemp(prefix="lp-", dir="/tmp")  # podman refuses a runroot longer than 50 characters
    try:
        yield [*PODMAN, "--root", str(root), "--runroot", runroot]
    finally:
        subprocess.run([*PODMAN, "--root", str(root), "--runroot", runroot, "system", "reset", "-f"],
                       capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(runroot, ignore_errors=True)


def test_podman_archives_both_ways(lamina, busybox_dir, tmp_path, podman):
    run("tar", "-C", str(busybox_dir), "-cf", str(tmp_path / "bb.tar"), ".")
    run(*podman, "import", "-q", str(tmp_path / "bb.tar"), "localhost/pbb:1")
    for fmt in ("oci-archive", "docker-archive"):
        run(*podman, "save", "-q", "--format", fmt, "-o", str(tmp_path / f"{fmt}.tar"), "localhost/pbb:1")
        lamina("import", tmp_path / f"{fmt}.tar")
    assert [r["tag"] for r in json.loads(lamina("images", "--format", "json").stdout)] == ["1"]
    lamina("tag", "pbb:1", "localhost/from-lamina:2")  # podman's localhost/ short-name rule
    for fmt in ("oci", "docker"):
        lamina("save", "localhost/from-lamina:2", "-o", tmp_path / f"l-{fmt}.tar", "--format", fmt)
        out = run(*podman, "load", "-i", str(tmp_path / f"l-{fmt}.tar")).stdout
        assert "Loaded image" in out
    imgs = run(*podman, "images", "--format", "{{.Repository}}:{{.Tag}} {{.ID}}").stdout
    assert "localhost/from-lamina:2" in imgs
    lamina.assert_clean()


def test_round_trip_preserves_image_id_and_every_layer_byte(lamina, rich_dir, tmp_path):
    raw = gnu_tar(rich_dir, tmp_path / "rich.tar", "--format=gnu")  # GNU long names, not PAX
    lamina("import", tmp_path / "rich.tar", "-t", "rich")
    for fmt in ("oci", "docker"):
        out = tmp_path / f"{fmt}.tar"
        lamina("save", "rich", "-o", out, "--format", fmt)
        assert layer_of(str(out), sha256(raw)) == raw
        from tests.store.conftest import Lamina
        other = Lamina(tmp_path / f"store-{fmt}")
        assert other("import", out).stdout == lamina("images", "-q", "--no-trunc").stdout.split()[0] + "\n"
        other.assert_clean()


def test_whiteouts_and_opaque_dirs(lamina, tmp_path):
    tar = make_tar([
        (ti("etc", tarfile.DIRTYPE), None),
        (ti("etc/.wh.passwd"), b""),
        (ti("var", tarfile.DIRTYPE), None),
        (ti("var/.wh..wh..opq"), b""),
        (ti("var/new"), b"x"),
        (ti("usr/.wh.lib"), b""),
        (ti("usr/lib/fresh"), b"y"),  # a whiteout and a directory of the same name: an opaque directory
    ])
    (tmp_path / "w.tar").write_bytes(tar)
    lamina("import", tmp_path / "w.tar", "-t", "w")
    s = open_store(str(lamina.root))
    r, lid = s.reader(), s.image("w").layer_ids[0]
    assert r.lookup(lid, "/etc/passwd").kind == "w"
    assert r.lookup(lid, "/var").opaque and not r.lookup(lid, "/etc").opaque
    assert r.lookup(lid, "/usr/lib").opaque and r.lookup(lid, "/usr/lib").kind == "d"
    assert r.lookup(lid, "/usr").kind == "d"  # implied parent
    assert {n for n, _ in r.children(lid, "/var")} == {"new"}
    lamina.assert_clean()


def test_docker_25_save_archive(lamina, busybox_dir, tmp_path):
    """Docker >= 25 writes an OCI layout plus a legacy manifest.json whose RepoTags name the image."""
    lamina("import", busybox_dir, "-t", "bb")
    image_id = lamina("images", "-q", "--no-trunc").stdout.split()[0]
    lamina("save", "bb", "-o", tmp_path / "oci.tar")
    lay = tmp_path / "lay"
    run("skopeo", "copy", f"oci-archive:{tmp_path}/oci.tar", f"oci:{lay}")  # no ref.name annotation
    index = json.loads((lay / "index.json").read_text())
    man = json.loads((lay / "blobs/sha256" / index["manifests"][0]["digest"].split(":")[1]).read_text())
    (lay / "manifest.json").write_text(json.dumps([{
        "Config": "blobs/sha256/" + man["config"]["digest"].split(":")[1],
        "RepoTags": ["example.org/team/bb:25"],
        "Layers": ["blobs/sha256/" + d["digest"].split(":")[1] for d in man["layers"]]}]))
    run("tar", "-C", str(lay), "-cf", str(tmp_path / "docker25.tar"), ".")
    other = tmp_path / "other-store"
    from tests.store.conftest import Lamina
    fresh = Lamina(other)
    assert fresh("import", tmp_path / "docker25.tar").stdout.strip() == image_id
    rows = json.loads(fresh("images", "--format", "json").stdout)
    assert [(r["repository"], r["tag"]) for r in rows] == [("example.org/team/bb", "25")]
    fresh.assert_clean()


def test_import_from_stdin(lamina, tmp_path):
    tar = make_tar([(ti("hello"), b"from a pipe\n")])
    (tmp_path / "p.tar").write_bytes(tar)
    with open(tmp_path / "p.tar", "rb") as f:
        assert lamina("import", "-", "-t", "piped", stdin=f).stdout.startswith("sha256:")
    info = json.loads(lamina("inspect", "piped").stdout)[0]
    assert info["RootFS"]["Layers"] == [sha256(tar)]
    lamina.assert_clean()
