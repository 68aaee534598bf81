"""`lamina commit CONTAINER NAME`: the container layer becomes one new image layer on top of the container's image.

The upper directory (kernel overlayfs format: 0/0 character-device whiteouts, the trusted.overlay.opaque xattr) is
handed to the store's `commit_layer`, which writes it as an OCI layer (`.wh.NAME` and `.wh..wh..opq` entries) and
deduplicates its contents like any other layer. The container is frozen (freezer cgroup) while its layer is read,
and volume mount points are left out. A directory image is first imported into the store, so the parent is a
store image either way.
"""
from __future__ import annotations

from store.importer import commit_layer, import_source
from store.reader import resolve
from store.root import Store

from . import cgroups, state


class CommitError(Exception):
    pass


def _excluded(c: state.Container) -> frozenset[str]:
    out = set(c.data.get("etc_files", []))
    for m in c.data.get("mounts", []):
        out.add(m["target"])
    return frozenset(out)


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
        return commit_layer(store, parent_id, str(c.upper), created_by, [name] if name else [], _excluded(c),
                            config=c.data.get("config"))
    finally:
        if cg is not None:
            cg.freeze(False)
