"""FUSE passthrough: which open files the kernel serves straight from their backing file, and with which backing.

With passthrough (kernel 6.9, libfuse 3.16) the daemon registers an open file descriptor of the real file with the
kernel (`FUSE_DEV_IOC_BACKING_OPEN` on /dev/fuse) and names the returned id in its OPEN reply; from then on the
kernel reads, writes and maps that file itself, and the daemon never sees the data. That is how lamina reads and
writes at the speed of the filesystem underneath instead of at the speed of a Python loop.

The kernel holds one rule this module exists for: all files open at once on one FUSE inode must agree, either all
passthrough to the *same* backing file or all through the page cache; a disagreeing open, direct I/O included,
fails with EIO (fs/fuse/iomode.c). Opens therefore take the mode of the files already open under the same key (the
union inode number).

The one case that would change the backing file under an open inode is a change to the data of a lower file that
is open (or mapped) from its lower layer (the front end passes through lower files of 64 KiB or more only): its copy-up would need the kernel to move those opens to the copy, which
it cannot. So such a change (an open for writing, a truncate) waits for those opens to close, and new opens of the
file queue behind it; after `WAIT_S` it fails with ETXTBSY, as changing a running executable does. Metadata
changes copy up as usual meanwhile: the copy has the same data, so the lower backing serves it too.
`-o nopassthrough` trades the speed for kernel overlayfs's exact behaviour there (docs/unionfs.md).

Knows nothing of mfusepy: it is handed the /dev/fuse descriptor and answers with a backing id per open.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import threading
from dataclasses import dataclass

log = logging.getLogger("lamina.fs")

# <linux/fuse.h>: _IOW(229, 1, struct fuse_backing_map { int32 fd; uint32 flags; uint64 padding; })
FUSE_DEV_IOC_BACKING_OPEN = 0x4010E501
# _IOW(229, 2, uint32_t)
FUSE_DEV_IOC_BACKING_CLOSE = 0x4004E502

CACHED = 0  # an open served by the daemon through the kernel's page cache
# How long a change to a lower file's data waits for the file's lower opens to close. Readers that open, read and
# close are gone well within it; a file kept open or mapped (a running program's library) is not.
WAIT_S = 1.0


@dataclass(slots=True)
class _Inode:
    backing: int  # backing id, or CACHED
    upper: bool  # whether the backing file is the upper layer's copy (else a lower layer's file)
    opens: int


class Stale(Exception):
    """The open reached a lower file that a concurrent change has since copied up: open again."""


def _busy() -> OSError:
    return OSError(errno.ETXTBSY, os.strerror(errno.ETXTBSY))


class Backings:
    """Backing ids of open files, shared per union inode, released with the inode's last open file."""

    def __init__(self, devfd: int) -> None:
        self.devfd = devfd
        self._cv = threading.Condition(threading.Lock())
        self._inodes: dict[int, _Inode] = {}
        self._of_fh: dict[int, int] = {}  # file handle -> union inode
        self._writers: dict[int, int] = {}  # union inode -> changes of its data in progress or waiting

    def _pinned(self, ino: int) -> bool:
        node = self._inodes.get(ino)
        return node is not None and node.backing != CACHED and not node.upper

    def begin_change(self, ino: int) -> None:
        """Before changing the data of union inode `ino` (opening it for writing, truncating it): wait for its lower
        opens to close (ETXTBSY after WAIT_S). Pair with `end_change`, whatever the change's outcome."""
        with self._cv:
            self._writers[ino] = self._writers.get(ino, 0) + 1
            if self._pinned(ino) and not self._cv.wait_for(lambda: not self._pinned(ino), WAIT_S):
                self._end(ino)
                log.warning("inode %#x: its data cannot change while it is open from a lower layer", ino)
                raise _busy()

    def end_change(self, ino: int) -> None:
        with self._cv:
            self._end(ino)

    def _end(self, ino: int) -> None:
        n = self._writers[ino] - 1
        if n:
            self._writers[ino] = n
        else:
            del self._writers[ino]
            self._cv.notify_all()

    @property
    def changing(self) -> bool:
        """Whether a data change is in progress or waiting anywhere (else before_read has nothing to do)."""
        return bool(self._writers)

    def before_read(self, ino: int) -> None:
        """Before a read-only open of union inode `ino`: queue behind a change waiting for the lower opens to close
        (it will have copied the file up), so that readers cannot keep a writer out for ever."""
        if ino in self._writers:
            with self._cv:
                self._cv.wait_for(lambda: ino not in self._writers, WAIT_S)

    def open(self, fh: int, ino: int, upper: bool, writing: bool, passthrough: bool) -> int:
        """The mode for a new open of union inode `ino` on fd `fh` (a file of the upper layer or of a lower one):
        a backing id (> 0) or CACHED. Stale when `fh` is a lower file that a change has copied up meanwhile."""
        with self._cv:
            if writing and self._pinned(ino):
                # a reader that was past before_read when this change began: its open completes, then closes
                if not self._cv.wait_for(lambda: not self._pinned(ino), WAIT_S):
                    raise _busy()
            node = self._inodes.get(ino)
            if node is None:
                backing = self._register(fh) if passthrough else CACHED
                self._inodes[ino] = _Inode(backing, upper, 1)
                self._of_fh[fh] = ino
                return backing
            if node.upper and not upper:
                raise Stale()
            # Upper and lower opens meet only after a metadata copy-up (data changes wait for the lower opens to
            # close): the copy's data are the lower file's, so the lower backing serves the copy too.
            node.opens += 1
            self._of_fh[fh] = ino
            return node.backing

    def _register(self, fd: int) -> int:
        try:
            return fcntl.ioctl(self.devfd, FUSE_DEV_IOC_BACKING_OPEN, bytearray(struct.pack("iIQ", fd, 0, 0)))
        except OSError as e:
            # not a regular file (/dev/null for empty store files), or a backing filesystem stacked too deep:
            # the page cache serves it instead
            log.debug("no passthrough for fd %d: %s", fd, e)
            return CACHED

    def release(self, fh: int) -> None:
        with self._cv:
            ino = self._of_fh.pop(fh, None)
            if ino is None:
                return
            node = self._inodes[ino]
            node.opens -= 1
            if node.opens:
                return
            del self._inodes[ino]
            if ino in self._writers:
                self._cv.notify_all()
            if node.backing == CACHED:
                return
        try:
            fcntl.ioctl(self.devfd, FUSE_DEV_IOC_BACKING_CLOSE, bytearray(struct.pack("I", node.backing)))
        except OSError as e:
            log.warning("closing passthrough backing %d: %s", node.backing, e)
