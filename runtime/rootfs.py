"""The container's root filesystem: finding an image (its config and its layers) and mounting it with a fresh
container layer (upper + work directories), then unmounting it.

Two kinds of image: a store image (reference resolved by store.reader, mounted by lamina's union filesystem as
`lamina mount` mounts it, whose FUSE daemon runs in the caller's cgroup and PID namespace, never the container's),
and a plain directory given as an absolute or ./relative path (mounted with kernel overlayfs, like podman's
--rootfs), used for development and as an oracle.
"""
from __future__ import annotations

import errno
import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import linux

if TYPE_CHECKING:
    from unionfs.daemon import Standby, Starting


# The host's mount of a container's root filesystem honours neither the image's setuid bits nor its device nodes:
# the container's own mount of it (runtime.launch) decides what the container may use, and a host user must get
# nothing from it even given a path (the directories above are private too: paths.private_dir).
HOST_FLAGS = linux.MS_NOSUID | linux.MS_NODEV


class ImageNotFound(LookupError):
    pass


@dataclass
class Image:
    ref: str
    kind: str                                   # "dir" or "store"
    config: dict = field(default_factory=dict)  # OCI image config's "config": Env, Cmd, Entrypoint, WorkingDir, User
    path: str | None = None                     # the lower directory of a "dir" image
    id: str | None = None                       # the store's image id (a tag may move later)
    layer_ids: list[int] = field(default_factory=list)  # a "store" image's layers, bottom to top

    def to_json(self) -> dict:
        return {"ref": self.ref, "kind": self.kind, "path": self.path}


def is_dir_ref(ref: str) -> bool:
    return ref.startswith("/") or ref.startswith("./") or ref.startswith("../")


def resolve(root: str, ref: str) -> Image:
    if is_dir_ref(ref):
        path = os.path.abspath(ref)
        if not os.path.isdir(path):
            raise ImageNotFound(f"no such image directory: {ref}")
        return Image(ref=path, kind="dir", path=path,
                     config={"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]})
    try:
        from store.reader import open_store  # noqa: PLC0415 - optional until the store lands
    except ImportError:
        raise ImageNotFound(f"unable to find image {ref!r}: no image store available") from None
    try:
        with open_store(root) as st:  # closed before the detached supervisor closes inherited fds
            img = st.image(ref)
    except Exception as e:  # the store raises its own errors with a one-line message
        raise ImageNotFound(f"unable to find image {ref!r}: {e}") from None
    cfg = img.config.get("config") if isinstance(img.config, dict) else img.config  # checked by spec.check_config
    return Image(ref=ref, kind="store", config=cfg, id=img.id, layer_ids=list(img.layer_ids))


class Mounting:
    """A root filesystem being mounted: `wait` returns once it is ready, or raises OSError."""

    def __init__(self, ref: str, target: str, starting: Starting | None = None) -> None:
        self.ref = ref
        self.target = target
        self._starting = starting

    def wait(self) -> None:
        if self._starting is None:
            return
        starting, self._starting = self._starting, None
        if starting.wait() != 0:
            raise OSError(f"mounting {self.ref}: {starting.error}")
        linux.remount(self.target, HOST_FLAGS)


def standby(ref: str) -> Standby | None:
    """For a store image: the union filesystem's daemon, forked now to load its code while this process loads
    and prepares the rest (`start_mount` gives it its mount; `Standby.cancel` if none is needed after all)."""
    if is_dir_ref(ref):
        return None
    from unionfs.storemount import standby_store_mount  # noqa: PLC0415

    return standby_store_mount()


def start_mount(root: str, image: Image, upper: str, work: str, target: str,
                userns: tuple[int, int] | None = None, daemon: Standby | None = None,
                driver: str = "fuse") -> Mounting:
    """Begin mounting `image` with a fresh container layer at `target`; the caller may work meanwhile.

    A store image is served by lamina's union filesystem, its daemon forked from this process (no second
    interpreter), before any thread exists; it loads the union core itself, while this process goes on. The
    container holds the image in the store, so the mount takes no hold of its own.

    With `userns` (first host id, count) the filesystem shows stored ids 0.. as those host ids (fuse-overlayfs's
    uidmapping/gidmapping), so the container's root owns what the image's root owns, and what it creates is stored
    as owned by 0. The leading `0:0:1` (overridden by the later range for stored ids, as in fuse-overlayfs) stores
    what lamina itself creates there as host root (mount points for the /etc files and volumes, a missing working
    directory) as the image's root too.

    `driver` (unionfs.storemount.DRIVERS) may instead serve a store image by kernel overlayfs, without a daemon
    (not with `userns`: auto then takes the union filesystem). OSError when "kernel" cannot be had."""
    if image.kind == "store" and driver != "fuse":
        from unionfs.storemount import choose_driver, mount_kernel  # noqa: PLC0415

        if userns is not None and driver == "kernel":
            raise OSError("the kernel driver does not map owners (--userns): use --driver fuse")
        if userns is None and choose_driver(driver) == "kernel":
            mount_kernel(os.path.abspath(root), image.layer_ids, target, upper, work)
            linux.remount(target, HOST_FLAGS)
            return Mounting(image.ref, target)
    if image.kind == "dir":
        opts = f"lowerdir={image.path},upperdir={upper},workdir={work}"
        linux.mount("overlay", target, "overlay", HOST_FLAGS, opts)
        return Mounting(image.ref, target)
    from unionfs.storemount import start_store_mount  # noqa: PLC0415 - runtime -> unionfs, the allowed direction
    from unionfs.idmap import IdMapping  # noqa: PLC0415

    idmap = None
    if userns is not None:
        spec = f"0:0:1:0:{userns[0]}:{userns[1]}"
        idmap = IdMapping.parse(spec, spec)
    return Mounting(image.ref, target, start_store_mount(root, image.layer_ids, target, upper, work, idmap=idmap,
                                                 standby=daemon))


def umount(root: str, image_kind: str, target: str, release_hold: bool = False) -> None:
    """Unmount with umount(2), detaching lazily if it is busy; a dead daemon's mount (ENOTCONN) goes the same
    way, and the daemon of a live one exits when its mount goes. `release_hold`: the rootfs was mounted by an
    older lamina through `lamina mount`, which held the image under the mount point's name."""
    if release_hold and image_kind == "store":
        try:
            from store.holds import release  # noqa: PLC0415
            from store.root import Store  # noqa: PLC0415
            with Store(root) as st:
                release(st, f"mount:{os.path.realpath(target)}")
        except Exception as e:  # noqa: BLE001 - e.g. the store cannot release its hold: still unmount
            print(f"lamina: releasing the image of {target}: {e}", file=sys.stderr)
    try:
        linux.umount2(target, 0)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ENOENT):
            return  # not mounted (any more)
        if e.errno != errno.EBUSY:
            raise
        # Busy: a host process still uses it. Detach it now; the kernel frees it with its last user.
        linux.umount2(target, linux.MNT_DETACH)
