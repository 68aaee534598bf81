"""The container's root filesystem: finding an image (its config and its layers) and mounting it with a fresh
container layer (upper + work directories), then unmounting it.

Two kinds of image: a store image (reference resolved by store.reader, mounted by lamina's union filesystem through
`lamina mount`, whose FUSE daemon runs in the caller's cgroup and PID namespace, never the container's), and a plain
directory given as an absolute or ./relative path (mounted with kernel overlayfs, like podman's --rootfs), used for
development and as an oracle.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

from . import linux


class ImageNotFound(LookupError):
    pass


@dataclass
class Image:
    ref: str
    kind: str                                   # "dir" or "store"
    config: dict = field(default_factory=dict)  # OCI image config's "config": Env, Cmd, Entrypoint, WorkingDir, User
    path: str | None = None                     # the lower directory of a "dir" image
    id: str | None = None                       # the store's image id (a tag may move later)

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
        st = open_store(root)
        img = st.image(ref)
    except Exception as e:  # the store raises its own errors with a one-line message
        raise ImageNotFound(f"unable to find image {ref!r}: {e}") from None
    cfg = dict((img.config or {}).get("config") or {})
    return Image(ref=ref, kind="store", config=cfg, id=img.id)


def _lamina(root: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runtime.cli", "--root", root, *args], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL)


def mount(root: str, image: Image, upper: str, work: str, target: str) -> None:
    if image.kind == "dir":
        opts = f"lowerdir={image.path},upperdir={upper},workdir={work}"
        linux.mount("overlay", target, "overlay", 0, opts)
        return
    r = _lamina(root, "mount", image.ref, target, "--upper", upper, "--work", work)
    if r.returncode != 0:
        raise OSError(f"mounting {image.ref}: {(r.stderr or r.stdout).strip() or 'lamina mount failed'}")


def is_mounted(target: str) -> bool:
    target = os.path.realpath(target)
    try:
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4] == target for line in f)
    except OSError:
        return False


def umount(root: str, image_kind: str, target: str) -> None:
    """Unmount, lazily if busy; for a store image also let `lamina umount` stop its daemon."""
    if not is_mounted(target):
        return
    if image_kind == "store":
        r = _lamina(root, "umount", target)
        if r.returncode == 0 and not is_mounted(target):
            return
    for _ in range(50):
        try:
            linux.umount2(target, 0)
            return
        except OSError as e:
            if not is_mounted(target):
                return
            if e.errno != 16:  # EBUSY: a process from the container is still exiting
                break
            time.sleep(0.02)
    linux.umount2(target, linux.MNT_DETACH)
