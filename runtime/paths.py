"""Resolving a container path inside a host directory holding the rootfs, without ever leaving it; making the
directories that hold containers private; removing a container's tree, however deep.

Mount targets are resolved before anything is mounted on them: every symlink is read and followed inside the
rootfs (an absolute link restarts at the rootfs, as it would inside the container), and a link or `..` that would
climb above the rootfs is an error rather than something to clamp — a bind mount must never land on a host path
(as filepath-securejoin guards runc). Written here because no maintained Python package does this.
"""
from __future__ import annotations

import errno
import os
import stat

MAX_LINKS = 40


class EscapeError(ValueError):
    pass


def resolve_in_root(root: str, path: str, clamp: bool = False) -> str:
    """Host path of container path `path` within `root`, symlinks resolved. Missing trailing parts are kept as is.
    A `..` above the root is an error, or with `clamp` stays at the root, as the kernel has it in a chroot (how
    the container itself will follow the same link)."""
    root = os.path.realpath(root)
    todo = [p for p in path.split("/") if p not in ("", ".")]
    done: list[str] = []
    links = 0
    while todo:
        part = todo.pop(0)
        if part == "..":
            if done:
                done.pop()
            elif not clamp:
                raise EscapeError(f"{path}: resolves outside the container's root filesystem")
            continue
        cur = os.path.join(root, *done, part)
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            done.append(part)
            done.extend(p for p in todo if p not in ("", "."))
            if ".." in done:
                raise EscapeError(f"{path}: '..' below a missing directory")
            return os.path.join(root, *done)
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > MAX_LINKS:
                raise OSError(errno.ELOOP, f"{path}: too many levels of symbolic links")
            target = os.readlink(cur)
            if target.startswith("/"):
                done = []
            todo = [p for p in target.split("/") if p not in ("", ".")] + todo
            continue
        done.append(part)
    return os.path.join(root, *done)


def private_dir(path: str | os.PathLike) -> None:
    """Make `path` (and missing parents) a directory only its owner may enter, tightening an existing one.

    The container and volume directories hold images' setuid-root files and device nodes (in a container's
    layer, its root filesystem mount, a pre-filled volume): a host user who could traverse to them would run
    those as root (CVE-2021-41091 in moby). Nothing but host root needs a path through them: the union
    filesystem's daemon and the container's first process (which binds everything before leaving the host's
    user namespace) run as host root, and a container's own processes reach their files through mounts."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.stat(path)
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, 0o700)


def make_mountpoint(root: str, path: str, is_dir: bool, clamp: bool = False) -> str:
    """Resolve `path` in `root` and create it (a directory, or an empty file for a file bind), returning it. Missing
    parents are made inside `root`: those of where a symlink leads, for a link (`clamp`: see resolve_in_root)."""
    host = resolve_in_root(root, path, clamp)
    if is_dir:
        # Create component by component, re-resolving, so a symlink created meanwhile is still followed inside.
        rel = os.path.relpath(host, os.path.realpath(root))
        cur = os.path.realpath(root)
        for part in [] if rel == "." else rel.split("/"):
            nxt = os.path.join(cur, part)
            if not os.path.lexists(nxt):
                os.mkdir(nxt, 0o755)
            elif os.path.islink(nxt):
                nxt = resolve_in_root(root, "/" + os.path.relpath(nxt, os.path.realpath(root)), clamp)
            cur = nxt
        if not os.path.isdir(cur):
            raise NotADirectoryError(errno.ENOTDIR, f"{path}: not a directory in the image")
        return cur
    # The parent of the resolved path: /etc/resolv.conf -> ../run/systemd/resolve/stub-resolv.conf, the target
    # missing, makes /run/systemd/resolve (as podman does), not /etc again.
    parent = os.path.relpath(os.path.dirname(host), os.path.realpath(root))
    make_mountpoint(root, "/" + ("" if parent == "." else parent), True, clamp)
    host = resolve_in_root(root, path, clamp)
    if not os.path.lexists(host):
        os.close(os.open(host, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW, 0o644))
    elif os.path.isdir(host):
        raise IsADirectoryError(errno.EISDIR, f"{path}: is a directory in the image, the source is a file")
    return host


def remove_tree(top: str | os.PathLike) -> None:
    """Remove the directory tree at `top` (a missing one is fine), iteratively and one descriptor at a time.

    A container can build a tree deeper than Python's recursion limit (shutil.rmtree raised RecursionError at
    ~1,000 levels, and the container could not be removed) and deeper than PATH_MAX: every step is relative to
    the directory's descriptor, going back up through "..". It never follows a symlink, and it refuses to enter
    another filesystem (a mount left on the tree) rather than empty it."""
    try:
        fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    dev = os.fstat(fd).st_dev
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    stack: list[tuple[str, list[str]]] = []  # (name of each directory entered, its subdirectories still to go)
    try:
        pending = _clear_files(fd, dev)
        while True:
            if pending:
                name = pending.pop()
                sub = os.open(name, flags, dir_fd=fd)
                os.close(fd)
                fd = sub
                stack.append((name, pending))
                pending = _clear_files(fd, dev)
                continue
            if not stack:
                break
            name, pending = stack.pop()
            up = os.open("..", flags, dir_fd=fd)
            os.close(fd)
            fd = up
            os.rmdir(name, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(top)


def _clear_files(fd: int, dev: int) -> list[str]:
    """Unlink every non-directory in the directory open at `fd`; return its subdirectories' names."""
    subdirs = []
    with os.scandir(fd) as it:
        for e in it:
            st = e.stat(follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                os.unlink(e.name, dir_fd=fd)
            elif st.st_dev != dev:
                raise OSError(errno.EBUSY, "a mount is left below it", e.name)
            else:
                subdirs.append(e.name)
    return subdirs
