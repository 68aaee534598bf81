"""The build cache's rows (table build_cache, store/schema.py): which image a build step's key made. The keys are
computed by `lamina build` (runtime/build); the store only keeps them, and gc drops a row with its image."""
from __future__ import annotations

import datetime as dt

from .root import Store


def lookup(store: Store, key: str) -> str | None:
    """The image a step with `key` made, if it is still in the store."""
    row = store.db.execute("SELECT b.image_id FROM build_cache b JOIN images i ON i.id = b.image_id WHERE b.key=?",
                           (key,)).fetchone()
    return row[0] if row else None


def record(store: Store, key: str, image_id: str) -> None:
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    with store.write() as db:
        db.execute("INSERT OR REPLACE INTO build_cache(key, image_id, created) VALUES (?, ?, ?)",
                   (key, image_id, now))


def prune(store: Store) -> int:
    """Forget every cached step; returns how many rows went. The images only the cache used become dangling and
    gc reclaims them."""
    with store.write() as db:
        return db.execute("DELETE FROM build_cache").rowcount
