"""`lamina mount` and `lamina umount`: an image from the store as a union mount, and taking any union mount down.

`lamina mount IMAGE MOUNTPOINT [--upper DIR --work DIR] [--read-only] [--uidmapping M] [--gidmapping M]` mounts
the image's layers (bottom to top in the store, topmost first in the union) with an optional writable upper, owners
translated as fuse-overlayfs's uidmapping/gidmapping do, and returns once the mount is ready while a daemon serves it
(`-f` stays in the foreground); `lamina` forks the daemon of such a mount before it loads click (`runtime.cli`) and
passes it here as `ctx.obj["standby"]`. `lamina umount MOUNTPOINT` unmounts, lazily if it is busy, and also clears
the dead mount a killed daemon leaves behind ("Transport endpoint is not connected").
"""
from __future__ import annotations

import os
import sys

import click

from .daemon import Standby, exit_now, run
from .fsmain import UsageError, _is_dir, check_upper_work
from .idmap import IdMapping
from .storemount import DRIVERS, choose_driver, mount_kernel, standby_store_mount, start_store_mount, store_overlay

TYPE_CHECKING = False
if TYPE_CHECKING:
    from store.reader import Image, OpenStore

__all__ = ["COMMANDS", "standby_store_mount", "start_store_mount", "store_overlay"]

# umount(8)'s exit status for "unmount failed", kept for users who script around it
UMOUNT_FAILED = 32


def _fail(msg: str, code: int = 1) -> None:
    click.echo(f"lamina: {msg}", err=True)
    sys.exit(code)


@click.command("mount")
@click.argument("image")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--upper", metavar="DIR", help="Writable upper directory (kernel overlayfs format).")
@click.option("--work", metavar="DIR", help="Work directory, on the same filesystem as --upper.")
@click.option("--read-only", is_flag=True, help="Mount read-only (the upper, if given, is shown but not changed).")
@click.option("-f", "--foreground", is_flag=True, help="Stay in the foreground until unmounted.")
@click.option("--log", metavar="FILE", help="Append the daemon's log to FILE (default: syslog, if any).")
@click.option("--uidmapping", metavar="C:H:N[:C:H:N...]",
              help="Show stored uids C.. as host uids H.. (N of them), as fuse-overlayfs's -o uidmapping.")
@click.option("--gidmapping", metavar="C:H:N[:C:H:N...]", help="The same for gids.")
@click.option("--driver", type=click.Choice(DRIVERS), default="fuse", show_default=True,
              help="fuse: lamina's union filesystem; kernel: kernel overlayfs over per-layer metadata trees and the "
                   "store's objects (Linux 6.5+); auto: kernel where supported, else fuse.")
@click.pass_context
def mount_cmd(ctx: click.Context, image: str, mountpoint: str, upper: str | None, work: str | None,
              read_only: bool, foreground: bool, log: str | None, uidmapping: str | None,
              gidmapping: str | None, driver: str) -> None:
    """Mount IMAGE from the store at MOUNTPOINT as a copy-on-write union filesystem."""
    from store.errors import StoreError
    from store.holds import hold, release
    from store.reader import open_store

    mountpoint = os.path.abspath(mountpoint)
    upper = os.path.abspath(upper) if upper else None
    work = os.path.abspath(work) if work else None
    try:
        check_upper_work(upper, work, ("--upper", "--work"))
        _is_dir("mountpoint", mountpoint)
        idmap = IdMapping.parse(uidmapping, gidmapping)
    except (UsageError, ValueError) as e:
        _fail(str(e))
    obj = ctx.obj or {}
    standby: Standby | None = obj.get("standby")
    try:
        st = open_store(obj.get("root"))
        img = st.image(image)
    except StoreError as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"store: {e.strerror or e}")
    root = st.root  # absolute: the daemon works from "/"
    asked = driver
    if driver != "fuse" and (foreground or idmap is not None):
        if driver == "kernel":
            _fail("the kernel driver takes neither --foreground nor --uidmapping/--gidmapping")
        driver = "fuse"
    try:
        driver = choose_driver(driver)
    except OSError as e:
        _fail(str(e))

    # The store keeps a mounted image (gc spares its objects, rmi needs -f) until `lamina umount` releases it.
    holder = f"mount:{os.path.realpath(mountpoint)}"
    hold(st.store, holder, img.id)
    # No SQLite connection may cross the daemon's fork (SQLite forbids it; the daemon's threads open their own).
    st.close()
    if driver == "kernel":
        if standby is not None:
            standby.cancel()
        _mount_kernel(st, holder, img, mountpoint, upper, work, read_only)
    log_path = os.path.abspath(log) if log else None
    rc = 1
    try:
        if foreground:
            if standby is not None:
                standby.cancel()
            rc = run(store_overlay(root, img.layer_ids, upper, work, read_only, idmap), mountpoint,
                     foreground=True, read_only=read_only or upper is None, fsname="lamina", log_path=log_path,
                     prog="lamina")
        else:
            starting = start_store_mount(root, img.layer_ids, mountpoint, upper, work, read_only=read_only,
                                         log_path=log_path, idmap=idmap, standby=standby)
            rc = starting.wait()
            if rc != 0:
                click.echo(f"lamina: {starting.error}", err=True)
            elif asked == "auto":
                click.echo("lamina: mounted with the fuse driver", err=True)
    finally:
        if rc != 0 or foreground:
            release(st.store, holder)
    # Whoever ran `lamina mount` waits for this exit to use the mount: no interpreter teardown (~5-10 ms here).
    exit_now(rc)


def _mount_kernel(st: OpenStore, holder: str, img: Image, mountpoint: str, upper: str | None, work: str | None,
                  read_only: bool) -> None:
    from store.errors import StoreError
    from store.holds import release
    try:
        mount_kernel(st.root, img.layer_ids, mountpoint, upper, work, read_only)
    except (OSError, StoreError) as e:
        release(st.store, holder)
        _fail(f"{mountpoint}: {e.strerror if isinstance(e, OSError) and e.strerror else e}")
    click.echo("lamina: mounted with the kernel driver", err=True)
    exit_now(0)


def _mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def _release_hold(root: str | None, mountpoint: str) -> None:
    from store.holds import release
    from store.root import Store, default_root
    if os.path.exists(os.path.join(root or default_root(), "index.db")):  # never create a store to unmount
        release(Store(root), f"mount:{mountpoint}")


@click.command("umount")
@click.argument("mountpoint", type=click.Path())
@click.pass_context
def umount_cmd(ctx: click.Context, mountpoint: str) -> None:
    """Unmount a lamina mount (lazily when busy); also clears the mount of a killed daemon."""
    mountpoint = os.path.realpath(mountpoint)
    _release_hold((ctx.obj or {}).get("root"), mountpoint)
    if not _mounted(mountpoint):
        _fail(f"{mountpoint}: not mounted", UMOUNT_FAILED)
    import subprocess  # noqa: PLC0415

    err = ""
    for cmd in (["fusermount3", "-u", "-q", mountpoint], ["umount", mountpoint], ["umount", "-l", mountpoint]):
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            err = p.stderr.strip() or err
        except (OSError, subprocess.TimeoutExpired) as e:
            err = str(e)
        if not _mounted(mountpoint):
            return
    _fail(f"{mountpoint}: {err.splitlines()[-1] if err else 'could not unmount'}", UMOUNT_FAILED)


COMMANDS = [mount_cmd, umount_cmd]
