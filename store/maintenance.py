"""Keeping a store honest: `df` (what dedup saves, defined precisely), `gc` (mark and sweep) and `fsck`.

Definitions used by `df`:
  * images_bytes  — for every image, the sum of its layers' tar sizes: what a store without any sharing holds.
  * layers_bytes  — the sum of the tar sizes of distinct layers: what layer-level sharing (Docker's model) holds.
  * content_bytes — the sum of the sizes of distinct objects (file contents and tar skeletons): what lamina holds.
  * disk_bytes    — bytes allocated on disk for objects, the index and derived data (st_blocks * 512).
  * derived_bytes — of which per-layer derived data (store/derived.py: e.g. kernel overlayfs metadata trees).
  * dedup_ratio   — layers_bytes / content_bytes.
  Per image, over the distinct objects its layers reference: unique = objects no other image references,
  shared = objects at least one other image references, size = shared + unique (docker system df -v's rule).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

from . import derived
from .errors import Corrupt
from .objects import hash_bytes, hash_file
from .root import Store
from .tarsplit import reassemble

_IMAGE_OBJECTS = """
    SELECT DISTINCT il.image_id, e.object FROM image_layers il JOIN entries e ON e.layer_id = il.layer_id
        WHERE e.object IS NOT NULL
    UNION SELECT il.image_id, l.tarsplit FROM image_layers il JOIN layers l ON l.id = il.layer_id
    UNION SELECT il.image_id, so.object FROM image_layers il JOIN skeleton_objects so ON so.layer_id = il.layer_id
"""


def _allocated(path: str) -> int:
    try:
        return os.lstat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def df(store: Store) -> dict:
    db = store.db
    (images_bytes,) = db.execute("SELECT coalesce(sum(l.size),0) FROM image_layers il "
                                 "JOIN layers l ON l.id = il.layer_id").fetchone()
    (layers_bytes, n_layers) = db.execute("SELECT coalesce(sum(size),0), count(*) FROM layers").fetchone()
    (content_bytes, n_objects) = db.execute("SELECT coalesce(sum(size),0), count(*) FROM objects").fetchone()
    disk = sum(_allocated(store.db_path + sfx) for sfx in ("", "-wal", "-shm"))
    for dirpath, _, files in os.walk(store.objects_dir):
        disk += sum(_allocated(os.path.join(dirpath, f)) for f in files)
    derived_bytes = derived.allocated(store=store)
    disk += derived_bytes
    per_image = {}
    rows = db.execute(f"""
        WITH io AS ({_IMAGE_OBJECTS}), oc AS (SELECT object, count(*) AS n FROM io GROUP BY object)
        SELECT io.image_id,
               coalesce(sum(CASE WHEN oc.n = 1 THEN o.size END), 0),
               coalesce(sum(CASE WHEN oc.n > 1 THEN o.size END), 0)
        FROM io JOIN oc ON oc.object = io.object JOIN objects o ON o.hash = io.object
        GROUP BY io.image_id""").fetchall()
    tags = {}
    for name, image_id in db.execute("SELECT name, image_id FROM tags ORDER BY name"):
        tags.setdefault(image_id, []).append(name)
    for image_id, unique, shared in rows:
        per_image[image_id] = {"tags": tags.get(image_id, []), "unique_bytes": unique, "shared_bytes": shared,
                               "size_bytes": unique + shared}
    return {
        "images": db.execute("SELECT count(*) FROM images").fetchone()[0],
        "layers": n_layers,
        "objects": n_objects,
        "images_bytes": images_bytes,
        "layers_bytes": layers_bytes,
        "content_bytes": content_bytes,
        "disk_bytes": disk,
        "derived_bytes": derived_bytes,
        "dedup_ratio": round(layers_bytes / content_bytes, 3) if content_bytes else None,
        "per_image": per_image,
    }


def gc(store: Store) -> dict:
    """Drops images with neither tag nor holder, layers no image uses and objects no layer uses, then stray files
    under objects/."""
    with store.exclusive():
        damage = index_damage(store)
        if damage:
            raise Corrupt(f"{damage}: gc would go by it; restore index.db from a backup")
        store.recover_locked()
        return _gc_locked(store)


def index_damage(store: Store) -> str | None:
    """What SQLite's quick_check finds wrong with the index, in one line; None when it is sound. gc and fsck
    decide from the index what to delete, so they run it first (every other command meets damage only where
    it reads)."""
    found = [r for (r,) in store.db.execute("PRAGMA quick_check").fetchall()]
    if found == ["ok"]:
        return None
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    return f"index {store.db_path} is damaged: {found[0]}{more}"


def _gc_locked(store: Store) -> dict:
    with store.write() as db:
        # Dangling images (no tag, no holder) go first, as `docker image prune` removes them.
        dead_images = [i for (i,) in db.execute(
            "SELECT id FROM images WHERE id NOT IN (SELECT image_id FROM tags) "
            "AND id NOT IN (SELECT image_id FROM holds)")]
        for image_id in dead_images:
            db.execute("DELETE FROM image_layers WHERE image_id=?", (image_id,))
            db.execute("DELETE FROM images WHERE id=?", (image_id,))
        db.execute("DELETE FROM build_cache WHERE image_id NOT IN (SELECT id FROM images)")
        dead_layers = [lid for (lid,) in db.execute(
            "SELECT id FROM layers WHERE id NOT IN (SELECT layer_id FROM image_layers)")]
        for lid in dead_layers:
            _delete_layer(db, lid)
        dead = db.execute("""SELECT hash, size FROM objects WHERE
            hash NOT IN (SELECT object FROM entries WHERE object IS NOT NULL)
            AND hash NOT IN (SELECT tarsplit FROM layers)
            AND hash NOT IN (SELECT object FROM skeleton_objects)""").fetchall()
        db.executemany("DELETE FROM objects WHERE hash=?", [(h,) for h, _ in dead])
    freed = 0
    for h, size in dead:
        try:
            os.unlink(store.object_path(h))
            freed += size
        except FileNotFoundError:
            pass
    strays = _stray_files(store)
    for p in strays:
        freed += os.lstat(p).st_size
        os.unlink(p)
    freed += derived.sweep(store)
    return {"images": len(dead_images), "layers": len(dead_layers), "objects": len(dead) + len(strays),
            "bytes": freed}


def _delete_layer(db, lid: int) -> None:
    for table, key in (("entries", "layer_id"), ("skeleton_objects", "layer_id"), ("layers", "id")):
        db.execute(f"DELETE FROM {table} WHERE {key}=?", (lid,))


def _stray_files(store: Store) -> list[str]:
    known = {h for (h,) in store.db.execute("SELECT hash FROM objects")}
    out = []
    for sub in sorted(os.listdir(store.objects_dir)):
        d = os.path.join(store.objects_dir, sub)
        for f in os.listdir(d) if os.path.isdir(d) else []:
            if sub + f not in known:
                out.append(os.path.join(d, f))
    return out


@dataclass
class FsckReport:
    objects: int = 0
    layers: int = 0
    images: int = 0
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)


def fsck(store: Store, repair: bool = False, verify_layers: bool = True) -> FsckReport:
    """Re-hashes every object, checks every reference, and (by default) rebuilds every layer to its DiffID."""
    with store.exclusive():
        damage = index_damage(store)
        if damage:  # nothing the index says can be trusted, nor repaired from it
            return FsckReport(problems=[f"{damage}: restore it from a backup"])
        store.recover_locked()
        return _Fsck(store, repair).run(verify_layers)


class _Fsck:
    """One fsck pass. Damage is collected first (objects, then the layers that use them), repaired last."""

    def __init__(self, store: Store, repair: bool) -> None:
        self.store, self.db, self.repair = store, store.db, repair
        self.rep = FsckReport()
        self.bad_objects: set[str] = set()
        self.bad_layers: dict[int, str] = {}  # layer id -> DiffID

    def run(self, verify_layers: bool) -> FsckReport:
        self.objects()
        self.strays()
        self.layers(verify_layers)
        self.references()
        if self.repair and self.bad_layers:
            self.drop_damaged()
        found, fixed = derived.problems(self.store, self.repair)
        self.rep.problems += found
        self.rep.repaired += fixed
        return self.rep

    def problem(self, msg: str, layer: tuple[int, str] | None = None) -> None:
        self.rep.problems.append(msg)
        if layer is not None:
            self.bad_layers[layer[0]] = layer[1]

    def objects(self) -> None:
        for h, size, data in self.db.execute("SELECT hash, size, data FROM objects"):
            self.rep.objects += 1
            try:
                got, n = (hash_bytes(data), len(data)) if data is not None else hash_file(self.store.object_path(h))
            except FileNotFoundError:
                got, n = "nothing (missing)", 0
            if got != h or n != size:
                self.problem(f"object {h}: content hashes to {got} ({n} bytes, index says {size})")
                self.bad_objects.add(h)

    def strays(self) -> None:
        for p in _stray_files(self.store):
            self.problem(f"stray file {p}: not in the index")
            if self.repair:
                os.unlink(p)
                self.rep.repaired.append(f"removed {p}")

    def layers(self, verify: bool) -> None:
        db = self.db
        for lid, diff_id, n in db.execute(
                "SELECT u.layer_id, l.diff_id, count(DISTINCT u.object) FROM (SELECT layer_id, object FROM entries "
                "WHERE object IS NOT NULL UNION ALL SELECT layer_id, object FROM skeleton_objects) u "
                "JOIN layers l ON l.id = u.layer_id WHERE u.object NOT IN (SELECT hash FROM objects) "
                "GROUP BY u.layer_id").fetchall():
            self.problem(f"layer {diff_id}: refers to {n} unknown objects", (lid, diff_id))
        for lid, diff_id, n in db.execute(
                "SELECT e.layer_id, l.diff_id, count(*) FROM entries e JOIN layers l ON l.id = e.layer_id "
                "WHERE e.link_ino IS NOT NULL AND NOT EXISTS (SELECT 1 FROM entries t "
                "WHERE t.ino = e.link_ino AND t.layer_id = e.layer_id) GROUP BY e.layer_id").fetchall():
            self.problem(f"layer {diff_id}: {n} hardlinks refer to entries missing from the layer", (lid, diff_id))
        bad = sorted(self.bad_objects)
        for lid, diff_id, tarsplit, size in db.execute("SELECT id, diff_id, tarsplit, size FROM layers").fetchall():
            self.rep.layers += 1
            if lid in self.bad_layers:
                continue
            if db.execute("SELECT 1 FROM objects WHERE hash=?", (tarsplit,)).fetchone() is None:
                self.problem(f"layer {diff_id}: unknown tar skeleton object {tarsplit}", (lid, diff_id))
                continue
            marks = ','.join('?' * len(bad))
            uses_bad = (tarsplit in self.bad_objects) + (db.execute(
                f"SELECT count(*) FROM (SELECT object FROM entries WHERE layer_id=? AND object IN ({marks}) "
                f"UNION ALL SELECT object FROM skeleton_objects WHERE layer_id=? AND object IN ({marks}))",
                (lid, *bad, lid, *bad)).fetchone()[0] if bad else 0)
            if uses_bad:
                self.problem(f"layer {diff_id}: uses {uses_bad} damaged objects", (lid, diff_id))
            elif verify:
                self.rebuild(lid, diff_id, tarsplit, size)

    def rebuild(self, lid: int, diff_id: str, tarsplit: str, size: int) -> None:
        sha, n = hashlib.sha256(), 0
        used: set[str] = set()

        def open_object(h: str):
            used.add(h)
            return self.store.open_object(h)
        try:
            with self.store.open_object(tarsplit) as skel:
                for chunk in reassemble(skel, open_object):
                    sha.update(chunk)
                    n += len(chunk)
        except (Corrupt, OSError) as e:
            self.problem(f"layer {diff_id}: cannot be rebuilt: {e}", (lid, diff_id))
            return
        if "sha256:" + sha.hexdigest() != diff_id or n != size:
            self.problem(f"layer {diff_id}: rebuilds to sha256:{sha.hexdigest()} ({n} bytes)", (lid, diff_id))
            return
        self.unrecorded(lid, diff_id, used)

    def unrecorded(self, lid: int, diff_id: str, used: set[str]) -> None:
        """Objects the layer's skeleton uses that the index does not tie to the layer: gc would delete them."""
        used -= {o for (o,) in self.db.execute(
            "SELECT object FROM entries WHERE layer_id=? AND object IS NOT NULL "
            "UNION SELECT object FROM skeleton_objects WHERE layer_id=?", (lid, lid))}
        if not used:
            return
        self.problem(f"layer {diff_id}: its tar skeleton uses {len(used)} objects the index does not record")
        if self.repair:
            with self.store.write() as w:
                w.executemany("INSERT OR IGNORE INTO skeleton_objects VALUES (?, ?)", [(lid, h) for h in used])
            self.rep.repaired.append(f"recorded {len(used)} objects of layer {diff_id}")

    def references(self) -> None:
        db = self.db
        (self.rep.images,) = db.execute("SELECT count(*) FROM images").fetchone()
        for image_id, pos in db.execute("SELECT image_id, position FROM image_layers "
                                        "WHERE layer_id NOT IN (SELECT id FROM layers)").fetchall():
            self.problem(f"image {image_id}: layer {pos} is missing")
            if self.repair:
                self.drop_image(image_id)
        # Names and holds pointing at no image: the only repair is to drop them.
        for table, key in (("tags", "name"), ("holds", "holder")):
            for name, image_id in db.execute(f"SELECT {key}, image_id FROM {table} "
                                             "WHERE image_id NOT IN (SELECT id FROM images)").fetchall():
                self.problem(f"{table[:-1]} {name}: refers to missing image {image_id}")
                if self.repair:
                    with self.store.write() as w:
                        w.execute(f"DELETE FROM {table} WHERE {key}=?", (name,))
                    self.rep.repaired.append(f"removed dangling {table[:-1]} {name}")

    def drop_image(self, image_id: str) -> None:
        with self.store.write() as w:
            names = [n for (n,) in w.execute("SELECT name FROM tags WHERE image_id=?", (image_id,))]
            w.execute("DELETE FROM tags WHERE image_id=?", (image_id,))
            w.execute("DELETE FROM image_layers WHERE image_id=?", (image_id,))
            w.execute("DELETE FROM images WHERE id=?", (image_id,))
        self.rep.repaired.append(f"removed damaged image {image_id} {' '.join(names)}: import it again")

    def drop_damaged(self) -> None:
        """Damaged content cannot be rebuilt from nothing. Drop the layers that hold it and the images built on
        them, so that re-importing those images stores the content afresh (a kept layer row would make the
        importer skip it); gc then removes what they alone referenced."""
        for lid, diff_id in self.bad_layers.items():
            for (image_id,) in self.db.execute("SELECT DISTINCT image_id FROM image_layers WHERE layer_id=?",
                                               (lid,)).fetchall():
                self.drop_image(image_id)
            with self.store.write() as w:
                _delete_layer(w, lid)
            self.rep.repaired.append(f"removed damaged layer {diff_id}")
        with self.store.write() as w:
            w.executemany("DELETE FROM objects WHERE hash=?", [(h,) for h in self.bad_objects])
        for h in self.bad_objects:
            try:
                os.unlink(self.store.object_path(h))
            except FileNotFoundError:
                pass
        _gc_locked(self.store)
