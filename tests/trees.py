"""Whole trees in tests: snapshots for comparing what two mounts show, exactly (the union's view against an
image's), and trees deeper than PATH_MAX allows a path to name, built one directory descriptor at a time."""
from __future__ import annotations

import hashlib
import os
import stat


def snapshot(root: str, skip: frozenset[str] = frozenset()) -> tuple[dict[str, tuple], set[frozenset[str]]]:
    """Every path below `root` (a mount): type, mode, owner, size, ns mtime, link target, rdev, nlink, xattrs and
    content; and the hardlink groups (names sharing an inode)."""
    out: dict[str, tuple] = {}
    by_ino: dict[int, list[str]] = {}
    todo = ["/"]
    while todo:
        p = todo.pop()
        real = root if p == "/" else root + p
        st = os.lstat(real)
        fmt = stat.S_IFMT(st.st_mode)
        xattrs = tuple(sorted((n, os.getxattr(real, n, follow_symlinks=False))
                              for n in os.listxattr(real, follow_symlinks=False)))
        content = target = None
        if fmt == stat.S_IFREG:
            with open(real, "rb") as f:
                content = hashlib.sha256(f.read()).hexdigest()
        elif fmt == stat.S_IFLNK:
            target = os.readlink(real)
        is_dir = fmt == stat.S_IFDIR
        out[p] = (fmt, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, None if is_dir else st.st_size,
                  st.st_mtime_ns, target, st.st_rdev, None if is_dir else st.st_nlink, xattrs, content)
        if is_dir:
            for n in os.listdir(real):
                c = p.rstrip("/") + "/" + n
                if c not in skip:
                    todo.append(c)
        elif st.st_nlink > 1:
            by_ino.setdefault(st.st_ino, []).append(p)
    return out, {frozenset(v) for v in by_ino.values() if len(v) > 1}


def assert_same_tree(got: tuple, want: tuple) -> None:
    g, w = got[0], want[0]
    diffs = [f"{p}: image {g.get(p)} != container {w.get(p)}" for p in sorted(set(g) | set(w)) if g.get(p) != w.get(p)]
    assert not diffs, f"{len(diffs)} paths differ:\n" + "\n".join(diffs[:20])
    assert got[1] == want[1], f"hardlink groups differ: image {got[1] ^ want[1] & got[1]}, container {want[1] - got[1]}"


def descend(top: str | os.PathLike, names: list[str], make: bool = False, exist_ok: bool = False) -> int:
    """A descriptor of directory top/names[0]/…/names[-1], reached one component at a time as a program descending
    a tree does (the path may pass PATH_MAX); each made first if `make` (an existing one kept if `exist_ok`)."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for n in names:
        if make:
            try:
                os.mkdir(n, dir_fd=fd)
            except FileExistsError:
                if not exist_ok:
                    os.close(fd)
                    raise
        nxt = os.open(n, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    return fd


def deep_tree(top: str | os.PathLike, depth: int, name: str = "d", leaf: str = "f", text: str = "deep\n",
              exist_ok: bool = False) -> list[str]:
    """top/name/…/name (`depth` levels) holding file `leaf` with `text`; returns the path's components."""
    fd = descend(top, [name] * depth, make=True, exist_ok=exist_ok)
    try:
        with open(os.open(leaf, os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd), "w") as f:
            f.write(text)
    finally:
        os.close(fd)
    return [name] * depth
