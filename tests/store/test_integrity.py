"""The store under damage and failure: gc keeps what every layer needs, a damaged or missing index is refused,
blobs are verified whatever the store already holds, a full disk leaves the store as it was."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import stat
import subprocess
import tarfile

import pytest

from store.errors import StoreError
from store.schema import SCHEMA_VERSION
from store.importer import commit_layer
from store.reader import open_store
from store.root import Store
from tests.conftest import BIN
from tests.store.conftest import Lamina, make_tar, sha256, ti
from unionfs.changes import changes, write_layer
from unionfs.storelayer import StoreLayer


def _kinds_tar() -> bytes:
    """A layer with every kind of entry, and no empty file (an empty file would keep the empty content alive)."""
    xattr = ti("x", pax_headers={"SCHILY.xattr.user.k": "v", "SCHILY.xattr.security.capability": "\x01\x00"})
    return make_tar([
        (ti("etc", tarfile.DIRTYPE), None),
        (ti("etc/passwd"), b"root:x:0:0::/root:/bin/sh\n"),
        (ti("etc/group"), b"root:x:0:\n"),
        (ti("etc/hard", tarfile.LNKTYPE, linkname="etc/passwd"), None),
        (ti("etc/sym", tarfile.SYMTYPE, linkname="passwd"), None),
        (ti("dev", tarfile.DIRTYPE), None),
        (ti("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3), None),
        (ti("dev/loop0", tarfile.BLKTYPE, devmajor=7, devminor=0), None),
        (ti("dev/fifo", tarfile.FIFOTYPE), None),
        (xattr, b"with xattrs\n"),
        (ti("var/lib/deep/" + "n" * 200), b"long name\n"),
        (ti("big"), os.urandom(8192)),
    ])


def _whiteouts_tar() -> bytes:
    """A layer on top of _kinds_tar: whiteouts, an opaque directory, aufs bookkeeping, a whiteout with content."""
    return make_tar([
        (ti("etc", tarfile.DIRTYPE), None),
        (ti("etc/.wh.group"), b""),
        (ti("var/lib/.wh..wh..opq"), b""),
        (ti("var/lib/fresh"), b"fresh\n"),
        (ti(".wh..wh.plnk", tarfile.DIRTYPE), None),
        (ti(".wh..wh.plnk/123.456"), b"aufs hardlink store\n"),
        (ti("dev/.wh.fifo"), b"a whiteout's content is kept in the tar too\n"),
    ])


def _check_saves(lamina: Lamina, tmp_path, ref: str) -> None:
    """`save` rebuilds every layer of REF to its DiffID, and the archive imports elsewhere to the same image."""
    info = json.loads(lamina("inspect", ref).stdout)[0]
    out = tmp_path / f"saved-{ref.replace(':', '-')}.tar"
    lamina("save", ref, "-o", out)
    with tarfile.open(out) as tf:
        blobs = {sha256(tf.extractfile(m).read()) for m in tf.getmembers() if m.isfile()}
    assert set(info["RootFS"]["Layers"]) <= blobs
    other = Lamina(tmp_path / f"other-{ref.replace(':', '-')}")
    assert other("import", out).stdout.strip() == info["Id"]
    other.assert_clean()


def test_gc_keeps_the_contents_of_whiteout_files(lamina, tmp_path):
    """#11.4: a whiteout file's content is named only by its layer's skeleton; gc deleted it (the layer could no
    longer be saved and fsck --repair dropped the image)."""
    (tmp_path / "kinds.tar").write_bytes(_kinds_tar())
    (tmp_path / "wh.tar").write_bytes(_whiteouts_tar())
    (tmp_path / "empty.tar").write_bytes(make_tar([(ti("empty"), b"")]))
    lamina("import", tmp_path / "kinds.tar", "-t", "kinds")
    lamina("import", tmp_path / "wh.tar", "-t", "wh")
    lamina("import", tmp_path / "empty.tar", "-t", "empty")  # an entry naming the empty content, then gone
    lamina("rmi", "empty")
    assert "and 0 layers" not in lamina("gc").stdout
    lamina.assert_clean()
    for ref in ("kinds", "wh"):
        _check_saves(lamina, tmp_path, ref)
    # Dropping the layer drops what it alone kept.
    lamina("rmi", "wh")
    lamina("gc")
    lamina.assert_clean()
    names = {h for (h,) in sqlite3.connect(lamina.root / "index.db").execute("SELECT object FROM skeleton_objects")}
    assert names == set()


def _commit_upper(root, parent: str, upper, created_by: str, tag: str) -> None:
    """An overlayfs upper directory over image `parent` committed as `lamina commit` does (runtime/commit.py)."""
    with open_store(str(root)) as rst, Store(str(root)) as st:
        img = rst.image(parent)
        chs = changes(str(upper), [StoreLayer(rst.reader(), lid) for lid in reversed(img.layer_ids)])
        commit_layer(st, img.id, lambda out: write_layer(chs, out), created_by, [tag])


def test_gc_after_a_commit_that_removed_a_lower_file(lamina, tmp_path):
    """#11.4 as found: rm of a lower file in a container, commit, gc, then the image could not be saved."""
    (tmp_path / "kinds.tar").write_bytes(_kinds_tar())
    lamina("import", tmp_path / "kinds.tar", "-t", "base")
    upper = tmp_path / "upper"
    (upper / "etc").mkdir(parents=True)
    os.mknod(upper / "etc/group", stat.S_IFCHR, 0)  # the upper's whiteout of a lower file
    (upper / "var/lib").mkdir(parents=True)
    os.setxattr(upper / "var/lib", "trusted.overlay.opaque", b"y")
    _commit_upper(lamina.root, "base", upper, "rm /etc/group", "committed:1")
    lamina("gc")
    lamina.assert_clean()
    _check_saves(lamina, tmp_path, "committed:1")


def test_schema_2_store_records_its_layers_skeleton_objects(lamina, tmp_path):
    """A store written before skeleton_objects existed gets them filled in when first opened."""
    (tmp_path / "wh.tar").write_bytes(_whiteouts_tar())
    lamina("import", tmp_path / "wh.tar", "-t", "wh")
    db = sqlite3.connect(lamina.root / "index.db", isolation_level=None)
    want = set(db.execute("SELECT object FROM skeleton_objects"))
    assert len(want) == 2  # the empty content and the whiteout with content
    db.execute("DROP TABLE skeleton_objects")
    db.execute("UPDATE meta SET value='2' WHERE key='schema_version'")
    db.close()
    lamina("gc")
    db = sqlite3.connect(lamina.root / "index.db")
    assert set(db.execute("SELECT object FROM skeleton_objects")) == want
    assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == (str(SCHEMA_VERSION),)
    lamina.assert_clean()
    _check_saves(lamina, tmp_path, "wh")


def test_fsck_reports_and_records_unrecorded_skeleton_objects(lamina, tmp_path):
    (tmp_path / "wh.tar").write_bytes(_whiteouts_tar())
    lamina("import", tmp_path / "wh.tar", "-t", "wh")
    sqlite3.connect(lamina.root / "index.db", isolation_level=None).execute("DELETE FROM skeleton_objects")
    r = lamina("fsck", check=False)
    assert r.returncode == 1 and "tar skeleton uses 2 objects the index does not record" in r.stdout
    assert "recorded 2 objects" in lamina("fsck", "--repair").stdout
    lamina("gc")
    lamina.assert_clean()
    _check_saves(lamina, tmp_path, "wh")


# -- a lost, damaged or read-only index ---------------------------------------------------------------------------

_EVERY_COMMAND = (["images"], ["inspect", "kinds"], ["history", "kinds"], ["tag", "kinds", "other"], ["rmi", "kinds"],
                  ["df"], ["gc"], ["fsck"], ["save", "kinds", "-o", "/dev/null"], ["ps", "-a"],
                  ["run", "--rm", "kinds", "/x"])


def _one_line_error(r, *words: str) -> None:
    assert r.returncode != 0, r.stdout
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lamina: "), r.stderr
    for w in words:
        assert w in lines[0], r.stderr


def _seed(lamina, tmp_path) -> set[str]:
    (tmp_path / "kinds.tar").write_bytes(_kinds_tar())
    lamina("import", tmp_path / "kinds.tar", "-t", "kinds")
    objects = lamina.objects()
    assert objects  # the 8 KiB file is an object file, not inlined
    return objects


def test_an_empty_or_missing_index_beside_objects_is_refused(lamina, tmp_path):
    """#11.5: a zero-byte index.db was taken for a new store, and gc then deleted every object."""
    objects = _seed(lamina, tmp_path)
    db = lamina.root / "index.db"
    for state in ("empty", "missing"):
        for sfx in ("-wal", "-shm"):
            (lamina.root / f"index.db{sfx}").unlink(missing_ok=True)
        if state == "empty":
            db.write_bytes(b"")
        else:
            db.unlink()
        for cmd in _EVERY_COMMAND:
            r = lamina(*cmd, check=False)
            if cmd[0] in ("ps", "run"):  # runtime commands that do not open the store for this
                continue
            _one_line_error(r, f"index.db is {state} but objects/ holds contents")
        assert lamina.objects() == objects
        assert (db.stat().st_size == 0) if state == "empty" else not db.exists()


def _damage(db, how: str) -> None:
    with sqlite3.connect(db) as c:
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        pages = c.execute("PRAGMA page_count").fetchone()[0]
        psize = c.execute("PRAGMA page_size").fetchone()[0]
    if how == "truncated":
        os.truncate(db, (pages // 2) * psize + 100)
    else:  # every page past the first few overwritten: b-tree pages of every table and index
        with open(db, "r+b") as f:
            for p in range(3, pages):
                f.seek(p * psize)
                f.write(b"\x55" * psize)


def test_a_damaged_index_is_one_line_for_every_command(lamina, tmp_path):
    """#11.7: damaged or truncated index pages: one-line errors, fsck included; gc deletes nothing."""
    objects = _seed(lamina, tmp_path)
    good = (lamina.root / "index.db").read_bytes()
    for how in ("truncated", "overwritten"):
        (lamina.root / "index.db").write_bytes(good)
        _damage(lamina.root / "index.db", how)
        for cmd in _EVERY_COMMAND:
            r = lamina(*cmd, check=False)
            assert "Traceback" not in r.stderr, (cmd, r.stderr)
            if cmd[0] in ("images", "df", "gc", "fsck"):
                assert r.returncode != 0, (cmd, r.stdout)
                out = r.stdout.splitlines() + r.stderr.splitlines()
                assert any("is damaged" in line for line in out), (cmd, out)
                if cmd[0] != "fsck":
                    _one_line_error(r, "is damaged")
        assert lamina.objects() == objects


def test_a_read_only_index_gives_one_line_errors(lamina, tmp_path):
    """#11.7: an index the user cannot write (here immutable): import, tag, rmi, mount answer in one line."""
    _seed(lamina, tmp_path)
    db = lamina.root / "index.db"
    if subprocess.run(["chattr", "+i", str(db)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported here")
    try:
        (tmp_path / "mnt").mkdir()
        for cmd in (["import", tmp_path / "kinds.tar", "-t", "again"], ["tag", "kinds", "other"], ["rmi", "kinds"],
                    ["mount", "kinds", tmp_path / "mnt"]):
            _one_line_error(lamina(*cmd, check=False), "cannot be written")
        assert lamina("images").stdout.count("\n") == 2
    finally:
        subprocess.run(["umount", str(tmp_path / "mnt")], capture_output=True)
        subprocess.run(["chattr", "-i", str(db)], check=True)
    lamina.assert_clean()


def test_tag_refuses_a_domain_of_dots(lamina, tmp_path):
    """#11.7: `tag bb ../x` was taken as domain `..`; refused as `a/../b` already is."""
    _seed(lamina, tmp_path)
    for bad in ("../x", "./x", "a-/x", "a./x", "a/../b"):
        _one_line_error(lamina("tag", "kinds", bad, check=False), "invalid reference format")
    lamina("tag", "kinds", "registry-1.example.com:5000/team/x:1")


# -- blobs of layers the store already holds ------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["oci", "docker"])
@pytest.mark.parametrize("damage", ["corrupt", "empty", "missing"])
def test_broken_blobs_are_refused_even_when_their_layers_are_stored(lamina, tmp_path, fmt, damage):
    """#12.5: a layer already in the store (by DiffID) was never read again, so a corrupt, empty or missing blob
    was accepted (exit 0) where a fresh store refuses it."""
    _seed(lamina, tmp_path)
    lamina("save", "kinds", "-o", tmp_path / "saved.tar", "--format", fmt)
    d = tmp_path / "unpacked"
    with tarfile.open(tmp_path / "saved.tar") as tf:
        tf.extractall(d)  # noqa: S202 - our own archive
    layer_diff_id = json.loads(lamina("inspect", "kinds").stdout)[0]["RootFS"]["Layers"][0]
    blobs = [p for p in d.rglob("*") if p.is_file() and sha256(p.read_bytes()) == layer_diff_id]
    assert blobs, "the saved layer blob"
    for blob in blobs:
        if damage == "corrupt":
            data = bytearray(blob.read_bytes())
            data[len(data) // 2] ^= 0xFF
            blob.write_bytes(bytes(data))
        elif damage == "empty":
            blob.write_bytes(b"")
        else:
            blob.unlink()
    before = (lamina.objects(), lamina("images", "--format", "json").stdout)
    r = lamina("import", d, "-t", "again", check=False)
    _one_line_error(r)
    assert (lamina.objects(), lamina("images", "--format", "json").stdout) == before
    lamina.assert_clean()


# -- smaller -----------------------------------------------------------------------------------------------------

def test_a_closed_pipe_ends_the_command_quietly(lamina, tmp_path):
    """#12.13: `lamina images | head -1` printed `lamina: Broken pipe` and exited 1; now as docker and coreutils:
    killed by SIGPIPE, nothing on stderr. The read end is closed before the command writes, so it is certain."""
    _seed(lamina, tmp_path)
    for cmd in (["images"], ["history", "kinds"], ["ps", "-a"], ["inspect", "kinds"]):
        r_fd, w_fd = os.pipe()
        os.close(r_fd)
        try:
            r = subprocess.run([str(BIN / "lamina"), *cmd], stdout=w_fd, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, LAMINA_ROOT=str(lamina.root)), timeout=300)
        finally:
            os.close(w_fd)
        assert r.returncode == -signal.SIGPIPE and r.stderr == "", (cmd, r.returncode, r.stderr)


def test_load_names_the_archives_own_tags(lamina, tmp_path):
    """#12.13: load printed every tag the store had for an image already stored, not the archive's."""
    _seed(lamina, tmp_path)
    lamina("tag", "kinds", "also:1")
    lamina("save", "also:1", "-o", tmp_path / "one.tar")
    lamina("tag", "kinds", "third:2")
    assert lamina("load", "-i", tmp_path / "one.tar").stdout == "Loaded image: also:1\n"
    image_id = json.loads(lamina("inspect", "kinds").stdout)[0]["Id"]
    lamina("save", image_id, "-o", tmp_path / "by-id.tar")  # no tag in the archive: named by id, as docker
    assert lamina("load", "-i", tmp_path / "by-id.tar").stdout == f"Loaded image ID: {image_id}\n"


def test_created_reads_as_docker_writes_it():
    """#12.13: go-units' HumanDuration + ' ago', which docker's CREATED column prints: its wording and its
    thresholds, and a date in the future (the clock behind the image's) as 'Less than a second ago'."""
    import datetime as dt

    from store.cli import ago
    now = dt.datetime(2026, 6, 1, tzinfo=dt.timezone.utc)
    cases = {-3600: "Less than a second ago", 0.5: "Less than a second ago", 1: "1 second ago",
             59: "59 seconds ago", 90: "About a minute ago", 3599: "59 minutes ago", 3600: "About an hour ago",
             5400: "2 hours ago", 47 * 3600: "47 hours ago", 10 * 86400: "10 days ago", 20 * 86400: "2 weeks ago",
             59 * 86400: "8 weeks ago", 61 * 86400: "2 months ago", 3 * 365 * 86400: "3 years ago"}
    for seconds, want in cases.items():
        created = (now - dt.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        assert ago(created, now) == want, (seconds, ago(created, now), want)


# -- a full disk -----------------------------------------------------------------------------------------------------

@pytest.fixture
def small_fs(tmp_path):
    """An 8 MiB tmpfs: the store root lives there, so a disk runs full for real."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def _fill(mnt, leave: int) -> None:
    """Leaves `leave` bytes free on mnt's filesystem (a filler file takes the rest)."""
    filler = mnt / "filler"
    filler.unlink(missing_ok=True)
    st = os.statvfs(mnt)
    want = st.f_bavail * st.f_frsize - leave
    if want > 0:
        with open(filler, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, want)


def test_a_full_disk_at_any_step_leaves_the_store_as_it_was(small_fs, tmp_path):
    """#11.6: out of space while staging, publishing or committing the index: `lamina: no space left on ...`,
    the store as before (no stray object for fsck to find, no staging left), never a traceback (SQLite's own
    rollback used to be followed by ours, 'cannot rollback - no transaction is active')."""
    lamina = Lamina(small_fs / "store")
    (tmp_path / "kinds.tar").write_bytes(_kinds_tar())
    lamina("import", tmp_path / "kinds.tar", "-t", "kinds")
    members = [(ti(f"small/{i}"), os.urandom(3000)) for i in range(300)]  # inlined: index pages
    members += [(ti(f"big/{i}"), os.urandom(100_000)) for i in range(6)]  # object files
    (tmp_path / "new.tar").write_bytes(make_tar(members))
    before = (lamina.objects(), lamina("images", "--format", "json").stdout)
    where = set()
    for leave in range(0, 7_000_000, 200_000):
        _fill(small_fs, leave)
        r = lamina("import", tmp_path / "new.tar", "-t", "new", check=False)
        if r.returncode == 0:
            break
        _one_line_error(r, f"no space left on {lamina.root}")
        where.add("index" if "index.db" in r.stderr else "files")
        (small_fs / "filler").unlink()
        assert (lamina.objects(), lamina("images", "--format", "json").stdout) == before, leave
        assert not os.listdir(lamina.root / "tmp")
        lamina.assert_clean()
    else:
        raise AssertionError("the import never fitted")
    assert where == {"index", "files"}  # both kinds of failure were met on the way
    lamina.assert_clean()
    # `lamina commit` goes the same way: a container's upper made into a layer on a full disk.
    before = (lamina.objects(), lamina("images", "--format", "json").stdout)
    base_id = json.loads(lamina("inspect", "kinds").stdout)[0]["Id"]
    upper = tmp_path / "upper"
    (upper / "etc").mkdir(parents=True)
    (upper / "etc/new").write_bytes(os.urandom(300_000))
    for leave in (0, 200_000):
        _fill(small_fs, leave)
        with pytest.raises(StoreError, match=f"no space left on {lamina.root}"):
            _commit_upper(lamina.root, base_id, upper, "a commit on a full disk", "full:1")
        (small_fs / "filler").unlink()
        assert (lamina.objects(), lamina("images", "--format", "json").stdout) == before, leave
        assert not os.listdir(lamina.root / "tmp")
    lamina.assert_clean()
