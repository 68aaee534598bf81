"""`lamina commit CONTAINER NAME`: the container layer becomes one new image layer on top of the container's image.

The upper directory (kernel overlayfs format: 0/0 character-device whiteouts, the trusted.overlay.opaque xattr) is
written as an OCI layer tar (`.wh.NAME` and `.wh..wh..opq` entries) and handed to the store's importer, which
deduplicates its contents like any other layer. The container is frozen (freezer cgroup) while its layer is read,
and volume mount points are left out. A directory image is first imported into the store, so the parent is a
store image either way.
"""
from __future__ import annotations

import copy
import json
import os
import stat
import tarfile
import tempfile
import time
from typing import BinaryIO

from . import cgroups, state

OPAQUE_XATTR = "trusted.overlay.opaque"


class CommitError(Exception):
    pass


def _opaque(path: str) -> bool:
    try:
        return os.getxattr(path, OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


def layer_tar(upper: str, out: BinaryIO, exclude: frozenset[str] = frozenset()) -> None:
    """Write the OCI layer tar of an overlayfs upper directory to `out`."""
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for dirpath, dirnames, filenames in os.walk(upper):
            dirnames.sort()
            for name in sorted(dirnames + filenames):
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, upper)
                st = os.lstat(full)
                if "/" + rel in exclude and (stat.S_ISREG(st.st_mode) and st.st_size == 0 or
                                            stat.S_ISDIR(st.st_mode) and not os.listdir(full)):
                    continue
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                    ti = tarfile.TarInfo(os.path.join(os.path.dirname(rel), ".wh." + name))
                    ti.mtime = int(st.st_mtime)
                    tf.addfile(ti)
                    continue
                ti = tf.gettarinfo(full, arcname=rel)
                if ti.isreg():
                    with open(full, "rb") as f:
                        tf.addfile(ti, f)
                else:
                    tf.addfile(ti)
                if stat.S_ISDIR(st.st_mode) and _opaque(full):
                    opq = tarfile.TarInfo(os.path.join(rel, ".wh..wh..opq"))
                    opq.mtime = int(st.st_mtime)
                    tf.addfile(opq)


def _excluded(c: state.Container) -> frozenset[str]:
    out = set()
    for m in c.data.get("mounts", []):
        out.add(m["target"])
    return frozenset(out)


def commit(root: str, c: state.Container, name: str | None) -> str:
    """Commit the container layer; return the new image id."""
    try:
        from store.importer import ImageSpec, Importer, import_source, normalize_ref  # noqa: PLC0415
        from store.reader import load_image, resolve  # noqa: PLC0415
        from store.root import Store  # noqa: PLC0415
    except ImportError as e:
        raise CommitError(f"commit needs the store: {e}") from None
    store = Store(root)
    tags = [normalize_ref(name)] if name else []
    if c.data.get("image_kind") == "dir":
        parent_id = import_source(store, c.data["image_path"])[0]
    else:
        parent_id = c.data.get("image_id") or resolve(store, c.data["image"])
    parent = load_image(store, parent_id)
    cg = cgroups.from_json(c.data["cgroup"]) if c.data.get("cgroup") and c.status() == "running" else None
    if cg is not None:
        cg.freeze(True)
    try:
        f = tempfile.TemporaryFile(dir=store.tmp_dir)
        layer_tar(str(c.upper), f, _excluded(c))
    finally:
        if cg is not None:
            cg.freeze(False)
    with f:
        f.seek(0)
        imp = Importer(store)
        with imp.session():
            data = imp.add_layer_stream(f)
            cfg = copy.deepcopy(parent.config)
            now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            diff_ids = list(parent.diff_ids) + [data.diff_id]
            cfg["created"] = now
            cfg.setdefault("rootfs", {"type": "layers"})["diff_ids"] = diff_ids
            cfg.setdefault("history", []).append(
                {"created": now, "created_by": f"lamina commit {c.id[:12]} ({' '.join(c.data.get('argv', []))})"})
            imp.images.append(ImageSpec(json.dumps(cfg, separators=(",", ":")).encode(), diff_ids, tags))
            return imp.commit()[0]
