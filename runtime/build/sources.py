"""What COPY and ADD read and write: the build context (with `.dockerignore`) or another image's files
(`COPY --from`), the sources an instruction names (globs, symlinks followed only inside the context), their checksum
for the build cache (contents, modes, owners, link targets and names; never mtimes), and the layer they make.

A layer written here holds only what the instruction copies: existing parent directories are left out (the store
records absent parents as implicit and the union shows the lower's), so a COPY never changes a lower directory's
owner or mode. `.dockerignore` follows moby/patternmatcher: lines cleaned, `#` comments, `**` across directories,
`*`/`?`/`[...]` within one name, `!` exceptions, the last matching line deciding, a path excluded with its parent.
"""
from __future__ import annotations

import fnmatch
import hashlib
import os
import posixpath
import re
import stat
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from store.dirtar import LayerTar, Member


class SourceError(Exception):
    """A COPY/ADD that cannot be done; the message is shown as is."""


@dataclass(frozen=True)
class Stat:
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    rdev: int = 0
    link: object = None  # a file with several names: the same key on each (kept as hardlinks when copied)


class Tree:
    """A file tree read by relative POSIX paths ("" is its root)."""

    def lstat(self, rel: str) -> Stat | None: ...
    def listdir(self, rel: str) -> list[str]: ...
    def readlink(self, rel: str) -> str: ...
    def open(self, rel: str) -> int: ...


class DirTree(Tree):
    def __init__(self, root: str, ignore: Callable[[str], bool] | None = None) -> None:
        self.root = os.path.realpath(root)
        self.ignored = ignore or (lambda rel: False)

    def _real(self, rel: str) -> str:
        return os.path.join(self.root, rel) if rel else self.root

    def _lstat(self, rel: str) -> Stat | None:
        try:
            st = os.lstat(self._real(rel))
        except (FileNotFoundError, NotADirectoryError):
            return None
        link = (st.st_dev, st.st_ino) if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode) else None
        return Stat(st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_rdev, link)

    def lstat_kept(self, rel: str) -> bool:
        """An excluded directory stays when a `!` exception keeps something below it (Docker walks into it)."""
        if not self.ignored(rel):
            return True
        if not getattr(self.ignored, "exceptions", False) or not os.path.isdir(self._real(rel)):
            return False
        for d, dirs, files in os.walk(self._real(rel)):
            for n in dirs + files:
                if not self.ignored(os.path.relpath(os.path.join(d, n), self.root)):
                    return True
        return False

    def lstat(self, rel: str) -> Stat | None:
        if rel and not self.lstat_kept(rel):
            return None
        return self._lstat(rel)

    def listdir(self, rel: str) -> list[str]:
        return sorted(n for n in os.listdir(self._real(rel)) if self.lstat_kept(posixpath.join(rel, n)))

    def readlink(self, rel: str) -> str:
        return os.readlink(self._real(rel))

    def open(self, rel: str) -> int:
        return os.open(self._real(rel), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)


class ImageTree(Tree):
    """An image's merged files, read in this process through the union's core (no mount)."""

    def __init__(self, root: str, layer_ids: list[int]) -> None:
        from store.reader import open_store  # noqa: PLC0415
        from unionfs.overlay import Overlay  # noqa: PLC0415
        from unionfs.storelayer import StoreLayer  # noqa: PLC0415

        self.store = open_store(root)
        reader = self.store.reader()
        self.ov = Overlay([StoreLayer(reader, lid) for lid in reversed(layer_ids)]) if layer_ids else None

    def _node(self, rel: str):
        if self.ov is None:
            return None
        try:
            return self.ov.resolve("/" + rel)
        except OSError:
            return None

    def lstat(self, rel: str) -> Stat | None:
        if self.ov is None:
            return Stat(stat.S_IFDIR | 0o755, 0, 0, 0, 0) if rel == "" else None
        n = self._node(rel)
        if n is None:
            return None
        r = n.rec
        return Stat(r.mode, r.uid, r.gid, r.size, r.mtime_ns, r.rdev,
                    r.ino if r.nlink > 1 and not stat.S_ISDIR(r.mode) else None)

    def listdir(self, rel: str) -> list[str]:
        if self.ov is None:
            return []
        return sorted(self.ov.readdir_names("/" + rel)[2:])

    def readlink(self, rel: str) -> str:
        return self.ov.readlink("/" + rel)

    def open(self, rel: str) -> int:
        n = self._node(rel)
        return self.ov.layers[n.layer].open_read(n.lpath)

    def close(self) -> None:
        self.store.close()


# -- .dockerignore ---------------------------------------------------------------------------------------------

def _pattern_regex(pat: str) -> re.Pattern[str]:
    out, i = [], 0
    while i < len(pat):
        c = pat[i]
        if pat.startswith("**", i):
            i += 2
            if pat.startswith("/", i):
                out.append("(?:.*/)?")
                i += 1
            else:
                out.append(".*")
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = pat.find("]", i + 1)
            if j < 0:
                out.append(re.escape(c))
            else:
                body = pat[i + 1:j]
                out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
                i = j
        elif c == "\\" and i + 1 < len(pat):
            i += 1
            out.append(re.escape(pat[i]))
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def read_dockerignore(context: str) -> Callable[[str], bool]:
    """Whether a context-relative path is excluded by the context's .dockerignore."""
    try:
        with open(os.path.join(context, ".dockerignore"), encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return lambda rel: False
    rules: list[tuple[bool, re.Pattern[str]]] = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        if neg:
            line = line[1:].strip()
        line = posixpath.normpath(line).lstrip("/")
        if line in ("", "."):
            continue
        rules.append((neg, _pattern_regex(line)))
    if not rules:
        return lambda rel: False

    def ignored(rel: str) -> bool:
        parts = rel.split("/")
        prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
        out = False
        for neg, rx in rules:
            if any(rx.match(p) for p in prefixes):
                out = not neg
        return out
    ignored.exceptions = any(neg for neg, _ in rules)  # type: ignore[attr-defined]
    return ignored


# -- naming sources --------------------------------------------------------------------------------------------

def _clean_source(src: str, inst: str) -> str:
    if src.startswith("/"):
        raise SourceError(f"{inst} failed: {src}: an absolute source path names something outside the build "
                          "context")
    norm = posixpath.normpath(src)
    if norm == ".." or norm.startswith("../"):
        raise SourceError(f"{inst} failed: {src}: outside the build context")
    return "" if norm == "." else norm


def follow(tree: Tree, rel: str, inst: str, what: str, confined: bool) -> str:
    """`rel` with its symlinks resolved inside `tree`. In the context (`confined`) a link that leads out is
    refused; in an image, as in a container, `..` stops at the root."""
    parts = [p for p in rel.split("/") if p]
    done: list[str] = []
    hops = 0
    while parts:
        p = parts.pop(0)
        if p == ".":
            continue
        if p == "..":
            if not done and confined:
                raise SourceError(f"{inst} failed: {what}: leads outside the build context")
            if done:
                done.pop()
            continue
        cur = "/".join(done + [p])
        st = tree.lstat(cur)
        if st is not None and stat.S_ISLNK(st.mode):
            hops += 1
            if hops > 40:
                raise SourceError(f"{inst} failed: {what}: too many levels of symbolic links")
            target = tree.readlink(cur)
            if target.startswith("/"):
                if confined:
                    raise SourceError(f"{inst} failed: {what}: a symlink to {target}, outside the build context")
                done = []
            parts = [x for x in target.split("/") if x] + parts
            continue
        done.append(p)
    return "/".join(done)


def _glob(tree: Tree, pattern: str) -> list[str]:
    found = [""]
    for seg in pattern.split("/"):
        nxt = []
        for base in found:
            if not any(ch in seg for ch in "*?["):
                cand = posixpath.join(base, seg) if base else seg
                if tree.lstat(cand) is not None:
                    nxt.append(cand)
                continue
            st = tree.lstat(base)
            if st is None or not stat.S_ISDIR(st.mode):
                continue
            nxt += [posixpath.join(base, n) if base else n for n in tree.listdir(base) if fnmatch.fnmatchcase(n, seg)]
        found = nxt
    return sorted(found)


def resolve_sources(tree: Tree, srcs: list[str], inst: str, confined: bool) -> list[str]:
    """Every source named, globs expanded, each followed through its symlinks."""
    out: list[str] = []
    for src in srcs:
        rel = _clean_source(src, inst) if confined else posixpath.normpath("/" + src).lstrip("/")
        if any(ch in rel for ch in "*?["):
            hits = _glob(tree, rel)
            if not hits:
                raise SourceError(f"{inst} failed: no source files were specified: no match for {src!r}")
        else:
            hits = [rel]
        for h in hits:
            real = follow(tree, h, inst, src, confined)
            if tree.lstat(real) is None:
                raise SourceError(f"{inst} failed: file not found in build context or excluded by "
                                  f".dockerignore: {src}" if confined else f"{inst} failed: {src}: no such file")
            out.append(real)
    return out


# -- the copy plan -----------------------------------------------------------------------------------------------

@dataclass
class Item:
    dest: str                     # absolute path in the image
    st: Stat
    tree: Tree | None = None      # where the content / link target is read
    rel: str = ""
    target: str | None = None
    link: str | None = None       # hardlink group (archives)
    data: Callable[[], int] | None = None


def _walk(tree: Tree, rel: str) -> Iterator[str]:
    todo = [rel]
    while todo:
        r = todo.pop()
        yield r
        st = tree.lstat(r)
        if st is not None and stat.S_ISDIR(st.mode):
            todo.extend(posixpath.join(r, n) if r else n for n in reversed(tree.listdir(r)))


def plan(tree: Tree, sources: list[str], dest: str, dest_is_dir: bool, owner: tuple[int, int] | None,
         chmod: int | None, unpack: Callable[[str, Stat], list[Item] | None] | None = None) -> list[Item]:
    """The files one COPY/ADD writes, by their paths in the image. `dest` absolute; `dest_is_dir`: the sources
    go into it (a trailing '/', several sources, or an existing directory)."""
    items: list[Item] = []

    def add(dest_path: str, r: str) -> None:
        st = tree.lstat(r)
        assert st is not None
        mode = st.mode if chmod is None or stat.S_ISLNK(st.mode) else stat.S_IFMT(st.mode) | chmod
        uid, gid = owner or (0, 0)
        items.append(Item(dest_path, Stat(mode, uid, gid, st.size if stat.S_ISREG(st.mode) else 0, st.mtime_ns,
                                          st.rdev), tree, r,
                          tree.readlink(r) if stat.S_ISLNK(st.mode) else None, st.link))

    for src in sources:
        st = tree.lstat(src)
        assert st is not None
        if stat.S_ISDIR(st.mode):
            for r in _walk(tree, src):
                if r == src:
                    continue
                add(posixpath.join(dest, posixpath.relpath(r, src) if src else r), r)
            continue
        if unpack is not None:
            got = unpack(src, st)
            if got is not None:
                items += [Item(posixpath.join(dest, i.dest.lstrip("/")), i.st, i.tree, i.rel, i.target, i.link,
                               i.data) for i in got]
                continue
        add(posixpath.join(dest, posixpath.basename(src)) if dest_is_dir else dest, src)
    return items


def checksum(items: list[Item]) -> str:
    """The cache's view of a copy: names, types, modes, owners, sizes, contents and link targets, not mtimes."""
    h = hashlib.sha256()
    first: dict[object, str] = {}  # hardlink groups by their first name, not by inode numbers
    for it in sorted(items, key=lambda i: i.dest):
        s = it.st
        group = None if it.link is None else first.setdefault(it.link, it.dest)
        h.update(f"{it.dest}\0{s.mode:o}\0{s.uid}:{s.gid}\0{s.size}\0{s.rdev}\0{it.target}\0{group}\0".encode())
        if stat.S_ISREG(s.mode) and group in (None, it.dest):
            fd = it.data() if it.data else it.tree.open(it.rel)
            with os.fdopen(fd, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
    return h.hexdigest()


def write_items(items: list[Item], new_dirs: list[str], owner: tuple[int, int] | None, out: BinaryIO) -> None:
    """The layer: the directories the copy creates (`new_dirs`, 0755, owned as --chown says), then the items."""
    now = time.time_ns()
    uid, gid = owner or (0, 0)
    with LayerTar(out) as lt:
        written = set()
        for d in new_dirs:
            lt.add(Member(d, stat.S_IFDIR | 0o755, uid, gid, now))
            written.add(d)
        for it in items:
            if it.dest in written:
                continue
            written.add(it.dest)
            s = it.st
            m = Member(it.dest, s.mode, s.uid, s.gid, s.mtime_ns, s.size, s.rdev, it.target, None, it.link)
            lt.add(m, (it.data or (lambda it=it: it.tree.open(it.rel))) if stat.S_ISREG(s.mode) else None)


def archive_items(path: str) -> list[Item] | None:
    """A local tar archive's members (gzip, bzip2, xz or plain), as ADD unpacks them; None if `path` is no
    archive. Names are cleaned of leading '/' and never climb above the destination."""
    try:
        tf = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError):
        return None
    items: list[Item] = []
    names = tf.getmembers()
    linked = {posixpath.normpath("/" + m.linkname) for m in names if m.islnk()}
    with tf:
        for m in names:
            name = posixpath.normpath("/" + m.name)
            if name == "/" and not m.isdir():
                continue
            kind = {tarfile.DIRTYPE: stat.S_IFDIR, tarfile.SYMTYPE: stat.S_IFLNK, tarfile.FIFOTYPE: stat.S_IFIFO,
                    tarfile.CHRTYPE: stat.S_IFCHR, tarfile.BLKTYPE: stat.S_IFBLK}.get(m.type, stat.S_IFREG)
            rdev = os.makedev(m.devmajor, m.devminor) if m.ischr() or m.isblk() else 0
            mtime = int(float(m.pax_headers.get("mtime", m.mtime)) * 1_000_000_000)
            if m.islnk():
                target = posixpath.normpath("/" + m.linkname)
                src = tf.getmember(m.linkname)
                items.append(Item(name, Stat(stat.S_IFREG | src.mode, src.uid, src.gid, src.size, mtime), link=target,
                                  data=_member_reader(path, src.name)))
                continue
            data = _member_reader(path, m.name) if kind == stat.S_IFREG else None
            items.append(Item(name, Stat(kind | m.mode, m.uid, m.gid, m.size if kind == stat.S_IFREG else 0, mtime,
                                         rdev), target=m.linkname if m.issym() else None,
                              link=name if name in linked else None, data=data))
    return [i for i in items if i.dest != "/"]


def _member_reader(archive: str, name: str) -> Callable[[], int]:
    def opener() -> int:
        with tarfile.open(archive, "r:*") as tf:
            data = tf.extractfile(name).read()  # type: ignore[union-attr]
        fd = os.memfd_create("member", os.MFD_CLOEXEC)
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
        return fd
    return opener
