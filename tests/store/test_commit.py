"""store.importer.commit_layer: an overlayfs upper directory becomes one OCI layer on top of its image."""
from __future__ import annotations

import json
import os
import stat

from store.importer import commit_layer
from store.reader import open_store
from store.root import Store


def test_upper_dir_becomes_a_layer_with_oci_whiteouts(lamina, busybox_dir, tmp_path):
    lamina("import", busybox_dir, "-t", "base")
    upper = tmp_path / "upper"
    (upper / "etc").mkdir(parents=True)
    os.mknod(upper / "etc/passwd", stat.S_IFCHR | 0o000, 0)  # kernel overlay's whiteout
    (upper / "bin").mkdir()
    os.setxattr(upper / "bin", "trusted.overlay.opaque", b"y")  # an opaque directory
    (upper / "bin/only").write_text("only\n")
    (upper / "new").write_text("new\n")
    (upper / "vol").mkdir()  # an empty mount point left by a volume: excluded
    st = Store(str(lamina.root))
    base_id = open_store(str(lamina.root)).image("base").id
    image_id = commit_layer(st, base_id, str(upper), "lamina commit test", ["committed:1"], frozenset({"/vol"}))
    s = open_store(str(lamina.root))
    img = s.image("committed:1")
    assert img.id == image_id and len(img.layer_ids) == 2
    r, top = s.reader(), img.layer_ids[1]
    assert r.lookup(top, "/etc/passwd").kind == "w"
    assert r.lookup(top, "/bin").opaque
    assert r.lookup(top, "/vol") is None
    assert os.read(r.open_object(r.lookup(top, "/new").object), 100) == b"new\n"
    hist = json.loads(lamina("history", "committed:1", "--format", "json").stdout)
    assert hist[0]["created_by"] == "lamina commit test" and hist[0]["size"] == 9
    lamina.assert_clean()
