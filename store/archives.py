"""Reading image archives: OCI image layouts (directory or tar) and `docker save` archives (legacy manifest.json
and Docker >= 25's OCI form). This module finds the images in an archive, with their configs, layer descriptors
and names, checking every digest it reads; storing the layers is the importer's job.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import re
import tarfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from .errors import BadInput
from .refs import normalize_ref
from .tarsplit import StrictTarInfo, show

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
CONFIG_TYPES = {"application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json"}
LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar", "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar", "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
}


def host_arch() -> str:
    m = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(m, m)


@dataclass
class LayerRef:
    desc: dict  # the manifest's descriptor ({} for a legacy docker archive)
    name: str | None  # the member holding the blob, when the archive names it (legacy docker); else by digest


@dataclass
class ArchiveImage:
    config: bytes
    diff_ids: list[str]
    layers: list[LayerRef]
    tags: list[str]


# An image archive's index, manifests and configs are small; containers/image reads at most 4 MiB of each.
JSON_MAX = 4 << 20
# Members of an archive kept in memory while reading it: a few per image and layer in any real archive.
MEMBERS_MAX = 1 << 16
# No single read of an archive tar is larger (tarfile reads a PAX header or long name whole, at the size the
# header claims).
_READ_MAX = 16 << 20


class _BoundedFile(io.FileIO):
    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0 or n > _READ_MAX:
            raise BadInput(f"{self.name}: an archive member's header claims more than {_READ_MAX >> 20} MiB")
        return super().read(n)


def open_tar(path: str) -> tarfile.TarFile:
    """An archive tar, read with tarfile within bounds (strict sparse maps, no unbounded read)."""
    try:
        return tarfile.open(fileobj=_BoundedFile(path), mode="r:", tarinfo=StrictTarInfo)
    except (ValueError, OverflowError) as e:
        raise BadInput(f"{path}: malformed tar header: {e}") from None


class Blobs:
    """Read access to a layout or archive, directory or tar alike."""

    def __init__(self, src: str) -> None:
        self.src = src
        self.tar: tarfile.TarFile | None = None
        self.names: dict[str, tarfile.TarInfo] = {}
        if os.path.isfile(src):
            self.tar = open_tar(src)
            try:
                while (m := self.tar.next()) is not None:
                    self.tar.members.clear()  # tarfile keeps every member; only names are looked up here
                    self.names[m.name.lstrip("./") if m.name.startswith("./") else m.name] = m
                    if len(self.names) > MEMBERS_MAX:
                        raise BadInput(f"{src}: more than {MEMBERS_MAX} members: not an image archive")
            except (ValueError, OverflowError) as e:  # what tarfile lets out of a malformed header
                raise BadInput(f"{src}: malformed tar header: {e}") from None

    def exists(self, name: str) -> bool:
        if self.tar is not None:
            return name in self.names
        return os.path.isfile(os.path.join(self.src, name))

    @contextmanager
    def open(self, name: str) -> Iterator[BinaryIO]:
        if "\x00" in name or name.startswith("/") or ".." in name.split("/"):
            raise BadInput(f"archive refers to a path outside itself: {name!r}")
        if self.tar is not None:
            m = self.names.get(name)
            f = self.tar.extractfile(m) if m is not None else None
            if f is None:
                raise BadInput(f"archive is missing {name}")
            with f:
                yield f  # type: ignore[misc]
        else:
            try:
                f = open(os.path.join(self.src, name), "rb")
            except FileNotFoundError:
                raise BadInput(f"layout is missing {name}") from None
            with f:
                yield f

    def read(self, name: str) -> bytes:
        with self.open(name) as f:
            data = f.read(JSON_MAX + 1)
        if len(data) > JSON_MAX:
            raise BadInput(f"{name} is larger than {JSON_MAX >> 20} MiB: not an image index, manifest or config")
        return data

    def json(self, name: str, data: bytes | None = None):
        return parse_json(name, data if data is not None else self.read(name))

    def blob_name(self, digest: str) -> str:
        algo, _, hexd = digest.partition(":")
        if algo != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hexd):
            raise BadInput(f"unsupported or malformed digest {digest!r}")
        return f"blobs/sha256/{hexd}"

    def blob(self, desc: dict) -> bytes:
        digest = desc.get("digest", "")
        data = self.read(self.blob_name(digest))
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise BadInput(f"blob {digest} does not match its digest")
        return data


def parse_json(name: str, data: bytes):
    try:
        return json.loads(data)
    except ValueError as e:
        raise BadInput(f"{name} is not valid JSON: {e}") from None
    except RecursionError:
        raise BadInput(f"{name}: JSON nested too deeply") from None


_ARCHIVE_TOP = re.compile(r"^(?:\./)?(?:oci-layout|index\.json|manifest\.json|repositories|blobs(?:/.*)?|"
                          r"[0-9a-f]{64}(?:\.json|\.tar|/.*)?)/?$")
_MARKERS = ("index.json", "oci-layout", "manifest.json")


def is_archive_dir(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, n)) for n in _MARKERS)


def looks_like_archive(path: str) -> bool:
    """Whether a tar's first member is one an image archive starts with, as opposed to a root filesystem's
    ("./", "bin/"...). Saves reading every header of a large layer twice."""
    try:
        with open_tar(path) as tf:
            first = tf.next()
            while first is not None and first.name in (".", "./"):
                first = tf.next()
    except (tarfile.ReadError, EOFError, BadInput):
        return True  # let the full open report what is wrong
    return first is not None and bool(_ARCHIVE_TOP.match(first.name))


def read_images(b: Blobs, where: str) -> list[ArchiveImage]:
    """Every image the archive holds (for an index of several platforms, the host's, else the first)."""
    try:
        found = _images(b, where)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        # index, manifest or config JSON of the wrong shape (a list where an object belongs, and so on)
        raise BadInput(f"{where}: malformed image metadata ({type(e).__name__}: {e})") from None
    out = []
    for cfg_bytes, layers, tags in found:
        diff_ids = _diff_ids(cfg_bytes)
        if len(diff_ids) != len(layers):
            raise BadInput(f"config lists {len(diff_ids)} layers, manifest {len(layers)}")
        out.append(ArchiveImage(cfg_bytes, diff_ids, layers, tags))
    return out


def _diff_ids(cfg_bytes: bytes) -> list[str]:
    try:
        diff_ids = parse_json("config", cfg_bytes)["rootfs"]["diff_ids"]
        if not isinstance(diff_ids, list) or not all(isinstance(d, str) for d in diff_ids):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise BadInput("config: not an image config (no rootfs.diff_ids)") from None
    return diff_ids


def _images(b: Blobs, where: str) -> list[tuple[bytes, list[LayerRef], list[str]]]:
    found: list[tuple[bytes, list[LayerRef], list[str]]] = []
    if b.exists("index.json"):
        if b.exists("oci-layout"):
            layout = b.json("oci-layout")
            if not isinstance(layout, dict) or "imageLayoutVersion" not in layout:
                raise BadInput("oci-layout: no imageLayoutVersion")
        docker_tags = _docker_tags(b) if b.exists("manifest.json") else {}
        index = b.json("index.json")
        for desc in index.get("manifests", []) if isinstance(index, dict) else []:
            found.extend(_from_descriptor(b, desc, docker_tags))
        if not found:
            raise BadInput("index.json lists no image manifests")
    elif b.exists("manifest.json"):
        found.extend(_from_docker_manifest(b))
    else:
        raise BadInput(f"{where}: neither index.json nor manifest.json")
    return found


def _from_descriptor(b: Blobs, desc: dict, docker_tags: dict, depth: int = 0):
    mt = desc.get("mediaType")
    annotations = desc.get("annotations") or {}
    ref = annotations.get("io.containerd.image.name") or annotations.get("org.opencontainers.image.ref.name")
    if mt in (OCI_INDEX, DOCKER_LIST):
        if depth > 4:
            raise BadInput("image index nested too deeply")
        sub = b.json("index", b.blob(desc))
        manifests = sub.get("manifests", [])
        want = host_arch()
        chosen = [m for m in manifests if (m.get("platform") or {}).get("architecture") == want] or manifests[:1]
        out = []
        for m in chosen[:1]:
            if ref and "annotations" not in m:
                m = dict(m, annotations={"org.opencontainers.image.ref.name": ref})
            out.extend(_from_descriptor(b, m, docker_tags, depth + 1))
        return out
    if mt not in (OCI_MANIFEST, DOCKER_MANIFEST):
        raise BadInput(f"manifest {desc.get('digest')}: unknown media type {mt!r}")
    man = b.json("manifest", b.blob(desc))
    cdesc = man.get("config") or {}
    if cdesc.get("mediaType") not in CONFIG_TYPES:
        raise BadInput(f"config {cdesc.get('digest')}: unknown media type {cdesc.get('mediaType')!r}")
    cfg = b.blob(cdesc)
    tags = docker_tags.get(cdesc["digest"]) or _ref_tags(ref)
    layers = man.get("layers", [])
    if not isinstance(layers, list) or not all(isinstance(d, dict) for d in layers):
        raise BadInput(f"manifest {desc.get('digest')}: layers is not a list of descriptors")
    return [(cfg, [LayerRef(d, None) for d in layers], tags)]


def _docker_tags(b: Blobs) -> dict[str, list[str]]:
    out = {}
    man = b.json("manifest.json")
    for item in man if isinstance(man, list) else []:
        cfg = item.get("Config", "")
        hexd = cfg.rsplit("/", 1)[-1].removesuffix(".json")
        out["sha256:" + hexd] = [normalize_ref(t) for t in item.get("RepoTags") or []]
    return out


def _from_docker_manifest(b: Blobs):
    man = b.json("manifest.json")
    if not isinstance(man, list):
        raise BadInput("manifest.json is not a list of images")
    out = []
    for item in man:
        cfg_name = item.get("Config")
        if not isinstance(cfg_name, str):
            raise BadInput("manifest.json entry without Config")
        cfg = b.read(cfg_name)
        hexd = cfg_name.rsplit("/", 1)[-1].removesuffix(".json")
        if re.fullmatch(r"[0-9a-f]{64}", hexd) and hashlib.sha256(cfg).hexdigest() != hexd:
            raise BadInput(f"config {cfg_name} does not match its digest")
        layers = [LayerRef({}, name) for name in item.get("Layers") or []]
        out.append((cfg, layers, [normalize_ref(t) for t in item.get("RepoTags") or []]))
    return out


def _ref_tags(ref: str | None) -> list[str]:
    # An OCI ref.name may be a bare tag ("latest") or a full reference; either is taken as the image's name
    # (skopeo's oci:DIR:NAME writes NAME there). One that is no valid reference is not a reason to refuse.
    try:
        return [normalize_ref(ref)] if ref else []
    except BadInput:
        return []
