"""Container records on disk: <root>/containers/<id>/ holding state.json, the container layer (upper, work), the
rootfs mount point and the log; lookup by id, id prefix or name; liveness checks that survive pid reuse.

state.json is replaced atomically (write to a temp file, rename), so a reader never sees half a record and a crashed
writer leaves the previous one.
"""
from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from store.holds import hold, release
from store.root import Store

from .paths import private_dir, remove_tree
from .spec import SpecError

_ADJ = ("admiring", "brave", "calm", "dreamy", "eager", "focused", "gallant", "happy", "jolly", "keen", "lucid",
        "modest", "nifty", "quirky", "relaxed", "serene", "tender", "upbeat", "vibrant", "zealous")
_NOUN = ("archimedes", "babbage", "curie", "darwin", "euler", "fermi", "gauss", "hopper", "kepler", "lovelace",
         "meitner", "newton", "noether", "pascal", "ritchie", "shannon", "thompson", "turing", "wozniak", "yalow")


class NotFound(LookupError):
    pass


class NameConflict(SpecError):
    pass


class StoreRefused(SpecError):
    """The store would not record the container's hold on its image (its caller removes the record)."""


def containers_dir(root: str | Path) -> Path:
    return Path(root) / "containers"


def proc_start_time(pid: int) -> int | None:
    """Start time of a process in clock ticks since boot (field 22 of /proc/PID/stat), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    try:
        return int(data.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


@dataclass
class Container:
    dir: Path
    data: dict

    @property
    def id(self) -> str:
        return self.data["id"]

    @property
    def name(self) -> str:
        return self.data["name"]

    @property
    def upper(self) -> Path:
        return self.dir / "upper"

    @property
    def work(self) -> Path:
        return self.dir / "work"

    @property
    def rootfs(self) -> Path:
        return self.dir / "rootfs"

    @property
    def log(self) -> Path:
        return self.dir / "container.log"

    def save(self) -> None:
        tmp = self.dir / f".state.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.dir / "state.json")

    def reload(self) -> "Container":
        self.data = json.loads((self.dir / "state.json").read_text())
        return self

    def update(self, **kw: object) -> None:
        """Re-read, change, save: the shim and `stop`/`kill` may both write."""
        try:
            self.reload()
        except (OSError, ValueError):
            pass
        self.data.update(kw)
        self.save()

    def init_alive(self) -> bool:
        pid, start = self.data.get("pid"), self.data.get("pid_start")
        if not pid or start is None:
            return False
        return proc_start_time(pid) == start and not _is_zombie(pid)

    def shim_alive(self) -> bool:
        pid, start = self.data.get("shim_pid"), self.data.get("shim_start")
        return bool(pid) and proc_start_time(pid) == start

    def status(self) -> str:
        """created, running, exited, or dead (recorded running, but its init is gone and nobody recorded why)."""
        s = self.data.get("status", "created")
        if s == "running" and not self.init_alive():
            try:
                self.reload()  # the shim may have just recorded the exit
            except (OSError, ValueError):
                pass
            s = self.data.get("status", "created")
            if s == "running":
                return "dead"
        return s


def _token(nbytes: int) -> str:
    # os.urandom rather than the secrets module, whose import (hmac, OpenSSL) costs every `lamina run` ~3 ms
    return os.urandom(nbytes).hex()


def _pick(words: tuple[str, ...]) -> str:
    return words[int.from_bytes(os.urandom(4), "little") % len(words)]


def new_id() -> str:
    return _token(32)


def _free_name(taken: set[str]) -> str:
    for _ in range(100):
        n = f"{_pick(_ADJ)}_{_pick(_NOUN)}"
        if n not in taken:
            return n
    return f"lamina_{_token(4)}"


def conflict(name: str, holder: Container) -> NameConflict:
    return NameConflict(f'Conflict. The container name "/{name}" is already in use by container "{holder.id}". '
                        f'You have to remove (or rename) that container to be able to reuse that name.')


def create(root: str | Path, cid: str, data: dict) -> Container:
    """Record a new container; its name (data["name"], a random free one if None) is reserved atomically: of two
    creations with one name at once, one makes the container and the other gets NameConflict."""
    base = containers_dir(root)
    private_dir(base)  # every container's layer and root filesystem are below: see private_dir
    d = base / cid
    # The name check and the record's creation under one lock: without it two `run --name x` at once both saw x
    # free. Held only for this, so concurrent runs still prepare side by side.
    lock = os.open(base / ".names.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        others = list_containers(root)
        name = data.get("name") or _free_name({c.name for c in others})
        holder = next((c for c in others if c.name == name), None)
        if holder is not None:
            raise conflict(name, holder)
        d.mkdir()
        # 0711, not 0700: under --userns the container's first process, no longer host root, steps from its root
        # filesystem up to here and back (runtime.launch); containers/ above still keeps every host user out.
        os.chmod(d, 0o711)
        for sub in ("upper", "work", "rootfs"):
            (d / sub).mkdir()
        c = Container(d, dict(data, name=name, id=cid, created=time.time(), status="created"))
        c.save()
    finally:
        os.close(lock)
    if data.get("image_id"):
        # The store keeps an image a container uses (gc spares it; rmi needs -f), until the container is removed.
        try:
            with Store(str(root)) as st:
                hold(st, f"container:{cid}", data["image_id"])
        except Exception as e:  # noqa: BLE001 - sqlite3's or the store's errors: e.g. a read-only index
            raise StoreRefused(f"recording the container in the store at {root}: {e}") from None
    return c


def list_containers(root: str | Path) -> list[Container]:
    out = []
    base = containers_dir(root)
    if not base.is_dir():
        return out
    for d in base.iterdir():
        try:
            out.append(Container(d, json.loads((d / "state.json").read_text())))
        except (OSError, ValueError):
            continue
    out.sort(key=lambda c: c.data.get("created", 0), reverse=True)
    return out


def find(root: str | Path, ref: str) -> Container:
    """By full id, name, or unique id prefix (as Docker)."""
    cs = list_containers(root)
    for c in cs:
        if c.id == ref or c.name == ref:
            return c
    if len(ref) >= 1:
        hits = [c for c in cs if c.id.startswith(ref)]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise NotFound(f"multiple containers match {ref!r}: give more of the id")
    raise NotFound(f"no such container: {ref}")


def remove_dir(c: Container) -> None:
    remove_tree(c.dir)
    # Released after the directory is gone: a crash in between leaves a stale hold (an image kept), never a
    # container whose image gc may take.
    with Store(str(c.dir.parent.parent)) as st:
        release(st, f"container:{c.id}")
