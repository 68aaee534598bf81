"""Differential test: random operation sequences on lamina-fs and on kernel overlayfs over the same lower layers.

After every step the result (value or errno) and the whole visible tree must match; after unmounting, so must the
upper directories (internal bookkeeping xattrs aside). The one intended difference: renaming a lower or merged
directory, which kernel overlayfs (redirect_dir=off) refuses with EXDEV and lamina performs. There the kernel side
does what `mv` does on EXDEV (copy the tree, remove the source) so the visible trees stay comparable; merged
directory link counts and the upper dirs then legitimately differ and are not compared for that run.
"""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import stat
from pathlib import Path

import hypothesis.strategies as st
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from fsharness import docker_archive, kernel_mount, lamina, lamina_mount, make_layers, snapshot, store_mount, tmpdir, unmount
from unionfs.fuse import HAS_PASSTHROUGH_API, PASSTHROUGH_MIN
from unionfs.upper import RENAME_EXCHANGE, RENAME_NOREPLACE, renameat2

# names of 250-255 bytes: a `.wh.` prefix no longer fits from 252 on (the lower ones are made in mount())
LONG = {250: "r" * 250, 252: "u" * 252, 253: "t" * 253, 255: "s" * 255}
PATHS = ["a", "b", "c", "d", "e", "f", "g", "p", "n", "m", "d/x", "d/y", "d/v", "d/w", "d/sub", "d/sub/z",
         "d/n", "g/h", "g/i", "g/n", "n/a", "m/x", "e/e1", "d/ha", "d/hb",
         LONG[250], LONG[255], LONG[252], f"d/{LONG[253]}", f"d/{LONG[253]}/x", f"g/{LONG[255]}"]
# Paths of 3,900-4,056 bytes below the mount (#12.7), under a chain of 240-byte names a lower layer holds: with the
# mounts' own paths (29 bytes) they stay within PATH_MAX, and lamina's upper root (below UPPER_PARENT) makes them
# pass it there.
DEEP = "/".join("%02d" % i + "k" * 238 for i in range(16))
PATHS += [DEEP + "/" + "x" * 44, DEEP + "/" + "y" * 200, DEEP + "/" + "s" * 60, DEEP + "/" + "s" * 60 + "/t"]
UPPER_PARENT = "u" * 200
paths = st.sampled_from(PATHS)
# chown(path, -1, -1) changes nothing but ctime, and copies up: libfuse's high-level API passes it on only as
# lamina builds it (scripts/libfuse-setattr-nothing.patch), not the system's 3.14 (which has no passthrough either)
IDS_KEPT = [-1] if HAS_PASSTHROUGH_API else []
data = st.binary(max_size=300)


def outcome(fn, *args):
    try:
        r = fn(*args)
        return ("ok", r)
    except OSError as e:
        return ("err", errno.errorcode.get(e.errno, e.errno))


def _write(root: Path, rel: str, payload: bytes, how: str) -> int:
    flags = {"w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "a": os.O_WRONLY | os.O_APPEND | os.O_CREAT,
             "x": os.O_WRONLY | os.O_CREAT | os.O_EXCL, "rw": os.O_RDWR}[how]
    fd = os.open(root / rel, flags | os.O_NONBLOCK, 0o644)  # a fifo without reader: ENXIO, not a hang
    try:
        n = os.write(fd, payload)
        if how == "rw":
            os.lseek(fd, 0, os.SEEK_SET)
            os.read(fd, 10)
        return n
    finally:
        os.close(fd)


def _drop_nlink(snap: dict) -> dict:
    return {k: tuple(x for x in v if x[0] != "nlink") for k, v in snap.items()}


def _drop_opaque(snap: dict) -> dict:
    out = {}
    for k, v in snap.items():
        d = dict(v)
        if "xattrs" in d:
            xs = {n: x for n, x in d["xattrs"].items() if n != "trusted.overlay.opaque"}
            if xs:
                d["xattrs"] = xs
            else:
                del d["xattrs"]
        out[k] = tuple(sorted(d.items()))
    return out


def _copy_move(root: Path, src: str, dst: str) -> None:
    """What mv does after EXDEV, within one filesystem view. Paths relative to `root`, the mount, and the commands
    run there: from / they may pass PATH_MAX, which only the caller's own path argument is held to."""
    script = 'if [ -e "$2" ] || [ -L "$2" ]; then rmdir -- "$2"; fi; cp -a -- "$1" "$2" && rm -rf -- "$1"'
    subprocess.run(["sh", "-c", script, "sh", src, dst], cwd=root, check=True)  # as mv: hardlinks, xattrs kept


class OverlayVsKernel(RuleBasedStateMachine):
    from_store = False  # lamina's lowers: the directories themselves, or the same layers imported into a store
    hardlinks = False  # lower hardlinks, compared with the kernel's index=on (which keeps them joined, as lamina)

    def __init__(self) -> None:
        super().__init__()
        self.base = tmpdir("lamina-diff-")
        self.stack = None
        self.diverged = False
        self.fds: list[tuple[int, int]] = []  # (kernel fd, lamina fd) open on the same path
        # lamina fds opened read-only on a large file not in the upper dir. The kernel serves them from the lower
        # file by FUSE passthrough, and lamina refuses to change that file's data meanwhile (ETXTBSY; docs/unionfs.md,
        # "Passthrough"), where kernel overlayfs copies it up: steps that would do that are skipped.
        self.lower_ro: set[int] = set()

    @initialize()
    def mount(self) -> None:
        import contextlib
        self.lowers = make_layers(self.base)
        if self.hardlinks:
            os.link(self.lowers[2] / "a", self.lowers[2] / "d" / "ha")
            os.link(self.lowers[1] / "b", self.lowers[1] / "d" / "hb")
        l0, l1, l2 = self.lowers
        (l2 / LONG[250]).write_text("250\n")
        (l1 / LONG[255]).write_text("255\n")
        (l2 / "d" / LONG[253]).mkdir()
        (l2 / "d" / LONG[253] / "x").write_text("x\n")
        (l1 / DEEP).mkdir(parents=True)
        (l1 / DEEP / ("x" * 44)).write_text("deep\n")
        # every lower entry gets an old time of its own, compared exactly (fsharness.RECENT_NS): a copy-up must
        # keep them, its parents' included, as kernel overlayfs does
        for i, p in enumerate(sorted((p for layer in self.lowers for p in layer.rglob("*")), reverse=True)):
            os.utime(p, ns=((1_000_000_000 + i) * 10**9,) * 2, follow_symlinks=False)
        for d in ("lu", "lw"):  # below a 200-byte name, by links of short names
            (self.base / UPPER_PARENT / d).mkdir(parents=True)
            os.symlink(f"{UPPER_PARENT}/{d}", self.base / d)
        for d in ("ku", "kw", "km", "lm"):
            (self.base / d).mkdir()
        self.stack = contextlib.ExitStack()
        b = self.base
        self.k = self.stack.enter_context(kernel_mount(self.lowers, b / "km", b / "ku", b / "kw",
                                                       extra="index=on" if self.hardlinks else ""))
        if self.from_store:
            lamina(b / "store", "import", docker_archive(self.lowers, b / "img.tar", "diff:test"))
            self.l = self.stack.enter_context(store_mount(b / "store", "diff:test", b / "lm", b / "lu", b / "lw"))
        else:
            self.l = self.stack.enter_context(lamina_mount(self.lowers, b / "lm", b / "lu", b / "lw"))
        self.compare()

    def teardown(self) -> None:
        for kfd, lfd in self.fds:
            os.close(kfd)
            os.close(lfd)
        try:
            if self.stack is not None:
                self.stack.close()
                if not self.diverged:
                    lu = snapshot(self.base / "lu", upper_view=True, dir_nlink=False, mtimes=True)
                    ku = snapshot(self.base / "ku", upper_view=True, dir_nlink=False, mtimes=True)
                    if self.hardlinks:
                        # with index=on the kernel also marks every new directory in a merged one opaque, as an
                        # optimisation (ovl_create_upper); lamina follows the default configuration there
                        lu, ku = _drop_opaque(lu), _drop_opaque(ku)
                    assert lu == ku
        finally:
            for m in ("km", "lm"):
                if (self.base / m).exists():
                    unmount(self.base / m)
            shutil.rmtree(self.base, ignore_errors=True)

    def compare(self) -> None:
        # (after the emulated mv the kernel side's tree was copied, not moved: its times are cp's)
        ks = snapshot(self.k, dir_nlink=not self.diverged, mtimes=not self.diverged)
        ls = snapshot(self.l, dir_nlink=not self.diverged, check_ino=True, mtimes=not self.diverged)
        if self.diverged and self.hardlinks:
            # the emulated mv copied a moved hardlink instead of moving it: link counts legitimately differ
            ks, ls = _drop_nlink(ks), _drop_nlink(ls)
        assert ls == ks

    def _busy(self, p) -> bool:
        """Whether lamina refuses to change the data of `p` now (see self.lower_ro)."""
        try:
            ino = os.stat(self.l / p).st_ino
        except OSError:
            return False
        return any(os.fstat(fd).st_ino == ino for fd in self.lower_ro)

    def both(self, fn, *args) -> None:
        rk = outcome(fn, self.k, *args)
        rl = outcome(fn, self.l, *args)
        assert rl == rk, f"{fn.__name__}{args}: lamina {rl} kernel {rk}"
        self.compare()

    @rule(p=paths, payload=data, how=st.sampled_from(["w", "a", "x", "rw"]))
    def write(self, p, payload, how):
        if self._busy(p):
            return
        self.both(_write, p, payload, how)

    @rule(p=paths, length=st.integers(0, 6000))
    def truncate(self, p, length):
        if self._busy(p):
            return
        self.both(lambda r, p, n: os.truncate(r / p, n), p, length)

    @rule(p=paths)
    def unlink(self, p):
        self.both(lambda r, p: os.unlink(r / p), p)

    @rule(p=paths, mode=st.sampled_from([0o755, 0o700, 0o2775]))
    def mkdir(self, p, mode):
        self.both(lambda r, p, m: os.mkdir(r / p, m), p, mode)

    @rule(p=paths)
    def rmdir(self, p):
        self.both(lambda r, p: os.rmdir(r / p), p)

    @rule(p=paths, dest=st.sampled_from(["a", "../a", "nowhere", "d"]))
    def symlink(self, p, dest):
        self.both(lambda r, p, t: os.symlink(t, r / p), p, dest)

    @rule(src=paths, dst=paths)
    def link(self, src, dst):
        self.both(lambda r, s, d: os.link(r / s, r / d, follow_symlinks=False), src, dst)

    @rule(p=paths)
    def mkfifo(self, p):
        self.both(lambda r, p: os.mkfifo(r / p, 0o640), p)

    @rule(p=paths, mode=st.sampled_from([0o600, 0o755, 0o4755, 0o1777]))
    def chmod(self, p, mode):
        self.both(lambda r, p, m: os.chmod(r / p, m), p, mode)

    @rule(p=paths, uid=st.sampled_from([0, 1000, *IDS_KEPT]), gid=st.sampled_from([0, 100, *IDS_KEPT]))
    def chown(self, p, uid, gid):
        self.both(lambda r, p, u, g: os.chown(r / p, u, g, follow_symlinks=False), p, uid, gid)

    @rule(p=paths, name=st.sampled_from(["user.k", "user.n", "trusted.x", "trusted.overlay.x"]),
          value=st.binary(max_size=20))
    def setxattr(self, p, name, value):
        self.both(lambda r, p, n, v: os.setxattr(r / p, n, v, follow_symlinks=False), p, name, value)

    @rule(p=paths, name=st.sampled_from(["user.k", "user.dir", "trusted.overlay.opaque"]))
    def removexattr(self, p, name):
        self.both(lambda r, p, n: os.removexattr(r / p, n, follow_symlinks=False), p, name)

    @rule(p=paths)
    def read_xattr_private(self, p):
        self.both(lambda r, p: os.getxattr(r / p, "trusted.overlay.opaque", follow_symlinks=False), p)

    @rule(src=paths, dst=paths, flags=st.sampled_from([0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE]))
    def rename(self, src, dst, flags):
        def do(r, s, d, f):
            return renameat2(str(r / s), str(r / d), f)
        rk = outcome(do, self.k, src, dst, flags)
        rl = outcome(do, self.l, src, dst, flags)
        if rk == ("err", "EXDEV") and rl[0] == "ok":
            # the intended difference: emulate mv's fallback on the kernel side. Open files then point at the
            # copied-from tree on the kernel side but at the moved one on lamina's: they are not comparable.
            self.diverged = True
            for kfd, lfd in self.fds:
                os.close(kfd)
                os.close(lfd)
            self.fds = []
            self.lower_ro.clear()
            if flags == RENAME_EXCHANGE:
                tmp = self.k / ".xchg"
                for s, d in ((self.k / src, tmp), (self.k / dst, self.k / src), (tmp, self.k / dst)):
                    if os.path.isdir(s) and not os.path.islink(s):
                        try:
                            os.rename(s, d)
                        except OSError:
                            _copy_move(self.k, str(s.relative_to(self.k)), str(d.relative_to(self.k)))
                    else:
                        os.rename(s, d)
            else:
                _copy_move(self.k, src, dst)
        elif rk == ("err", "EXDEV"):
            # the kernel refused before looking at the target; lamina looked and refused for a POSIX reason
            assert rl[0] == "err" and rl[1] in ("ENOTEMPTY", "EEXIST", "ENOTDIR", "EISDIR", "EINVAL"), rl
        else:
            assert rl == rk, f"rename{(src, dst, flags)}: lamina {rl} kernel {rk}"
        self.compare()

    @precondition(lambda self: len(self.fds) < 4)
    @rule(p=paths, how=st.sampled_from([os.O_RDONLY, os.O_RDWR, os.O_WRONLY | os.O_APPEND]))
    def open_fd(self, p, how):
        if how != os.O_RDONLY and self._busy(p):
            return
        rk = outcome(os.open, self.k / p, how | os.O_NONBLOCK)
        rl = outcome(os.open, self.l / p, how | os.O_NONBLOCK)
        if rk[0] == "ok" and rl[0] == "ok":
            self.fds.append((rk[1], rl[1]))
            real = os.path.relpath(os.path.realpath(self.l / p), self.l)
            if how == os.O_RDONLY and not os.path.lexists(self.base / "lu" / real) and \
                    os.fstat(rl[1]).st_size >= PASSTHROUGH_MIN:
                self.lower_ro.add(rl[1])
        else:
            for r in (rk, rl):
                if r[0] == "ok":
                    os.close(r[1])
            assert (rl[0], rl[1] if rl[0] == "err" else None) == (rk[0], rk[1] if rk[0] == "err" else None)
        self.compare()

    def _fd_both(self, i: int, fn, *args) -> None:
        kfd, lfd = self.fds[i % len(self.fds)]
        rk, rl = outcome(fn, kfd, *args), outcome(fn, lfd, *args)
        assert rl == rk, f"{fn.__name__}{args}: lamina {rl} kernel {rk}"
        self.compare()

    @precondition(lambda self: self.fds)
    @rule(i=st.integers(0, 3), payload=data, off=st.integers(0, 6000))
    def fd_write(self, i, payload, off):
        self._fd_both(i, os.pwrite, payload, off)

    @precondition(lambda self: self.fds)
    @rule(i=st.integers(0, 3), n=st.integers(0, 7000), off=st.integers(0, 6000))
    def fd_read(self, i, n, off):
        self._fd_both(i, os.pread, n, off)

    @precondition(lambda self: self.fds)
    @rule(i=st.integers(0, 3), n=st.integers(0, 7000))
    def fd_truncate(self, i, n):
        self._fd_both(i, os.ftruncate, n)

    @precondition(lambda self: self.fds)
    @rule(i=st.integers(0, 3))
    def fd_stat(self, i):
        # as in compare(): once the emulated mv has copied a moved hardlink, link counts legitimately differ
        nlink_differs = self.diverged and self.hardlinks

        def fstat(fd):
            s = os.fstat(fd)
            # a directory's size is its source's business (ext4 blocks, 0 in the store), as in snapshots
            return (oct(s.st_mode), None if stat.S_ISDIR(s.st_mode) else s.st_size,
                    None if nlink_differs else s.st_nlink, s.st_uid)
        self._fd_both(i, fstat)

    @precondition(lambda self: self.fds)
    @rule(i=st.integers(0, 3))
    def fd_close(self, i):
        kfd, lfd = self.fds.pop(i % len(self.fds))
        self.lower_ro.discard(lfd)
        os.close(kfd)
        os.close(lfd)

    @rule(p=paths)
    def listdir(self, p):
        self.both(lambda r, p: sorted(os.listdir(r / p)), p)

    @rule(p=paths)
    def stat_kind(self, p):
        self.both(lambda r, p: stat.S_IFMT(os.lstat(r / p).st_mode), p)


OverlayVsKernel.TestCase.settings = settings(
    max_examples=int(os.environ.get("LAMINA_DIFF_EXAMPLES", "25")), stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    # shrinking real mounts takes minutes; LAMINA_DIFF_SHRINK=1 when debugging a failure
    phases=[Phase.explicit, Phase.reuse, Phase.generate] + ([Phase.shrink] if os.environ.get("LAMINA_DIFF_SHRINK") else []),
)
TestOverlayVsKernel = OverlayVsKernel.TestCase


class StoreOverlayVsKernel(OverlayVsKernel):
    from_store = True


StoreOverlayVsKernel.TestCase.settings = settings(
    OverlayVsKernel.TestCase.settings, max_examples=int(os.environ.get("LAMINA_DIFF_STORE_EXAMPLES", "10")))
TestStoreOverlayVsKernel = StoreOverlayVsKernel.TestCase


class HardlinkOverlayVsKernel(OverlayVsKernel):
    hardlinks = True


HardlinkOverlayVsKernel.TestCase.settings = settings(
    OverlayVsKernel.TestCase.settings, max_examples=int(os.environ.get("LAMINA_DIFF_HARDLINK_EXAMPLES", "15")))
TestHardlinkOverlayVsKernel = HardlinkOverlayVsKernel.TestCase
