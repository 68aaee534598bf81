"""Named volumes: directories under <root>/volumes/<name>/_data that outlive containers, with a volume.json record.

As Docker's `local` driver: created on first `-v NAME:/path` or by `lamina volume create`, pre-filled from the
image's contents at the mount path on first use when still empty, refused to `rm` while a container uses them.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .paths import private_dir, remove_tree
from .spec import VOLUME_NAME


class VolumeError(Exception):
    pass


def volumes_dir(root: str | Path) -> Path:
    return Path(root) / "volumes"


class Volume:
    def __init__(self, root: str | Path, name: str):
        self.name = name
        self.dir = volumes_dir(root) / name
        self.data = self.dir / "_data"
        self.meta = self.dir / "volume.json"

    def exists(self) -> bool:
        return self.meta.exists()

    def record(self) -> dict:
        return json.loads(self.meta.read_text())

    def _save(self, rec: dict) -> None:
        tmp = self.dir / ".volume.json.tmp"
        tmp.write_text(json.dumps(rec))
        os.replace(tmp, self.meta)

    def inspect(self) -> dict:
        rec = self.record()
        return {"CreatedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(rec["created"])), "Driver": "local",
                "Labels": {}, "Mountpoint": str(self.data), "Name": self.name, "Options": {}, "Scope": "local"}

    def prefill(self, src: str) -> None:
        """Copy the image's contents at the mount path into the volume, once, and only into an empty volume."""
        rec = self.record()
        if rec.get("prefilled"):
            return
        if os.path.isdir(src) and not any(self.data.iterdir()):
            # cp -a keeps owners, modes, times, xattrs, hardlinks and special files: shutil.copytree does not.
            import subprocess  # noqa: PLC0415 - only a first use of a volume copies

            r = subprocess.run(["cp", "-a", "--", f"{src}/.", f"{self.data}/"], capture_output=True, text=True)
            if r.returncode != 0:
                raise VolumeError(f"pre-filling volume {self.name}: {r.stderr.strip()}")
            os.chmod(self.data, os.stat(src).st_mode & 0o7777)
            st = os.stat(src)
            os.chown(self.data, st.st_uid, st.st_gid)
        rec["prefilled"] = True
        self._save(rec)


def create(root: str | Path, name: str | None = None, anonymous: bool = False) -> Volume:
    if name is None:
        name = os.urandom(32).hex()
    if not VOLUME_NAME.match(name):
        raise VolumeError(f"invalid volume name {name!r}: only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed")
    v = Volume(root, name)
    if v.exists():
        return v
    private_dir(volumes_dir(root))  # a pre-filled volume holds the image's setuid files: see private_dir
    v.data.mkdir(parents=True, exist_ok=True)
    v._save({"name": name, "created": time.time(), "prefilled": False, "anonymous": anonymous})
    return v


def get(root: str | Path, name: str) -> Volume:
    v = Volume(root, name)
    if not v.exists():
        raise VolumeError(f"no such volume: {name}")
    return v


def list_volumes(root: str | Path) -> list[Volume]:
    d = volumes_dir(root)
    if not d.is_dir():
        return []
    return [Volume(root, p.name) for p in sorted(d.iterdir()) if (p / "volume.json").exists()]


def users(root: str | Path, name: str) -> list[str]:
    from .state import list_containers  # noqa: PLC0415 - state imports nothing from here; keep the graph flat

    out = []
    for c in list_containers(root):
        if any(m["kind"] in ("volume", "anon") and m["source"] == name for m in c.data.get("mounts", [])):
            out.append(c.id[:12])
    return out


def remove(root: str | Path, name: str, force: bool = False) -> None:
    v = get(root, name)
    used = users(root, name)
    if used and not force:
        raise VolumeError(f"remove {name}: volume is in use by container(s) {', '.join(used)}")
    remove_tree(v.dir)
