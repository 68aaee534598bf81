"""Mounting an image from the store: the daemon's `build` for store layers, and starting that daemon (forked now,
or handed to a `Standby` forked earlier).

Kept apart from `unionfs.cli` so that neither a `Standby` daemon nor the job it unpickles (`store_overlay` is
pickled by reference) loads click: `lamina mount` and `lamina run` fork their daemon before loading click.
"""
from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~5 ms) before the daemon is forked
if TYPE_CHECKING:
    from collections.abc import Callable

    from .daemon import Standby, Starting
    from .idmap import IdMapping
    from .overlay import Overlay

# What a store mount's daemon loads before it is told what to mount.
PRELOAD = ("unionfs.idmap", "store.reader", "unionfs.layers", "unionfs.storelayer", "unionfs.overlay")


def store_overlay(root: str | None, layer_ids: list[int], upper: str | None, work: str | None,
                  read_only: bool = False, idmap: IdMapping | None = None) -> Callable[[], Overlay]:
    """The daemon's `build`: the union of store layers `layer_ids` (bottom to top) with an optional upper.

    The store's reader, like the whole union core, is opened in the daemon after the fork: no SQLite connection
    may cross a fork (the daemon's threads open their own), and the calling command never loads any of it.
    `root` must be absolute (None: the default store): the daemon works from "/"."""
    def build() -> Overlay:
        from store.reader import open_store  # noqa: PLC0415

        from .layers import DirLayer  # noqa: PLC0415
        from .overlay import Overlay  # noqa: PLC0415
        from .storelayer import StoreLayer  # noqa: PLC0415

        reader = open_store(root).reader()
        lowers = [StoreLayer(reader, lid) for lid in reversed(layer_ids)]
        if read_only and upper is not None:
            return Overlay([DirLayer(upper), *lowers], idmap=idmap)
        return Overlay(lowers, None if read_only else upper, None if read_only else work, idmap=idmap)
    return build


def standby_store_mount() -> Standby:
    """A daemon for a store mount yet to be chosen, loading all it will need meanwhile (`start_store_mount`)."""
    from .daemon import Standby  # noqa: PLC0415

    return Standby(preload=PRELOAD)


def start_store_mount(root: str | None, layer_ids: list[int], mountpoint: str, upper: str | None,
                      work: str | None, *, read_only: bool = False, log_path: str | None = None,
                      idmap: IdMapping | None = None, standby: Standby | None = None) -> Starting:
    """Start the daemon of a store image's union mount (in `standby` if given, else forked now) and return at once
    (`Starting.wait` for the outcome).

    For callers that keep the image in the store themselves (a container holds its image): no hold is taken."""
    from .daemon import start  # noqa: PLC0415

    if standby is not None:
        return standby.mount(store_overlay, {"root": root, "layer_ids": layer_ids, "upper": upper, "work": work,
                                             "read_only": read_only, "idmap": idmap},
                             mountpoint, read_only=read_only or upper is None, fsname="lamina", log_path=log_path)
    return start(store_overlay(root, layer_ids, upper, work, read_only, idmap), mountpoint,
                 read_only=read_only or upper is None, fsname="lamina", log_path=log_path)


DRIVERS = ("fuse", "kernel", "auto")


def choose_driver(driver: str) -> str:
    """"fuse" or "kernel" for `driver` (one of DRIVERS); OSError with a one-line reason when "kernel" is asked
    of a kernel that cannot serve the metadata trees (`auto` then takes FUSE)."""
    if driver == "fuse":
        return driver
    from .kerneltree import supported  # noqa: PLC0415

    if supported():
        return "kernel"
    if driver == "auto":
        return "fuse"
    raise OSError("the kernel driver needs overlayfs with data-only lower layers and metacopy (Linux 6.5+, "
                  "trusted xattrs on the store's filesystem): this kernel has not")


def mount_kernel(root: str, layer_ids: list[int], mountpoint: str, upper: str | None, work: str | None,
                 read_only: bool = False) -> None:
    """Mounts the store image with layers `layer_ids` (bottom to top) by kernel overlayfs, building the layers'
    metadata trees first where they are missing (`kerneltree`). No daemon: `lamina umount` is a plain umount."""
    from store.reader import StoreReader  # noqa: PLC0415
    from store.root import Store  # noqa: PLC0415

    from .kernelmount import mount_overlay  # noqa: PLC0415
    from .kerneltree import ensure_trees  # noqa: PLC0415

    store = Store(root)
    try:
        diff_ids = [store.db.execute("SELECT diff_id FROM layers WHERE id=?", (lid,)).fetchone()[0]
                    for lid in layer_ids]
        trees = ensure_trees(store, StoreReader(store), layer_ids, diff_ids)
    finally:
        store.close()
    lowers = list(reversed(trees))
    if read_only and upper is not None:
        lowers.insert(0, upper)
        upper = work = None
    mount_overlay(lowers, str(store.objects_dir), mountpoint, None if read_only else upper,
                  None if read_only else work, read_only=read_only or upper is None)
