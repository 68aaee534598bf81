"""`lamina-fs`: a drop-in for fuse-overlayfs over plain directories.

    lamina-fs [-f] [-d] -o lowerdir=L1:L2[,upperdir=U,workdir=W][,ro][,log=FILE][,nopassthrough][,noio_uring]
              [,uidmapping=M,gidmapping=M] MOUNTPOINT
    mount -t fuse.lamina-fs lamina-fs MOUNTPOINT -o lowerdir=...      (mount.fuse3 passes: lamina-fs SRC MNT -o ...)

`lowerdir=l1:l2` puts l1 on top, as overlayfs does. Without an upperdir the mount is read-only.
`uidmapping=`/`gidmapping=` translate owners as fuse-overlayfs's do (unionfs.idmap). Generic mount options (rw,
dev, suid, context=..., ...) and fuse-overlayfs/overlayfs tuning options are accepted and ignored.
Hand-parsed rather than argparse/click because the syntax is mount(8)'s (`-o a,b=c` anywhere, repeatable).
"""
from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from .daemon import exit_now, ino_tags, run
from .idmap import IdMapping

if TYPE_CHECKING:
    from .overlay import Overlay

PROG = "lamina-fs"
USAGE = (f"usage: {PROG} [-f] [-d] -o lowerdir=DIR[:DIR...][,upperdir=DIR,workdir=DIR]"
         "[,uidmapping=C:H:N[:C:H:N...],gidmapping=C:H:N[:C:H:N...]] MOUNTPOINT")
_IGNORED = {
    "rw", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "atime", "noatime", "relatime", "strictatime",
    "nodiratime", "diratime", "sync", "async", "dirsync", "allow_other", "allow_root", "default_permissions",
    "auto", "noauto", "user", "users", "nouser", "nofail", "_netdev", "defaults", "userxattr", "volatile",
    "squash_to_root", "static_nlink", "noacl", "acl", "fast_ino", "lazytime", "nolazytime", "silent", "loud",
}
_IGNORED_KEYS = {
    "context", "fscontext", "defcontext", "rootcontext", "fsync", "noxattrs", "xattr_permissions", "squash_to_uid",
    "squash_to_gid", "timeout", "threaded", "redirect_dir", "index", "metacopy", "xino",
    "nfs_export", "plugins", "max_idle_threads", "fsname", "subtype", "uid", "gid", "umask",
}


class UsageError(Exception):
    pass


class Args:
    def __init__(self) -> None:
        self.lowers: list[str] = []
        self.upper: str | None = None
        self.work: str | None = None
        self.mountpoint = ""
        self.foreground = False
        self.debug = False
        self.read_only = False
        self.log: str | None = None
        self.idmap: IdMapping | None = None


def parse(argv: list[str]) -> Args:
    a = Args()
    opts: list[str] = []
    pos: list[str] = []
    i = 0
    while i < len(argv):
        x = argv[i]
        if x == "-o":
            if i + 1 >= len(argv):
                raise UsageError("option -o needs a value")
            opts.append(argv[i + 1])
            i += 2
            continue
        if x.startswith("-o") and len(x) > 2:
            opts.append(x[2:])
        elif x == "-f":
            a.foreground = True
        elif x == "-d":
            a.debug = a.foreground = True
        elif x in ("-s", "-n", "-v"):
            pass  # fuse's single-thread flag and mount(8)'s no-mtab/verbose flags: nothing to do
        elif x in ("-h", "--help"):
            raise UsageError("help")
        elif x.startswith("-"):
            raise UsageError(f"unknown flag {x}")
        else:
            pos.append(x)
        i += 1
    if len(pos) == 2:
        pos = pos[1:]  # mount.fuse3's form puts the source first
    if len(pos) != 1:
        raise UsageError("expected exactly one mountpoint" if pos else "no mountpoint given")
    a.mountpoint = os.path.abspath(pos[0])
    maps: dict[str, str] = {}
    for group in opts:
        for opt in group.split(","):
            if not opt:
                continue
            key, eq, val = opt.partition("=")
            if key == "lowerdir":
                a.lowers = [os.path.abspath(p) for p in val.split(":") if p]
            elif key == "upperdir":
                a.upper = os.path.abspath(val)
            elif key == "workdir":
                a.work = os.path.abspath(val)
            elif key == "ro" and not eq:
                a.read_only = True
            elif key == "log":
                a.log = os.path.abspath(val)
            elif key == "debug":
                a.debug = True
            elif key in ("uidmapping", "gidmapping"):
                maps[key] = val
            elif key == "nopassthrough" and not eq:
                # read by the FUSE front end at INIT (unionfs/passthrough.py says what this trades)
                os.environ["LAMINA_FS_PASSTHROUGH"] = "0"
            elif key == "noio_uring" and not eq:
                os.environ["LAMINA_FS_IO_URING"] = "0"  # read by fuse.serve: /dev/fuse, even where io_uring is on
            elif key in _IGNORED or key in _IGNORED_KEYS or key.startswith("x-"):
                pass
            else:
                print(f"{PROG}: ignoring unknown option {opt}", file=sys.stderr)
    try:
        a.idmap = IdMapping.parse(maps.get("uidmapping"), maps.get("gidmapping"))
    except ValueError as e:
        raise UsageError(str(e)) from None
    return a


def _is_dir(label: str, path: str) -> None:
    if not os.path.exists(path):
        raise UsageError(f"{label} {path}: No such file or directory")
    if not os.path.isdir(path):
        raise UsageError(f"{label} {path}: Not a directory")


def _inside(child: str, parent: str) -> bool:
    c, p = os.path.realpath(child), os.path.realpath(parent)
    return c == p or c.startswith(p.rstrip("/") + "/")


def validate(a: Args) -> None:
    if not a.lowers:
        raise UsageError("no lowerdir given")
    for lower in a.lowers:
        _is_dir("lowerdir", lower)
    check_upper_work(a.upper, a.work)
    _is_dir("mountpoint", a.mountpoint)


def check_upper_work(upper: str | None, work: str | None, names: tuple[str, str] = ("upperdir", "workdir")) -> None:
    """The checks kernel overlayfs makes of an upper/work pair, as one-line UsageErrors."""
    un, wn = names
    if (upper is None) != (work is None):
        raise UsageError(f"{un} and {wn} must be given together")
    if upper is None or work is None:
        return
    _is_dir(un, upper)
    _is_dir(wn, work)
    if os.stat(upper).st_dev != os.stat(work).st_dev:
        raise UsageError(f"{un} and {wn} must be on the same filesystem")
    if _inside(work, upper) or _inside(upper, work):
        raise UsageError(f"{un} and {wn} must be separate subtrees")
    if not os.access(upper, os.W_OK):
        raise UsageError(f"{un} {upper}: Permission denied")


def build(a: Args) -> Overlay:
    from .layers import DirLayer  # noqa: PLC0415 - the union core loads in the daemon, after the fork
    from .overlay import Overlay  # noqa: PLC0415

    upper = None if a.read_only else a.upper
    tags = ino_tags(upper, [os.stat(p).st_dev for p in a.lowers])
    lowers = [DirLayer(p, tag) for p, tag in zip(a.lowers, tags)]
    if a.read_only and a.upper is not None:
        lowers.insert(0, DirLayer(a.upper, 0))  # `ro` with an upper: show it, change nothing
    return Overlay(lowers, upper, None if upper is None else a.work, idmap=a.idmap)


def main(argv: list[str] | None = None) -> int:
    """The program (`argv` None: sys.argv, and the process ends here once mounted) or a call with `argv`."""
    try:
        a = parse(sys.argv[1:] if argv is None else argv)
        validate(a)
    except UsageError as e:
        if str(e) == "help":
            print(USAGE)
            return 0
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    read_only = a.read_only or a.upper is None
    try:
        rc = run(lambda: build(a), a.mountpoint, foreground=a.foreground, read_only=read_only, debug=a.debug,
                 log_path=a.log, prog=PROG)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - one line for the user, not a traceback
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    if argv is None:
        # The program's caller waits for this exit to use the mount: skip the interpreter's teardown (~3-7 ms).
        exit_now(rc)
    return rc


if __name__ == "__main__":
    sys.exit(main())
