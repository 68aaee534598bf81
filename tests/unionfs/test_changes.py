"""unionfs.changes: an upper directory in every on-disk form (kernel overlayfs's and lamina-fs's) read back as changes
to its lowers, and written as an OCI layer that the store takes."""
from __future__ import annotations

import io
import os
import stat
import subprocess
import tarfile
from pathlib import Path

from store.importer import commit_layer, import_source
from store.reader import open_store
from store.root import Store
from unionfs.changes import changes, write_layer
from unionfs.layers import DirLayer


def _tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def _upper(tmp_path: Path) -> tuple[Path, Path, Path]:
    lower, upper, work = tmp_path / "lower", tmp_path / "upper", tmp_path / "work"
    _tree(lower, {"etc/passwd": b"p\n", "etc/group": b"g\n", "old/a": b"a\n", "old/sub/b": b"b\n",
                  "bin/x": b"x\n", "opq/gone": b"gone\n", "fb/gone": b"gone\n", "h/one": b"hard\n"})
    os.link(lower / "h/one", lower / "h/two")
    os.link(lower / "h/one", lower / "etc/three")
    os.link(lower / "h/one", lower / "bin/four")  # hidden by the opaque /bin
    # the upper as a union leaves it after: rm /etc/passwd (char 0/0), rm /fb/gone (fuse-overlayfs's fallback),
    # rm -r /opq; mkdir /opq (opaque xattr), mkdir /bin2 over a whiteout with the marker file, mv /old /new
    # (redirect) plus a change inside it, and `echo >> /h/one` (copied up, joined through the index)
    (upper / "etc").mkdir(parents=True)
    os.mknod(upper / "etc/passwd", stat.S_IFCHR, 0)
    (upper / "fb").mkdir()
    (upper / "fb/.wh.gone").write_bytes(b"")
    (upper / "opq").mkdir()
    os.setxattr(upper / "opq", "trusted.overlay.opaque", b"y")
    (upper / "opq/new").write_bytes(b"n\n")
    (upper / "bin").mkdir()
    (upper / "bin/.wh..wh..opq").write_bytes(b"")
    (upper / "bin/only").write_bytes(b"only\n")
    os.mknod(upper / "old", stat.S_IFCHR, 0)
    (upper / "new").mkdir()
    os.setxattr(upper / "new", "trusted.overlay.redirect", b"/old")
    os.setxattr(upper / "new", "trusted.lamina.origin", b"\1\0\0\0\0\0\0\0")
    (upper / "new/a").write_bytes(b"a changed\n")
    (upper / "h").mkdir()
    (work / "index").mkdir(parents=True)
    (upper / "h/one").write_bytes(b"hard\nmore\n")
    os.setxattr(upper / "h/one", "user.kept", b"1")
    os.link(upper / "h/one", work / "index" / f"{os.lstat(lower / 'h/one').st_ino:x}")
    return lower, upper, work


def test_every_upper_form_reads_back_as_the_unions_view(tmp_path):
    lower, upper, work = _upper(tmp_path)
    got = {ch.path: ch.kind for ch in changes(str(upper), [DirLayer(str(lower))], str(work))}
    assert got == {
        "/": "C", "/bin": "C", "/bin/only": "A", "/etc": "C", "/etc/passwd": "D", "/fb": "C", "/fb/gone": "D",
        "/h": "C", "/h/one": "C", "/h/two": "C", "/opq": "C", "/opq/new": "A", "/old": "D",
        "/new": "A", "/new/a": "A", "/new/sub": "A", "/new/sub/b": "A",
        "/etc/three": "C",  # the third name of the joined file (/bin/four is hidden by the opaque /bin)
    }


def _members(tar: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        return {ti.name.rstrip("/"): ti for ti in tf}


def test_layer_holds_oci_whiteouts_whole_renamed_dirs_and_joined_hardlinks(tmp_path):
    lower, upper, work = _upper(tmp_path)
    out = io.BytesIO()
    write_layer(changes(str(upper), [DirLayer(str(lower))], str(work)), out)
    m = _members(out.getvalue())
    for name in ("etc/.wh.passwd", "fb/.wh.gone", "opq/.wh..wh..opq", "bin/.wh..wh..opq", ".wh.old",
                 "new/.wh..wh..opq", "new/a", "new/sub/b", "."):
        assert name in m, sorted(m)
    # one file under its three names: the content goes with the first in tar order, the others link to it
    assert m["etc/three"].isreg() and m["etc/three"].size == 10
    assert [(m[n].islnk(), m[n].linkname) for n in ("h/one", "h/two")] == [(True, "etc/three")] * 2
    assert "bin/four" not in m
    assert not [k for ti in m.values() for k in ti.pax_headers if "lamina" in k or "overlay" in k]
    assert m["etc/three"].pax_headers.get("SCHILY.xattr.user.kept") == "1"


def test_commit_layer_stores_the_changes(tmp_path):
    lower, upper, work = _upper(tmp_path)
    st = Store(str(tmp_path / "store"))
    base = import_source(st, str(lower))[0]
    image_id = commit_layer(st, base, lambda out: write_layer(changes(str(upper), [DirLayer(str(lower))],
                                                                      str(work)), out),
                            "lamina commit test", ["committed:1"])
    s = open_store(str(tmp_path / "store"))
    img = s.image("committed:1")
    assert img.id == image_id and len(img.layer_ids) == 2
    r, top = s.reader(), img.layer_ids[1]
    assert r.lookup(top, "/etc/passwd").kind == "w" and r.lookup(top, "/old").kind == "w"
    assert r.lookup(top, "/new").opaque and r.lookup(top, "/opq").opaque and r.lookup(top, "/bin").opaque
    assert r.lookup(top, "/new/sub/b") is not None
    one, two, three = (r.lookup(top, p) for p in ("/h/one", "/h/two", "/etc/three"))
    assert one.ino == two.ino == three.ino and one.nlink == 3
    assert os.read(r.open_object(one.object), 100) == b"hard\nmore\n"
    r2 = subprocess.run([os.path.join(os.path.dirname(os.sys.executable), "lamina"), "fsck"],
                        env=dict(os.environ, LAMINA_ROOT=str(tmp_path / "store")), capture_output=True, text=True)
    assert r2.returncode == 0 and " 0 problems" in r2.stdout, r2.stdout + r2.stderr
