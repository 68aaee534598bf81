"""Holds: users of an image other than its tags (a container, a mount). A held image is kept by `gc` and
refused by `rmi` (as docker refuses to remove an image a container uses); the holder releases it when done."""
from __future__ import annotations

from .root import Store


def hold(store: Store, holder: str, image_id: str) -> None:
    with store.write() as db:
        db.execute("INSERT OR REPLACE INTO holds(holder, image_id) VALUES (?, ?)", (holder, image_id))


def release(store: Store, holder: str) -> None:
    with store.write() as db:
        db.execute("DELETE FROM holds WHERE holder=?", (holder,))


def holders(store: Store, image_id: str | None = None) -> list[tuple[str, str]]:
    """(holder, image id) pairs, for one image or all."""
    if image_id is None:
        return store.db.execute("SELECT holder, image_id FROM holds ORDER BY holder").fetchall()
    return store.db.execute("SELECT holder, image_id FROM holds WHERE image_id=? ORDER BY holder",
                            (image_id,)).fetchall()
