"""Who a container's command runs as: Docker's -u forms (UID, NAME, UID:GID, NAME:GROUP) and the image's `User`,
resolved against the image's /etc/passwd and /etc/group.

Those files are the image's, read by host root: they are opened beneath the root filesystem as if chrooted there
(openat2 RESOLVE_IN_ROOT, no magic links), only as regular files, and read up to a bound, so that neither a link
out of the image, nor a device node (1:5 would grow memory without end), nor a FIFO (a hang) gets through. Every id
must lie in 0…2^31−1 (as podman requires): 4294967295 is -1 to setresuid, and taken modulo 2^32 by the kernel's
id maps it would run the command as root.
"""
from __future__ import annotations

import errno
import os
import re
import stat

from . import linux
from .spec import MAX_ID, SpecError

MAX_DB = 16 << 20  # bytes of /etc/passwd or /etc/group read at most; a big site's passwd is a few MiB
_NUM = re.compile(r"[0-9]+")


def _open_in_root(root: str, path: str) -> int | None:
    """An O_PATH descriptor of `path` resolved beneath `root` as the container would (None if missing)."""
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return linux.openat2(root_fd, path.lstrip("/"), os.O_PATH,
                             linux.RESOLVE_IN_ROOT | linux.RESOLVE_NO_MAGICLINKS)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        raise SpecError(f"reading the image's {path}: {os.strerror(e.errno or 0)}") from None
    finally:
        os.close(root_fd)


def read_db(root: str, path: str) -> list[tuple[int, list[str]]]:
    """(line number, fields) of the image's colon-separated database at `path`; [] if it has none."""
    fd = _open_in_root(root, path)
    if fd is None:
        return []
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SpecError(f"the image's {path} is not a regular file")
        # Reopened through this process's own descriptor: the same inode, now known to be a regular file.
        rfd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    finally:
        os.close(fd)
    with os.fdopen(rfd, "rb") as f:
        data = f.read(MAX_DB + 1)
    if len(data) > MAX_DB:
        raise SpecError(f"the image's {path} is larger than {MAX_DB >> 20} MiB")
    text = data.decode("utf-8", "surrogateescape")
    return [(n, line.split(":")) for n, line in enumerate(text.split("\n"), 1)
            if line.strip() and not line.startswith("#")]


def parse_id(text: str, what: str) -> int:
    """A uid or gid given as text: digits, within 0…2^31−1. `what` names it in the error."""
    if not _NUM.fullmatch(text):
        raise SpecError(f"{what}: {text!r} is not a number")
    n = int(text)
    if n > MAX_ID:
        raise SpecError(f"{what}: {n} is out of range: uids and gids must be in range 0-{MAX_ID}")
    return n


def resolve_user(rootdir: str, user: str) -> tuple[int, int, list[int], str]:
    """(uid, gid, supplementary groups, home) for Docker's -u forms: UID, NAME, UID:GID, NAME:GROUP."""
    name, _, group = user.partition(":")
    passwd = [(n, r) for n, r in read_db(rootdir, "/etc/passwd") if len(r) >= 6]
    groups = [(n, r) for n, r in read_db(rootdir, "/etc/group") if len(r) >= 3]

    def where(db: str, n: int) -> str:
        return f"the image's /etc/{db}, line {n}"

    home = "/"
    if _NUM.fullmatch(name):
        uid = parse_id(name, f"invalid user {user!r}")
        found = next(((n, r) for n, r in passwd if r[2] == name), None)
    else:
        found = next(((n, r) for n, r in passwd if r[0] == name), None)
        if found is None:
            raise SpecError(f"unable to find user {name}: no matching entries in passwd file")
        uid = parse_id(found[1][2], f"{where('passwd', found[0])}: uid")
    gid = parse_id(found[1][3], f"{where('passwd', found[0])}: gid") if found else 0
    if found:
        home = found[1][5] or "/"
    if group:
        if _NUM.fullmatch(group):
            gid = parse_id(group, f"invalid user {user!r}")
        else:
            g = next(((n, r) for n, r in groups if r[0] == group), None)
            if g is None:
                raise SpecError(f"unable to find group {group}: no matching entries in group file")
            gid = parse_id(g[1][2], f"{where('group', g[0])}: gid")
    supp = []
    if found:
        for n, g in groups:
            if len(g) >= 4 and found[1][0] in g[3].split(","):
                supp.append(parse_id(g[2], f"{where('group', n)}: gid"))
    return uid, gid, sorted({gid, *supp}), home
