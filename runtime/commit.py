"""`lamina commit CONTAINER NAME` and `lamina diff`: the container layer read as changes to the container's image, and
committed as one new image layer on top of it.

`unionfs.changes` reads the upper directory back as the container saw it (renamed directories whole, hardlinks
joined, whiteouts as OCI's) and writes it as an OCI layer; the store then takes that layer like any other,
deduplicating its contents. The container is frozen (freezer cgroup) while its layer is read, and volume mount points
are left out. A directory image is first imported into the store, so the parent is a store image either way.
"""
from __future__ import annotations

import stat
from collections.abc import Iterator
from contextlib import contextmanager

from store.importer import commit_layer, import_source
from store.reader import open_store, resolve
from store.root import Store
from unionfs.changes import DELETED, Change, changes, write_layer
from unionfs.layers import DirLayer
from unionfs.storelayer import StoreLayer

from . import cgroups, state


class CommitError(Exception):
    pass


@contextmanager
def layer_changes(root: str, c: state.Container) -> Iterator[list[Change]]:
    """The container layer's changes to the image the container runs, readable until the block ends."""
    if c.data.get("image_kind") == "dir":
        # mounted by kernel overlayfs, whose hardlink index (if it keeps one) is its own
        yield changes(str(c.upper), [DirLayer(c.data["image_path"])])
        return
    with open_store(root) as st:
        img = st.image(c.data.get("image_id") or c.data["image"])
        reader = st.reader()
        yield changes(str(c.upper), [StoreLayer(reader, lid) for lid in reversed(img.layer_ids)], str(c.work))


def _excluded(c: state.Container) -> frozenset[str]:
    out = set(c.data.get("etc_files", []))
    for m in c.data.get("mounts", []):
        out.add(m["target"])
    return frozenset(out)


def _without_placeholders(chs: list[Change], excluded: frozenset[str]) -> list[Change]:
    """Leave out the empty files and directories the runtime made as mount points (volumes, /etc files), never
    what holds content."""
    parents = {ch.path.rpartition("/")[0] or "/" for ch in chs}

    def placeholder(ch: Change) -> bool:
        if ch.path not in excluded or ch.kind == DELETED or ch.rec is None:
            return False
        if stat.S_ISREG(ch.rec.mode):
            return ch.rec.size == 0
        return stat.S_ISDIR(ch.rec.mode) and ch.path not in parents

    return [ch for ch in chs if not placeholder(ch)]


def commit(root: str, c: state.Container, name: str | None) -> str:
    """Commit the container layer; return the new image id."""
    store = Store(root)
    if c.data.get("image_kind") == "dir":
        parent_id = import_source(store, c.data["image_path"])[0]
    else:
        parent_id = c.data.get("image_id") or resolve(store, c.data["image"])
    cg = cgroups.from_json(c.data["cgroup"]) if c.data.get("cgroup") and c.status() == "running" else None
    if cg is not None:
        cg.freeze(True)
    try:
        created_by = f"lamina commit {c.id[:12]} ({' '.join(c.data.get('argv', []))})"
        with layer_changes(root, c) as chs:
            keep = _without_placeholders(chs, _excluded(c))
            return commit_layer(store, parent_id, lambda out: write_layer(keep, out), created_by,
                                [name] if name else [], config=c.data.get("config"))
    finally:
        if cg is not None:
            cg.freeze(False)
