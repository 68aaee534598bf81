"""Owner translation between the ids stored in the layers and upper directory and the ids the kernel sees through
the mount: fuse-overlayfs's `-o uidmapping=…,gidmapping=…`, with its syntax and semantics.

A mapping is one or more `CONTAINER:HOST:COUNT` triplets, all colon-separated (`0:100000:65536`, or
`0:1000:1:1:100000:65536` for two ranges): the stored ids CONTAINER..CONTAINER+COUNT-1 are reported as
HOST..HOST+COUNT-1. Where ranges overlap the later triplet wins, as fuse-overlayfs's list is searched last to first.
The daemon reports host ids (a stored id outside every range shows as the kernel's overflow id, 65534, as an
unmapped id does in a user namespace), and translates the owners the kernel hands it (the caller of a create, the
target of a chown, all host ids) back into stored ids, an unmapped one becoming the overflow id. So a container whose
root is host uid 100000 sees the image's root-owned files as its own, and the files it creates are stored owned by
0, as fuse-overlayfs stores them.
"""
from __future__ import annotations

OVERFLOW_ID = 65534  # the kernel's default /proc/sys/kernel/overflow{u,g}id


def _overflow(kind: str) -> int:
    try:
        with open(f"/proc/sys/kernel/overflow{kind}id") as f:
            return int(f.read())
    except (OSError, ValueError):
        return OVERFLOW_ID


class _Value:
    """Equality, hash and repr from `__slots__`: what a frozen dataclass would give, without the ~0.4 ms per class
    that generating its methods costs every daemon at start."""

    __slots__: tuple[str, ...] = ()

    def _key(self) -> tuple:
        return tuple(getattr(self, k) for k in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._key() == other._key()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={getattr(self, k)!r}' for k in self.__slots__)})"


class IdMap(_Value):
    """One of uidmapping/gidmapping: (container, host, count) ranges, searched in order (the last given first)."""

    __slots__ = ("ranges", "overflow")

    def __init__(self, ranges: tuple[tuple[int, int, int], ...], overflow: int = OVERFLOW_ID) -> None:
        self.ranges = ranges
        self.overflow = overflow

    @classmethod
    def parse(cls, text: str, overflow: int = OVERFLOW_ID) -> IdMap:
        """`CONTAINER:HOST:COUNT[:CONTAINER:HOST:COUNT...]`; ValueError with fuse-overlayfs's message if malformed."""
        parts = text.split(":")
        if len(parts) % 3 or not all(p.isdigit() for p in parts):
            raise ValueError(f"invalid mapping specified: {text}")
        nums = [int(p) for p in parts]
        triplets = [(nums[i], nums[i + 1], nums[i + 2]) for i in range(0, len(nums), 3)]
        return cls(tuple(reversed(triplets)), overflow)

    def to_host(self, stored: int) -> int:
        for container, host, count in self.ranges:
            if container <= stored < container + count:
                return host + stored - container
        return self.overflow

    def to_container(self, host_id: int) -> int:
        if host_id == -1:  # chown's "leave unchanged"
            return -1
        for container, host, count in self.ranges:
            if host <= host_id < host + count:
                return container + host_id - host
        return self.overflow


class IdMapping(_Value):
    """The uid and gid maps of a mount; a side left out is the identity (as in fuse-overlayfs)."""

    __slots__ = ("uids", "gids")

    def __init__(self, uids: IdMap | None = None, gids: IdMap | None = None) -> None:
        self.uids = uids
        self.gids = gids

    @classmethod
    def parse(cls, uidmapping: str | None, gidmapping: str | None) -> IdMapping | None:
        """From the option values; None when neither is given (nothing to translate)."""
        if uidmapping is None and gidmapping is None:
            return None
        return cls(IdMap.parse(uidmapping, _overflow("u")) if uidmapping is not None else None,
                   IdMap.parse(gidmapping, _overflow("g")) if gidmapping is not None else None)

    def to_host(self, uid: int, gid: int) -> tuple[int, int]:
        """Owner to report for stored `uid`, `gid`."""
        return (self.uids.to_host(uid) if self.uids else uid, self.gids.to_host(gid) if self.gids else gid)

    def to_container(self, uid: int, gid: int) -> tuple[int, int]:
        """Owner to store for `uid`, `gid` from the kernel (-1, "unchanged", stays -1)."""
        return (self.uids.to_container(uid) if self.uids else uid,
                self.gids.to_container(gid) if self.gids else gid)
