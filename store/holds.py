"""Holds: users of an image other than its tags (a container, a mount). A held image is kept by `gc` and
refused by `rmi` (as docker refuses to remove an image a container uses); the holder releases it when done."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from .root import Store


def hold(store: Store, holder: str, image_id: str) -> None:
    with store.write() as db:
        db.execute("INSERT OR REPLACE INTO holds(holder, image_id) VALUES (?, ?)", (holder, image_id))


def release(store: Store, holder: str) -> None:
    with store.write() as db:
        db.execute("DELETE FROM holds WHERE holder=?", (holder,))


@contextmanager
def releasing(store: Store, holder: str) -> Iterator[None]:
    """Release `holder` once the block has done what the hold protected (removed a container, say): the release
    is written before the block runs, so a store that cannot take it (a read-only index) fails before anything is
    done, and committed after it, so a crash in the block leaves the hold (an image kept), never a removal the
    store does not know of."""
    with store.write() as db:
        db.execute("DELETE FROM holds WHERE holder=?", (holder,))
        yield


def holders(store: Store, image_id: str | None = None) -> list[tuple[str, str]]:
    """(holder, image id) pairs, for one image or all."""
    if image_id is None:
        return store.db.execute("SELECT holder, image_id FROM holds ORDER BY holder").fetchall()
    return store.db.execute("SELECT holder, image_id FROM holds WHERE image_id=? ORDER BY holder",
                            (image_id,)).fetchall()
