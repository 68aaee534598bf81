"""images, tag, rmi, history, df, gc and fsck, checked against figures computed independently."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile

from store.reader import open_store
from tests.store.conftest import make_tar, ti


def test_images_tag_rmi_like_docker(lamina, busybox_dir):
    image_id = lamina("import", busybox_dir, "-t", "bb").stdout.strip()
    lamina("tag", "bb", "registry.example:5000/team/bb:v1")
    rows = json.loads(lamina("images", "--format", "json").stdout)
    assert {(r["repository"], r["tag"]) for r in rows} == {("bb", "latest"), ("registry.example:5000/team/bb", "v1")}
    assert lamina("images", "-q").stdout.split() == [image_id[7:19]]
    table = lamina("images").stdout.splitlines()
    assert table[0].split() == ["REPOSITORY", "TAG", "IMAGE", "ID", "CREATED", "SIZE"]
    # removing one of two tags only untags; the last one deletes the image
    assert lamina("rmi", "bb").stdout.strip() == "Untagged: bb:latest"
    out = lamina("rmi", "registry.example:5000/team/bb:v1").stdout
    assert f"Deleted: {image_id}" in out
    assert json.loads(lamina("images", "--format", "json").stdout) == []
    r = lamina("gc").stdout
    assert "1 layers" in r
    assert lamina.objects() == set()
    lamina.assert_clean()


def test_rmi_by_short_id_with_two_tags_needs_force(lamina, busybox_dir):
    image_id = lamina("import", busybox_dir, "-t", "a").stdout.strip()
    lamina("tag", "a", "b")
    r = lamina("rmi", image_id[7:19], check=False)
    assert r.returncode == 1 and "multiple repositories" in r.stderr
    lamina("rmi", "-f", image_id[7:19])
    assert lamina("images", "-q").stdout == ""


def test_history_shows_layers_and_empty_instructions(lamina, tmp_path):
    """A docker-save archive built by hand: two layers and an ENV instruction with no layer."""
    l1 = make_tar([(ti("a"), b"x" * 1000)])
    l2 = make_tar([(ti("b"), b"y" * 10)])
    d1, d2 = ("sha256:" + hashlib.sha256(x).hexdigest() for x in (l1, l2))
    cfg = {"architecture": "amd64", "os": "linux", "config": {"Env": ["A=1"]},
           "rootfs": {"type": "layers", "diff_ids": [d1, d2]},
           "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "ADD a /"},
                       {"created": "2024-01-02T00:00:00Z", "created_by": "ENV A=1", "empty_layer": True},
                       {"created": "2024-01-03T00:00:00Z", "created_by": "ADD b /"}]}
    cfg_bytes = json.dumps(cfg).encode()
    cfg_name = hashlib.sha256(cfg_bytes).hexdigest() + ".json"
    manifest = [{"Config": cfg_name, "RepoTags": ["hand:made"], "Layers": ["l1/layer.tar", "l2/layer.tar"]}]
    members = [(ti(cfg_name), cfg_bytes), (ti("l1/layer.tar"), l1), (ti("l2/layer.tar"), l2),
               (ti("manifest.json"), json.dumps(manifest).encode())]
    (tmp_path / "save.tar").write_bytes(make_tar(members))
    lamina("import", tmp_path / "save.tar")
    rows = json.loads(lamina("history", "hand:made", "--format", "json").stdout)
    assert [(r["created_by"], r["size"]) for r in rows] == [("ADD b /", 10), ("ENV A=1", 0), ("ADD a /", 1000)]
    text = lamina("history", "hand:made").stdout.splitlines()
    assert text[0].split()[:2] == ["IMAGE", "CREATED"] and "ENV A=1" in text[2] and "0B" in text[2]
    info = json.loads(lamina("inspect", "hand:made").stdout)[0]
    assert info["RootFS"]["Layers"] == [d1, d2] and info["Config"]["Env"] == ["A=1"]
    assert info["Id"] == "sha256:" + cfg_name[:-5]


def test_df_figures_match_an_independent_count(lamina, busybox_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(busybox_dir, a, symlinks=True)
    shutil.copytree(busybox_dir, b, symlinks=True)
    (a / "only-a").write_bytes(os.urandom(5000))
    (b / "only-b").write_bytes(os.urandom(7000))
    lamina("import", a, "-t", "a")
    lamina("import", b, "-t", "b")
    df = json.loads(lamina("df", "--format", "json").stdout)
    st = open_store(str(lamina.root)).store
    sizes = {h: n for h, n in st.db.execute("SELECT hash, size FROM objects")}
    skels = {h for (h,) in st.db.execute("SELECT tarsplit FROM layers")}
    assert df["content_bytes"] == sum(sizes.values())
    per = {v["tags"][0]: v for v in df["per_image"].values()}
    bb = os.path.getsize(busybox_dir / "bin/busybox")
    # shared: the busybox binary and every small file both trees hold (passwd, group...)
    assert per["a:latest"]["shared_bytes"] == per["b:latest"]["shared_bytes"] >= bb
    # unique = its own file + its own tar skeleton (the two trees' skeletons differ by one name)
    assert per["a:latest"]["unique_bytes"] - 5000 in {sizes[h] for h in skels}
    assert per["b:latest"]["unique_bytes"] - 7000 in {sizes[h] for h in skels}
    assert df["layers_bytes"] == df["images_bytes"] == sum(
        n for (n,) in st.db.execute("SELECT size FROM layers"))
    assert df["dedup_ratio"] > 1.9  # two near-identical images in little more than one's bytes
    text = lamina("df").stdout
    assert "Dedup ratio" in text and "SHARED SIZE" in text


def test_fsck_finds_and_repairs_damage(lamina, busybox_dir, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    (small / "f").write_text("precious\n")  # inlined in the index
    (small / "big").write_bytes(os.urandom(8192))  # a file under objects/
    lamina("import", small, "-t", "small")
    lamina("import", busybox_dir, "-t", "bb")
    st = open_store(str(lamina.root))
    lid = st.image("small").layer_ids[0]
    inline, filed = (st.reader().lookup(lid, p).object for p in ("/f", "/big"))
    path = st.reader().object_path(filed)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.write(b"PRECIOUS")
    with st.store.write() as db:
        db.execute("UPDATE objects SET data=? WHERE hash=?", (b"PRECIOUS\n", inline))
    stray = lamina.root / "objects" / "ff" / ("0" * 30)
    stray.parent.mkdir(exist_ok=True)
    stray.write_bytes(b"junk")
    r = lamina("fsck", check=False)
    assert r.returncode == 1
    assert f"object {filed}" in r.stdout and f"object {inline}" in r.stdout and "stray file" in r.stdout
    r = lamina("fsck", "--repair")
    assert "removed damaged image" in r.stdout
    lamina.assert_clean()
    assert [x["repository"] for x in json.loads(lamina("images", "--format", "json").stdout)] == ["bb"]
    lamina("import", small, "-t", "small")  # the damaged image imports again, whole
    lamina.assert_clean()


def test_layer_already_stored_is_not_stored_again(lamina, busybox_dir, tmp_path):
    lamina("import", busybox_dir, "-t", "one")
    lamina("save", "one", "-o", tmp_path / "one.tar")
    before = lamina.objects()
    lamina("import", tmp_path / "one.tar", "-t", "two")
    assert lamina.objects() == before
    st = open_store(str(lamina.root)).store
    assert st.db.execute("SELECT count(*) FROM layers").fetchone()[0] == 1


def test_hardlink_groups_and_implied_dirs_from_a_hand_made_tar(lamina, tmp_path):
    members = [(ti("a/b/file"), b"data"), (ti("a/b/link1", tarfile.LNKTYPE, linkname="a/b/file"), None),
               (ti("c/link2", tarfile.LNKTYPE, linkname="a/b/link1"), None)]
    (tmp_path / "h.tar").write_bytes(make_tar(members))
    lamina("import", tmp_path / "h.tar", "-t", "h")
    s = open_store(str(lamina.root))
    r, lid = s.reader(), s.image("h").layer_ids[0]
    f, l1, l2 = (r.lookup(lid, p) for p in ("/a/b/file", "/a/b/link1", "/c/link2"))
    assert f.ino == l1.ino == l2.ino and f.nlink == 3 and l2.object == f.object
    assert r.lookup(lid, "/a").kind == "d" and r.lookup(lid, "/c").mode & 0o777 == 0o755


def test_holds_keep_images_from_rmi_and_gc(lamina, busybox_dir):
    from store.holds import hold, release
    from store.root import Store
    image_id = lamina("import", busybox_dir, "-t", "held").stdout.strip()
    st = Store(str(lamina.root))
    hold(st, "container:abc", image_id)
    r = lamina("rmi", "held", check=False)  # docker: the last tag of an image a container uses needs -f
    assert r.returncode == 1 and "in use by container:abc" in r.stderr
    r = lamina("rmi", "-f", "held")
    assert "Untagged: held:latest" in r.stdout and "Deleted" not in r.stdout
    lamina("gc")
    assert lamina("images", "-q", "--no-trunc").stdout.strip() == image_id  # dangling but held: kept
    before = lamina.objects()
    assert before
    release(st, "container:abc")
    assert "Removed 1 untagged images, 1 layers" in lamina("gc").stdout
    assert lamina.objects() == set()
    lamina.assert_clean()


def test_fsck_checks_hardlink_groups_and_holds(lamina, tmp_path):
    from store.holds import hold
    members = [(ti("f"), b"data"), (ti("g", tarfile.LNKTYPE, linkname="f"), None)]
    (tmp_path / "h.tar").write_bytes(make_tar(members))
    lamina("import", tmp_path / "h.tar", "-t", "h")
    st = open_store(str(lamina.root)).store
    hold(st, "container:gone", "sha256:" + "0" * 64)
    with st.write() as db:
        db.execute("UPDATE entries SET link_ino = 999999999 WHERE link_ino IS NOT NULL")
    r = lamina("fsck", check=False)
    assert r.returncode == 1
    assert "hardlinks refer to entries missing" in r.stdout and "hold container:gone" in r.stdout
    r = lamina("fsck", "--repair")
    assert "removed dangling hold container:gone" in r.stdout and "removed damaged layer" in r.stdout
    lamina.assert_clean()
