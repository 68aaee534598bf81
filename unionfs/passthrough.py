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
is open (or mapped) from its lower layer (the front end passes through lower files of 64 KiB or more only): its
copy-up would need the kernel to move those opens to the copy, which it cannot. Such a change (an open for writing,
a truncate) therefore fails with ETXTBSY until they close, as changing a running executable does. (Waiting for
them would hold one of the daemon's two workers, and two waiting changes would leave none to take the RELEASEs they
wait for.) Metadata changes copy up as usual meanwhile: the copy has the same data, so the lower backing serves it
too.
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


@dataclass(slots=True)
class _Inode:
    backing: int  # backing id, or CACHED
    upper: bool  # whether the backing file is the upper layer's copy (else a lower layer's file)
    opens: int


def _busy() -> OSError:
    return OSError(errno.ETXTBSY, os.strerror(errno.ETXTBSY))


class Backings:
    """Backing ids of open files, shared per union inode, released with the inode's last open file."""

    def __init__(self, devfd: int) -> None:
        self.devfd = devfd
        self._mu = threading.Lock()
        self._inodes: dict[int, _Inode] = {}
        self._of_fh: dict[int, int] = {}  # file handle -> union inode
        self._lower = 0  # inodes open from a lower layer by passthrough

    @property
    def lower_open(self) -> bool:
        """Whether any inode is open from a lower layer by passthrough (else check_writable has nothing to do)."""
        return self._lower > 0

    def check_writable(self, ino: int) -> None:
        """Before changing the data of union inode `ino` (opening it for writing, truncating it): ETXTBSY while it
        is open from a lower layer by passthrough."""
        node = self._inodes.get(ino)
        if node is not None and node.backing != CACHED and not node.upper:
            log.info("inode %#x: data unchanged while it is open from its lower layer (ETXTBSY)", ino)
            raise _busy()

    def open(self, fh: int, ino: int, upper: bool, passthrough: bool) -> int:
        """The mode for a new open of union inode `ino` on fd `fh` (a file of the upper layer or of a lower one):
        a backing id (> 0) or CACHED."""
        with self._mu:
            node = self._inodes.get(ino)
            if node is None:
                backing = self._register(fh) if passthrough else CACHED
                self._inodes[ino] = _Inode(backing, upper, 1)
                self._of_fh[fh] = ino
                if backing != CACHED and not upper:
                    self._lower += 1
                return backing
            # Upper and lower opens meet only when both hold the same data: after a metadata copy-up (data changes
            # wait for the lower opens to close: check_writable), or for another name of a hardlink whose copy is
            # open (it reads the copy through the index), so either backing serves both.
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
        with self._mu:
            ino = self._of_fh.pop(fh, None)
            if ino is None:
                return
            node = self._inodes[ino]
            node.opens -= 1
            if node.opens:
                return
            del self._inodes[ino]
            if node.backing == CACHED:
                return
            if not node.upper:
                self._lower -= 1
        try:
            fcntl.ioctl(self.devfd, FUSE_DEV_IOC_BACKING_CLOSE, bytearray(struct.pack("I", node.backing)))
        except OSError as e:
            log.warning("closing passthrough backing %d: %s", node.backing, e)
