"""`lamina mount` over store layers: same tree as the directory layers it was imported from, copy-up from objects,
EIO for a lost object, and recovery from a killed daemon with `lamina umount`."""
from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from fsharness import BIN, docker_archive, is_mounted, lamina, lamina_mount, snapshot


@pytest.fixture
def store_image(layout, scratch):
    root = scratch / "store"
    lamina(root, "import", docker_archive(layout["lowers"], scratch / "img.tar", "ufs:test"))
    return root, "ufs:test"


def mount_store(root: Path, image: str, mnt: Path, *extra) -> None:
    lamina(root, "mount", image, mnt, *extra)
    assert is_mounted(mnt)


def test_store_mount_matches_directory_layers(layout, scratch, store_image):
    root, image = store_image
    (scratch / "dm").mkdir()
    with lamina_mount(layout["lowers"], scratch / "dm") as dm:
        expected = snapshot(dm, dir_nlink=False)
    mnt = layout["mnt"]
    mount_store(root, image, mnt, "--read-only")
    try:
        assert snapshot(mnt, dir_nlink=False, check_ino=True) == expected
        with pytest.raises(OSError) as e:
            (mnt / "new").write_text("x")
        assert e.value.errno == errno.EROFS
    finally:
        lamina(root, "umount", mnt)
    assert not is_mounted(mnt)


def test_store_mount_with_upper_copy_up(layout, store_image):
    root, image = store_image
    mnt, up = layout["mnt"], layout["upper"]
    mount_store(root, image, mnt, "--upper", up, "--work", layout["work"])
    try:
        ino = os.stat(mnt / "d" / "x").st_ino
        # a reader opened before the copy-up (a small file, served from the index's bytes) reads the copy after it
        r = os.open(mnt / "d" / "x", os.O_RDONLY)
        try:
            assert os.pread(r, 100, 0) == b"x from l2\n"
            with open(mnt / "d" / "x", "a") as f:
                f.write("appended\n")
            assert os.pread(r, 100, 0) == b"x from l2\nappended\n"
        finally:
            os.close(r)
        assert (up / "d" / "x").read_text() == "x from l2\nappended\n"
        assert os.stat(mnt / "d" / "x").st_ino == ino
        os.chmod(mnt / "p", 0o644)
        assert os.getxattr(up / "p", "user.k") == b"v" and stat.S_IMODE(os.stat(up / "p").st_mode) == 0o644
        os.unlink(mnt / "a")
        st = os.lstat(up / "a")
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
        os.rename(mnt / "d", mnt / "d2")
        assert sorted(os.listdir(mnt / "d2")) == ["sub", "v", "w", "x", "y"]
        view = snapshot(mnt, dir_nlink=False, check_ino=True)
    finally:
        lamina(root, "umount", mnt)
    mount_store(root, image, mnt, "--upper", up, "--work", layout["work"])
    try:
        assert snapshot(mnt, dir_nlink=False) == view
        assert os.stat(mnt / "d2" / "x").st_ino == ino
    finally:
        lamina(root, "umount", mnt)


def test_lost_or_damaged_object_gives_eio_for_that_file_only(layout, scratch, store_image):
    from store.reader import open_store
    root, image = store_image
    st = open_store(str(root))
    img = st.image(image)
    r = st.reader()
    entry = next(e for lid in img.layer_ids if (e := r.lookup(lid, "/d/x")) is not None)
    # Lose the object, wherever it lives: a file under objects/, or (up to 4 KiB) inlined in the index.
    if os.path.exists(r.object_path(entry.object)):
        os.unlink(r.object_path(entry.object))
    with st.store.write() as db:
        db.execute("UPDATE objects SET data=NULL WHERE hash=?", (entry.object,))
    # Damage another: /b (5001 bytes, file-backed) gets a tail its entry does not account for; so does the
    # inlined content of /d/sub/z.
    damaged = next(e for lid in reversed(img.layer_ids) if (e := r.lookup(lid, "/b")) is not None)
    with open(r.object_path(damaged.object), "ab") as f:
        f.write(b"garbage")
    small = next(e for lid in reversed(img.layer_ids) if (e := r.lookup(lid, "/d/sub/z")) is not None)
    with st.store.write() as db:
        db.execute("UPDATE objects SET data=? WHERE hash=?", (b"z\n\0", small.object))
    log = scratch / "fs.log"
    mnt = layout["mnt"]
    mount_store(root, image, mnt, "--read-only", "--log", log)
    try:
        with pytest.raises(OSError) as e:
            (mnt / "d" / "x").read_bytes()
        assert e.value.errno == errno.EIO
        with pytest.raises(OSError) as e:
            (mnt / "b").read_bytes()
        assert e.value.errno == errno.EIO
        with pytest.raises(OSError) as e:
            (mnt / "d" / "sub" / "z").read_bytes()
        assert e.value.errno == errno.EIO
        assert (mnt / "d" / "y").read_text() == "y from l1\n"
        assert (mnt / "c").read_text() == "top c\n"
    finally:
        lamina(root, "umount", mnt)
    text = log.read_text()
    assert "/d/x" in text and "missing" in text
    assert "/b" in text and "corrupt" in text
    assert "/d/sub/z" in text


def test_store_directory_link_counts_as_the_source_directories(layout, store_image):
    """A store directory's st_nlink is 2 plus its subdirectories, counted in SQLite before it is listed and from
    its entries after: both agree with the directory imported (where no whiteout or opaque marker hides one)."""
    from store.reader import open_store
    from unionfs.storelayer import StoreLayer
    root, image = store_image
    st = open_store(str(root))
    ids = st.image(image).layer_ids
    checked = 0
    for lower, lid in zip(reversed(layout["lowers"]), ids):  # bottom layer first, as the image lists them
        dirs = [d for d in lower.rglob("*") if d.is_dir() and not d.is_symlink()]
        assert dirs
        fresh, listed = StoreLayer(st.reader(), lid), StoreLayer(st.reader(), lid)
        for d in [lower, *dirs]:
            path = "/" + str(d.relative_to(lower)) if d != lower else "/"
            want = 2 + sum(1 for c in d.iterdir() if c.is_dir() and not c.is_symlink())
            assert fresh.dir_nlink(path) == want, path
            listed.listdir(path)
            assert listed.dir_nlink(path) == want, path
            checked += 1
    assert checked >= 6


def test_small_files_of_a_directory_are_read_ahead_in_one_query(scratch):
    """Some opens of inlined files in a directory on, the next reads the inlined contents of the whole directory at
    once (StoreLayer._read_ahead). Every file still reads back its own bytes, in the core and through the mount under
    concurrent readers; a directory above the read-ahead budget is read file by file; a damaged content among the
    read-ahead ones still gives EIO for that file alone."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    from store.reader import open_store
    from unionfs import storelayer
    rng = random.Random(7)
    src = scratch / "src"
    want: dict[str, bytes] = {}
    for d, n, size in (("many", 200, None), ("bigdir", 200, 4096)):
        (src / d).mkdir(parents=True)
        for i in range(n):
            data = rng.randbytes(size or rng.randrange(1, 4097))
            (src / d / f"f{i:03d}").write_bytes(data)
            want[f"/{d}/f{i:03d}"] = data
    (src / "many" / "same").write_bytes(want["/many/f000"])  # one object, two names
    want["/many/same"] = want["/many/f000"]
    assert sum(len(v) for k, v in want.items() if k.startswith("/bigdir")) > storelayer._CONTENTS_DIR_MAX
    root = scratch / "store"
    lamina(root, "import", docker_archive([src], scratch / "img.tar", "ra:test"))

    st = open_store(str(root))
    layer = storelayer.StoreLayer(st.reader(), st.image("ra:test").layer_ids[0])
    for i in range(storelayer._READ_AHEAD_AT - 1):
        assert layer.read_small(f"/many/f{i:03d}") == want[f"/many/f{i:03d}"]
        assert "/many" not in layer._contents  # a few opens: each its own query
    assert layer.read_small("/many/f100") == want["/many/f100"]
    assert len(layer._contents["/many"]) == 200  # then all of them (200 objects, 201 names)
    for path, data in want.items():
        assert layer.read_small(path) == data, path
    assert layer._contents["/bigdir"] is None

    victim = layer._entry("/many/f005")
    with st.store.write() as db:
        db.execute("UPDATE objects SET data=? WHERE hash=?", (b"short", victim.object))
    mnt = scratch / "mnt"
    mnt.mkdir()
    mount_store(root, "ra:test", mnt, "--read-only")
    try:
        paths = [p for p in want if p != "/many/f005"]
        rng.shuffle(paths)
        with ThreadPoolExecutor(4) as pool:
            got = dict(zip(paths, pool.map(lambda p: (mnt / p.lstrip("/")).read_bytes(), paths)))
        assert got == {p: want[p] for p in paths}
        with pytest.raises(OSError) as e:
            (mnt / "many" / "f005").read_bytes()
        assert e.value.errno == errno.EIO
    finally:
        lamina(root, "umount", mnt)


def _daemon_pids(mnt: Path) -> list[int]:
    pids = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"mount" in argv and os.fsencode(str(mnt)) in argv:
                pids.append(int(pid))
    return pids


def _daemon_pid(mnt: Path) -> int:
    pids = _daemon_pids(mnt)
    assert len(pids) == 1, pids
    return pids[0]


def test_killed_daemon_then_umount_then_remount(layout, store_image):
    root, image = store_image
    mnt, up, wk = layout["mnt"], layout["upper"], layout["work"]
    mount_store(root, image, mnt, "--upper", up, "--work", wk)
    (mnt / "kept").write_text("survives\n")
    pid = _daemon_pid(mnt)
    os.kill(pid, signal.SIGKILL)
    for _ in range(200):
        if not os.path.exists(f"/proc/{pid}"):
            break
        time.sleep(0.02)
    with pytest.raises(OSError) as e:
        os.listdir(mnt)
    assert e.value.errno == errno.ENOTCONN
    lamina(root, "umount", mnt)
    assert not is_mounted(mnt)
    assert (up / "kept").read_text() == "survives\n"
    mount_store(root, image, mnt, "--upper", up, "--work", wk)
    try:
        assert (mnt / "kept").read_text() == "survives\n"
    finally:
        lamina(root, "umount", mnt)


def test_bad_mount_arguments(layout, scratch, store_image):
    root, image = store_image
    mnt = layout["mnt"]
    for args, word in [
        (["nosuch:image", mnt], "no such image"),
        ([image, scratch / "missing"], "mountpoint"),
        ([image, mnt, "--upper", layout["upper"]], "together"),
        ([image, mnt, "--upper", layout["upper"], "--work", layout["upper"]], "separate"),
    ]:
        p = lamina(root, "mount", *args, check=False)
        assert p.returncode == 1 and p.stderr.startswith("lamina: ") and word in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1
        assert not is_mounted(mnt)
        # `lamina mount` forks its daemon before it reads its arguments: a failed mount leaves no process behind
        assert _daemon_pids(mnt) == [], args
    p = lamina(root, "umount", mnt, check=False)
    assert p.returncode == 32 and "not mounted" in p.stderr


def test_relative_store_root_and_paths(layout, scratch, store_image):
    """The daemon works from "/": a relative --root, mount point, upper and work must still name the caller's."""
    root, image = store_image
    rel = {k: os.path.relpath(layout[k], scratch) for k in ("mnt", "upper", "work")}
    p = subprocess.run([str(BIN / "lamina"), "--root", os.path.relpath(root, scratch), "mount", image, rel["mnt"],
                        "--upper", rel["upper"], "--work", rel["work"]], cwd=scratch, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    mnt = layout["mnt"]
    try:
        assert (mnt / "c").read_text() == "top c\n"
        (mnt / "new").write_text("n\n")
        assert (layout["upper"] / "new").read_text() == "n\n"
    finally:
        lamina(root, "umount", mnt)


def test_mounted_image_is_held_until_umount(layout, store_image):
    """gc must not take the objects a mount serves: the mount holds its image until `lamina umount`."""
    root, image = store_image
    mnt = layout["mnt"]
    mount_store(root, image, mnt, "--read-only")
    try:
        r = lamina(root, "rmi", image, check=False)
        assert r.returncode == 1 and "in use by mount:" in r.stderr
        lamina(root, "rmi", "-f", image)
        lamina(root, "gc")
        assert snapshot(mnt, dir_nlink=False)  # every file still readable
    finally:
        lamina(root, "umount", mnt)
    assert "Removed 1 untagged images" in lamina(root, "gc").stdout


def test_an_object_name_never_leads_out_of_the_store(layout, scratch, store_image):
    """A damaged index naming a content `../../…` (#11.1, store layers): EIO, never a host file of the right size."""
    from store.reader import open_store
    root, image = store_image
    secret = scratch / "secret"
    secret.write_bytes(b"s" * 5001)  # the size /b's entry claims
    st = open_store(str(root))
    img = st.image(image)
    r = st.reader()
    entry = next(e for lid in reversed(img.layer_ids) if (e := r.lookup(lid, "/b")) is not None)
    with st.store.write() as db:
        db.execute("UPDATE entries SET object=? WHERE object=?", ("../" * 30 + str(secret)[1:], entry.object))
    mnt = layout["mnt"]
    mount_store(root, image, mnt, "--read-only")
    try:
        with pytest.raises(OSError) as e:
            (mnt / "b").read_bytes()
        assert e.value.errno == errno.EIO
        assert (mnt / "c").read_text() == "top c\n"
    finally:
        lamina(root, "umount", mnt)
