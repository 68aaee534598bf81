"""Whole-tree snapshots for comparing what two mounts show, exactly: the union's view against an image's."""
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
