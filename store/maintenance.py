"""Keeping a store honest: `df` (what dedup saves, defined precisely), `gc` (mark and sweep) and `fsck`.

Definitions used by `df`:
  * images_bytes  — for every image, the sum of its layers' tar sizes: what a store without any sharing holds.
  * layers_bytes  — the sum of the tar sizes of distinct layers: what layer-level sharing (Docker's model) holds.
  * content_bytes — the sum of the sizes of distinct objects (file contents and tar skeletons): what lamina holds.
  * disk_bytes    — bytes allocated on disk for objects and the index (st_blocks * 512).
  * dedup_ratio   — layers_bytes / content_bytes.
  Per image, over the distinct objects its layers reference: unique = objects no other image references,
  shared = objects at least one other image references, size = shared + unique (docker system df -v's rule).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

from .errors import Corrupt
from .objects import hash_bytes, hash_file
from .root import Store
from .tarsplit import reassemble

_IMAGE_OBJECTS = """
    SELECT DISTINCT il.image_id, e.object FROM image_layers il JOIN entries e ON e.layer_id = il.layer_id
        WHERE e.object IS NOT NULL
    UNION SELECT il.image_id, l.tarsplit FROM image_layers il JOIN layers l ON l.id = il.layer_id
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
        "dedup_ratio": round(layers_bytes / content_bytes, 3) if content_bytes else None,
        "per_image": per_image,
    }


def gc(store: Store) -> dict:
    """Drops images with neither tag nor holder, layers no image uses and objects no layer uses, then stray files
    under objects/."""
    with store.exclusive():
        store.recover_locked()
        return _gc_locked(store)


def _gc_locked(store: Store) -> dict:
    with store.write() as db:
        # Dangling images (no tag, no holder) go first, as `docker image prune` removes them.
        dead_images = [i for (i,) in db.execute(
            "SELECT id FROM images WHERE id NOT IN (SELECT image_id FROM tags) "
            "AND id NOT IN (SELECT image_id FROM holds)")]
        for image_id in dead_images:
            db.execute("DELETE FROM image_layers WHERE image_id=?", (image_id,))
            db.execute("DELETE FROM images WHERE id=?", (image_id,))
        dead_layers = [lid for (lid,) in db.execute(
            "SELECT id FROM layers WHERE id NOT IN (SELECT layer_id FROM image_layers)")]
        for lid in dead_layers:
            db.execute("DELETE FROM entries WHERE layer_id=?", (lid,))
            db.execute("DELETE FROM layers WHERE id=?", (lid,))
        dead = db.execute("""SELECT hash, size FROM objects WHERE
            hash NOT IN (SELECT object FROM entries WHERE object IS NOT NULL)
            AND hash NOT IN (SELECT tarsplit FROM layers)""").fetchall()
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
    return {"images": len(dead_images), "layers": len(dead_layers), "objects": len(dead) + len(strays),
            "bytes": freed}


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
    rep = FsckReport()
    with store.exclusive():
        store.recover_locked()
        db = store.db
        bad_objects: set[str] = set()
        for h, size, data in db.execute("SELECT hash, size, data FROM objects"):
            rep.objects += 1
            try:
                got, n = (hash_bytes(data), len(data)) if data is not None else hash_file(store.object_path(h))
            except FileNotFoundError:
                rep.problems.append(f"object {h}: missing")
                bad_objects.add(h)
                continue
            if got != h or n != size:
                rep.problems.append(f"object {h}: content hashes to {got} ({n} bytes, index says {size})")
                bad_objects.add(h)
        for p in _stray_files(store):
            rep.problems.append(f"stray file {p}: not in the index")
            if repair:
                os.unlink(p)
                rep.repaired.append(f"removed {p}")
        for (h,) in db.execute("SELECT DISTINCT object FROM entries WHERE object IS NOT NULL "
                               "AND object NOT IN (SELECT hash FROM objects)"):
            rep.problems.append(f"entries refer to unknown object {h}")
        bad_layers: list[tuple[int, str]] = []
        for lid, diff_id, tarsplit, size in db.execute("SELECT id, diff_id, tarsplit, size FROM layers").fetchall():
            rep.layers += 1
            if db.execute("SELECT 1 FROM objects WHERE hash=?", (tarsplit,)).fetchone() is None:
                rep.problems.append(f"layer {diff_id}: unknown tar skeleton object {tarsplit}")
                continue
            uses_bad = db.execute("SELECT count(*) FROM entries WHERE layer_id=? AND object IN "
                                  f"({','.join('?' * len(bad_objects)) or 'NULL'})",
                                  (lid, *bad_objects)).fetchone()[0] if bad_objects else 0
            if uses_bad or tarsplit in bad_objects:
                rep.problems.append(f"layer {diff_id}: uses {uses_bad + (tarsplit in bad_objects)} damaged objects")
                bad_layers.append((lid, diff_id))
                continue
            if verify_layers:
                sha, n = hashlib.sha256(), 0
                try:
                    with store.open_object(tarsplit) as skel:
                        for chunk in reassemble(skel, store.open_object):
                            sha.update(chunk)
                            n += len(chunk)
                except (Corrupt, OSError) as e:
                    rep.problems.append(f"layer {diff_id}: cannot be rebuilt: {e}")
                    bad_layers.append((lid, diff_id))
                    continue
                if "sha256:" + sha.hexdigest() != diff_id or n != size:
                    rep.problems.append(f"layer {diff_id}: rebuilds to sha256:{sha.hexdigest()} ({n} bytes)")
                    bad_layers.append((lid, diff_id))
        for lid, diff_id, n in db.execute(
                "SELECT e.layer_id, l.diff_id, count(*) FROM entries e JOIN layers l ON l.id = e.layer_id "
                "WHERE e.link_ino IS NOT NULL AND NOT EXISTS (SELECT 1 FROM entries t "
                "WHERE t.ino = e.link_ino AND t.layer_id = e.layer_id) GROUP BY e.layer_id").fetchall():
            rep.problems.append(f"layer {diff_id}: {n} hardlinks refer to entries missing from the layer")
            if (lid, diff_id) not in bad_layers:
                bad_layers.append((lid, diff_id))
        for holder, image_id in db.execute("SELECT holder, image_id FROM holds WHERE image_id NOT IN "
                                           "(SELECT id FROM images)").fetchall():
            rep.problems.append(f"hold {holder}: refers to missing image {image_id}")
            if repair:
                with store.write() as w:
                    w.execute("DELETE FROM holds WHERE holder=?", (holder,))
                rep.repaired.append(f"removed dangling hold {holder}")
        for image_id, pos, lid in db.execute("SELECT image_id, position, layer_id FROM image_layers "
                                             "WHERE layer_id NOT IN (SELECT id FROM layers)").fetchall():
            rep.problems.append(f"image {image_id}: layer {pos} is missing")
        for (image_id,) in db.execute("SELECT id FROM images"):
            rep.images += 1
        for name, image_id in db.execute("SELECT name, image_id FROM tags WHERE image_id NOT IN "
                                         "(SELECT id FROM images)").fetchall():
            rep.problems.append(f"tag {name}: refers to missing image {image_id}")
            if repair:
                with store.write() as w:
                    w.execute("DELETE FROM tags WHERE name=?", (name,))
                rep.repaired.append(f"removed dangling tag {name}")
        if repair and bad_layers:
            # Damaged content cannot be rebuilt from nothing. Drop the layers that hold it and the images built on
            # them, so that re-importing those images stores the content afresh (a kept layer row would make the
            # importer skip it); gc then removes what they alone referenced.
            with store.write() as w:
                for lid, diff_id in bad_layers:
                    for (image_id,) in w.execute("SELECT DISTINCT image_id FROM image_layers WHERE layer_id=?",
                                                 (lid,)).fetchall():
                        names = [n for (n,) in w.execute("SELECT name FROM tags WHERE image_id=?", (image_id,))]
                        w.execute("DELETE FROM tags WHERE image_id=?", (image_id,))
                        w.execute("DELETE FROM image_layers WHERE image_id=?", (image_id,))
                        w.execute("DELETE FROM images WHERE id=?", (image_id,))
                        rep.repaired.append(f"removed damaged image {image_id} {' '.join(names)}: import it again")
                    w.execute("DELETE FROM entries WHERE layer_id=?", (lid,))
                    w.execute("DELETE FROM layers WHERE id=?", (lid,))
                    rep.repaired.append(f"removed damaged layer {diff_id}")
                w.executemany("DELETE FROM objects WHERE hash=?", [(h,) for h in bad_objects])
            for h in bad_objects:
                try:
                    os.unlink(store.object_path(h))
                except FileNotFoundError:
                    pass
            _gc_locked(store)
        (ok,) = db.execute("PRAGMA quick_check").fetchone()
        if ok != "ok":
            rep.problems.append(f"index: {ok}")
    return rep
