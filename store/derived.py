"""Per-layer derived data: directories a user of the store builds from one layer and keeps beside it.

`derived/<hex of the layer's DiffID>/<kind>/` holds whatever the user (e.g. unionfs's kernel metadata trees) derives
from that layer; the store never reads inside it. Keyed by DiffID, not by the layer's row id: SQLite may give a
removed layer's id to a new layer, and a tree left by the old one must never pass for the new one's. The contract:
- a <kind> directory is built elsewhere (`staging`, under the same directory, so the rename stays on one
  filesystem) with a file `complete` written last, then renamed into place (`publish`): a half-built one is never
  at its final path, and one without `complete` (a tree from before a crash, a hand edit) is not used;
- builders hold the store's shared lock, gc and fsck the exclusive one, so staging left over is always dead;
- gc removes what belongs to no stored layer and staging leftovers (`sweep`); fsck reports incomplete directories
  and those of missing layers (`problems`); df counts the bytes (`allocated`).
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from .root import Store

COMPLETE = "complete"
_STAGING = ".staging-"


def _dir(store: Store) -> Path:
    return store.root / "derived"


def path(store: Store, diff_id: str, kind: str) -> Path:
    """Where `kind` data of the layer with DiffID `diff_id` lives once published."""
    return _dir(store) / diff_id.removeprefix("sha256:") / kind


def is_complete(p: Path) -> bool:
    return os.path.isfile(p / COMPLETE)


def staging(store: Store, diff_id: str, kind: str) -> Path:
    """A fresh empty directory to build `kind` data in, beside its final place."""
    final = path(store, diff_id, kind)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{_STAGING}{kind}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o700)
    return tmp


def publish(tmp: Path, final: Path, marker: str = "") -> None:
    """Writes `complete` (with `marker`) into built directory `tmp` and renames it to `final`. An incomplete
    directory at `final` is replaced; a complete one (another builder won) is kept and `tmp` removed."""
    (tmp / COMPLETE).write_text(marker)
    if final.exists() and not is_complete(final):
        shutil.rmtree(final)
    try:
        os.rename(tmp, final)
    except OSError:  # ENOTEMPTY/EEXIST: published meanwhile by another builder
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_complete(final):
            raise


def _entries(store: Store) -> Iterator[tuple[str, Path]]:
    d = _dir(store)
    if not d.is_dir():
        return
    for layer in sorted(d.iterdir()):
        yield layer.name, layer


def _live(store: Store) -> set[str]:
    return {d.removeprefix("sha256:") for (d,) in store.db.execute("SELECT diff_id FROM layers")}


def sweep(store: Store) -> int:
    """Under the exclusive lock: removes the derived data of layers that are gone and staging leftovers; returns
    the bytes freed."""
    live, freed = _live(store), 0
    for name, layer in _entries(store):
        doomed = [layer] if name not in live else [k for k in layer.iterdir() if k.name.startswith(_STAGING)]
        for p in doomed:
            freed += allocated(p)
            shutil.rmtree(p, ignore_errors=True)
    return freed


def problems(store: Store, repair: bool) -> tuple[list[str], list[str]]:
    """Under the exclusive lock: (problems, repairs) — derived data of missing layers, incomplete directories."""
    live, found, fixed = _live(store), [], []
    for name, layer in _entries(store):
        bad = [(layer, "belongs to no stored layer")] if name not in live else [
            (k, "is incomplete (no `complete` marker)") for k in layer.iterdir()
            if not k.name.startswith(_STAGING) and not is_complete(k)]
        for p, why in bad:
            found.append(f"derived data {p} {why}")
            if repair:
                shutil.rmtree(p, ignore_errors=True)
                fixed.append(f"removed {p}")
    return found, fixed


def allocated(top: Path | None = None, store: Store | None = None) -> int:
    """Bytes allocated on disk under `top` (default: all of the store's derived data)."""
    if top is None:
        assert store is not None
        top = _dir(store)
    total, seen = 0, set()
    for dirpath, dirs, files in os.walk(top):
        for n in files + dirs:
            try:
                st = os.lstat(os.path.join(dirpath, n))
            except FileNotFoundError:
                continue
            if st.st_nlink > 1 and not dirs.count(n):  # a hardlinked file once
                if st.st_ino in seen:
                    continue
                seen.add(st.st_ino)
            total += st.st_blocks * 512
    return total
