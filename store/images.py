"""Image-level operations on the index: listing, tagging, removing, history and docker-style inspect output."""
from __future__ import annotations

import json
from dataclasses import dataclass

from .errors import StoreError
from .refs import normalize_ref
from .reader import Image, load_image, resolve, resolve_name
from .root import Store


@dataclass
class ImageRow:
    repository: str
    tag: str
    id: str
    created: str
    size: int  # content bytes of all its layers (what `docker images` calls SIZE)


def image_size(store: Store, image_id: str) -> int:
    (n,) = store.db.execute("SELECT coalesce(sum(l.content_size), 0) FROM image_layers il "
                            "JOIN layers l ON l.id = il.layer_id WHERE il.image_id=?", (image_id,)).fetchone()
    return n


def list_images(store: Store) -> list[ImageRow]:
    out = []
    rows = store.db.execute("SELECT i.id, i.config, t.name FROM images i LEFT JOIN tags t ON t.image_id = i.id "
                            "ORDER BY i.created DESC, t.name").fetchall()
    for image_id, config, name in rows:
        cfg = json.loads(config)
        repo, tag = name.rsplit(":", 1) if name else ("<none>", "<none>")
        out.append(ImageRow(repo, tag, image_id, cfg.get("created", ""), image_size(store, image_id)))
    return out


def tag(store: Store, source: str, target: str) -> None:
    image_id = resolve(store, source)
    name = normalize_ref(target)
    with store.write() as db:
        db.execute("INSERT OR REPLACE INTO tags(name, image_id) VALUES (?, ?)", (name, image_id))


def rmi(store: Store, ref: str, force: bool = False) -> list[str]:
    """docker's rule: removing a tag untags; the image goes when its last tag does (or when named by id)."""
    image_id, name = resolve_name(store, ref)
    out = []
    with store.write() as db:
        holders = [h for (h,) in db.execute("SELECT holder FROM holds WHERE image_id=?", (image_id,))]
        if name is not None:
            others = db.execute("SELECT 1 FROM tags WHERE image_id=? AND name != ?", (image_id, name)).fetchone()
            if holders and not others and not force:
                raise StoreError(f"image {image_id[7:19]} is in use by {holders[0]}: use -f to untag it anyway")
            db.execute("DELETE FROM tags WHERE name=?", (name,))
            out.append(f"Untagged: {name}")
            if others:
                return out
        elif not force and db.execute("SELECT count(*) FROM tags WHERE image_id=?", (image_id,)).fetchone()[0] > 1:
            raise StoreError(f"image {image_id[7:19]} is referenced in multiple repositories: use -f")
        if holders and not force:
            raise StoreError(f"image {image_id[7:19]} is in use by {holders[0]}: stop and remove it first")
        for (tag_name,) in db.execute("SELECT name FROM tags WHERE image_id=?", (image_id,)).fetchall():
            out.append(f"Untagged: {tag_name}")
        db.execute("DELETE FROM tags WHERE image_id=?", (image_id,))
        if not holders:
            db.execute("DELETE FROM image_layers WHERE image_id=?", (image_id,))
            db.execute("DELETE FROM images WHERE id=?", (image_id,))
            out.append(f"Deleted: {image_id}")
    return out


def history(store: Store, ref: str) -> list[dict]:
    """One row per history item, newest first, as `docker history`; layer items carry their layer's size."""
    img = load_image(store, resolve(store, ref))
    sizes = [store.db.execute("SELECT content_size FROM layers WHERE id=?", (lid,)).fetchone()[0]
             for lid in img.layer_ids]
    items = img.config.get("history") or [{} for _ in img.layer_ids]
    rows, li = [], 0
    for h in items:
        empty = bool(h.get("empty_layer"))
        size = 0
        ident = "<missing>"
        if not empty and li < len(sizes):
            size = sizes[li]
            li += 1
        rows.append({"id": ident, "created": h.get("created", ""), "created_by": h.get("created_by", ""),
                     "size": size, "comment": h.get("comment", "")})
    if rows:
        rows[-1]["id"] = img.id
    return list(reversed(rows))


def inspect(store: Store, ref: str) -> dict:
    img: Image = load_image(store, resolve(store, ref))
    cfg = img.config
    return {
        "Id": img.id,
        "RepoTags": img.tags,
        "Created": cfg.get("created", ""),
        "Author": cfg.get("author", ""),
        "Architecture": cfg.get("architecture", ""),
        "Os": cfg.get("os", ""),
        "Config": cfg.get("config") or {},
        "RootFS": {"Type": "layers", "Layers": img.diff_ids},
        "History": cfg.get("history") or [],
        "Size": image_size(store, img.id),
    }
