"""The container's root filesystem: finding an image (its config and its layers) and mounting it with a fresh
container layer (upper + work directories), then unmounting it.

Two kinds of image: a store image (reference resolved by store.reader, mounted by lamina's union filesystem through
`lamina mount`, whose FUSE daemon runs in the caller's cgroup and PID namespace, never the container's), and a plain
directory given as an absolute or ./relative path (mounted with kernel overlayfs, like podman's --rootfs), used for
development and as an oracle.
"""
from __future__ import annotations

import contextlib
import errno
import io
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

import click

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
        with open_store(root) as st:  # closed before the detached supervisor closes inherited fds
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
    args = [image.id or image.ref, target, "--upper", upper, "--work", work]
    try:
        from unionfs.cli import mount_cmd  # noqa: PLC0415 - runtime -> unionfs, the allowed direction
    except ImportError:
        mount_cmd = None
    if mount_cmd is None:
        r = _lamina(root, "mount", *args)
        if r.returncode != 0:
            raise OSError(f"mounting {image.ref}: {(r.stderr or r.stdout).strip() or 'lamina mount failed'}")
        return
    # `lamina mount` run in this process: the same command and contract, without starting another interpreter.
    # Its daemon forks from here before any thread exists and detaches; it must not keep the caller's other fds.
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            mount_cmd.main(args, prog_name="lamina mount", standalone_mode=False, obj={"root": root})
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except click.ClickException as e:
        err.write(e.format_message())
        code = 1
    if code != 0 or not is_mounted(target):
        msg = err.getvalue().strip().splitlines()
        raise OSError(f"mounting {image.ref}: {msg[-1].removeprefix('lamina: ') if msg else 'lamina mount failed'}")


def is_mounted(target: str) -> bool:
    target = os.path.realpath(target)
    try:
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4] == target for line in f)
    except OSError:
        return False


def umount(root: str, image_kind: str, target: str) -> None:
    """Unmount, lazily if busy. A store image goes through `lamina umount` (run in this process), which also
    releases the store's hold on the image; a dead daemon's mount (ENOTCONN) goes the same way."""
    if image_kind == "store":
        try:
            from unionfs.cli import umount_cmd  # noqa: PLC0415
        except ImportError:
            umount_cmd = None
        if umount_cmd is not None:
            try:
                with contextlib.redirect_stderr(io.StringIO()):
                    umount_cmd.main([target], prog_name="lamina umount", standalone_mode=False, obj={"root": root})
            except (SystemExit, click.ClickException):
                pass  # not mounted, or busy: the loop below retries and falls back to a lazy unmount
            except Exception as e:  # noqa: BLE001 - e.g. the store cannot release its hold: still unmount
                print(f"lamina: releasing the image of {target}: {e}", file=sys.stderr)
    if not is_mounted(target):
        return
    for _ in range(50):
        try:
            linux.umount2(target, 0)
            return
        except OSError as e:
            if not is_mounted(target):
                return
            if e.errno != errno.EBUSY:  # a process from the container may still be exiting
                break
            time.sleep(0.02)
    linux.umount2(target, linux.MNT_DETACH)
