"""What each storage dedup strategy would hold for a set of stored images: layer, file and chunk level side by side.

Every figure counts file content bytes (regular files; hardlinks once; empty files, directories, symlinks and
whiteouts hold none), so that the strategies compare like with like; the tar headers around them are reported apart
(`tar_bytes` of the layer rows). Strategies, each over the units it would store once:

    logical    every image's layers in full, no sharing at all (the baseline of every ratio)
    layer      distinct layers (Docker's registry and overlay2 model): sum of their content bytes
    file       distinct file contents (lamina's store, composefs, Gear): from the index alone, no object is read
    fixed-4k, fixed-64k   distinct fixed-size blocks of each file (EROFS/ZFS-style block dedup)
    cdc-16k, cdc-64k      distinct FastCDC chunks of each file (average 16/64 KiB; min avg/4, max avg*4; pyfastcdc)

Chunks are cut per file (a file boundary is always a chunk boundary) and named by XXH3-128, 16 bytes: these are
statistics, not a store, so a collision (about 2^-64 at 10^10 chunks) is not checked. Compressed sizes: each distinct
unit compressed on its own with zstd level 3 (what a chunk or object store, or a registry serving zstd layers,
keeps); layer tars also with gzip -6 (how layers are pushed today).

Speed: the chunk strategies share one pass over the distinct objects the images reference, each read once and fed to
every chunker; layer tars are compressed on a second thread meanwhile (zlib and zstd release the GIL). Memory grows
with the number of distinct chunks (one dict entry, ~150 bytes, per distinct chunk: see `anon_rss_bytes`), not with
the bytes scanned: 432,000 chunks took 67 MB. Past tens of millions of chunks a SQLite table would be the next step.
"""
from __future__ import annotations

import mmap
import resource
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import xxhash
import zstandard

from .errors import StoreError
from .reader import load_image
from .root import Store
from .schema import INLINE_MAX

CHUNK_STRATEGIES = ("fixed-4k", "fixed-64k", "cdc-16k", "cdc-64k")
STRATEGIES = ("layer", "file", *CHUNK_STRATEGIES)
ZSTD_LEVEL = 3  # zstd's default, what registries and `zstd` use
GZIP_LEVEL = 6  # gzip's and Go's compress/gzip default: docker push
_MMAP_FROM = 4 << 20  # larger objects are mapped rather than read into memory
_SIZE_BITS = 32  # a unit's value packs images mask << 64 | compressed size << 32 | size


@dataclass
class ImageInfo:
    id: str
    tags: list[str]
    layers: int


@dataclass
class PerImage:
    bytes: int = 0          # distinct units of this image
    zstd_bytes: int = 0
    objects: int = 0
    unique_bytes: int = 0   # units no other analysed image has
    shared_bytes: int = 0   # units at least one other analysed image has


@dataclass
class StrategyResult:
    name: str
    bytes: int = 0
    zstd_bytes: int | None = None
    gzip_bytes: int | None = None
    tar_bytes: int | None = None  # layer and logical: the tars themselves, headers included
    objects: int = 0  # units stored: layers, contents or chunks (what an index must hold)
    seconds: float = 0.0
    per_image: list[PerImage] = field(default_factory=list)
    shared: list[list[int]] = field(default_factory=list)  # [i][j]: bytes images i and j both hold; [i][i] = own


@dataclass
class LayerInfo:
    id: int
    diff_id: str
    tar_bytes: int
    content_bytes: int
    mask: int = 0  # images using it, one bit per image in analysis order
    unique_bytes: int = 0  # file level: contents no other analysed layer has
    gzip_bytes: int | None = None
    zstd_bytes: int | None = None


@dataclass
class Analysis:
    images: list[ImageInfo]
    layers: list[LayerInfo]
    strategies: list[StrategyResult]
    logical_bytes: int
    scan_bytes: int = 0  # distinct object bytes read by the chunk pass
    scan_seconds: float = 0.0  # wall time of the chunk pass (reading included, compression included)
    scan_cpu_seconds: float = 0.0  # CPU time of the thread that ran it: the wall time on an idle core
    seconds: float = 0.0
    peak_rss_bytes: int = 0  # mapped large contents included
    anon_rss_bytes: int = 0  # anonymous memory resident at the end, chunk tables alive (mapped contents excluded)
    compress: bool = True
    # distinct non-empty contents: hash -> (size, images mask, layers holding it); for the result database
    objects: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    def strategy(self, name: str) -> StrategyResult:
        return next(s for s in self.strategies if s.name == name)


class _Groups:
    """Units grouped by the set of images holding them (a bit mask): every per-image and pairwise figure is a sum
    over the few distinct masks rather than over the units."""

    def __init__(self) -> None:
        self.by_mask: dict[int, list[int]] = {}  # mask -> [bytes, zstd bytes, units]

    def add(self, mask: int, size: int, zsize: int = 0, n: int = 1) -> None:
        g = self.by_mask.get(mask)
        if g is None:
            self.by_mask[mask] = [size, zsize, n]
        else:
            g[0] += size
            g[1] += zsize
            g[2] += n

    def result(self, name: str, n_images: int, compressed: bool) -> StrategyResult:
        r = StrategyResult(name, per_image=[PerImage() for _ in range(n_images)],
                           shared=[[0] * n_images for _ in range(n_images)])
        r.zstd_bytes = 0 if compressed else None
        for mask, (size, zsize, n) in self.by_mask.items():
            r.bytes += size
            r.objects += n
            if compressed:
                r.zstd_bytes += zsize
            bits = [i for i in range(n_images) if mask >> i & 1]
            for i in bits:
                p = r.per_image[i]
                p.bytes += size
                p.zstd_bytes += zsize
                p.objects += n
                if len(bits) == 1:
                    p.unique_bytes += size
                else:
                    p.shared_bytes += size
                row = r.shared[i]
                for j in bits:
                    row[j] += size
        return r


class _Chunker:
    """One chunk strategy: distinct chunk digest -> packed (images mask, compressed size, size)."""

    def __init__(self, name: str, compress: bool) -> None:
        self.name = name
        self.seen: dict[bytes, int] = {}
        self.seconds = 0.0
        self._z = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress if compress else None
        if name.startswith("cdc-"):
            from pyfastcdc import FastCDC  # noqa: PLC0415 - only when chunking
            self._cdc = FastCDC(int(name[4:-1]) * 1024)
            self.block = 0
        else:
            self._cdc = None
            self.block = int(name[6:-1]) * 1024

    @property
    def smallest(self) -> int:
        """Contents up to this size are one piece: a block, or FastCDC's minimum chunk (avg/4)."""
        return self._cdc.min_size if self._cdc is not None else self.block

    def feed(self, data: memoryview, mask: int) -> None:
        t = time.perf_counter()
        if self._cdc is not None:
            pieces = [c.data for c in self._cdc.cut_buf(data)]
        else:
            bs = self.block
            pieces = [data[i:i + bs] for i in range(0, len(data), bs)]
        seen, z, hi = self.seen, self._z, mask << 64
        for d, piece in zip(map(xxhash.xxh3_128_digest, pieces), pieces):
            v = seen.get(d)
            if v is None:
                seen[d] = hi | ((len(z(piece)) if z else 0) << _SIZE_BITS) | len(piece)
            elif v | hi != v:
                seen[d] = v | hi
        self.seconds += time.perf_counter() - t

    def feed_one(self, d: bytes, data: memoryview, hi: int) -> None:
        """A content of at most `smallest` bytes, hashed once for every chunker (`hi`: its mask << 64)."""
        t = time.perf_counter()
        v = self.seen.get(d)
        if v is None:
            self.seen[d] = hi | ((len(self._z(data)) if self._z else 0) << _SIZE_BITS) | len(data)
        elif v | hi != v:
            self.seen[d] = v | hi
        self.seconds += time.perf_counter() - t

    def groups(self) -> _Groups:
        g = _Groups()
        low = (1 << _SIZE_BITS) - 1
        for v in self.seen.values():
            g.add(v >> 64, v & low, (v >> _SIZE_BITS) & low)
        return g


def _zstd_size(data: memoryview) -> int:
    """Compressed size of a whole content, in bounded memory for large ones."""
    z = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    if len(data) <= _MMAP_FROM:
        return len(z.compress(data))
    c = z.compressobj(size=len(data))
    n = 0
    step = 8 << 20
    for i in range(0, len(data), step):
        n += len(c.compress(data[i:i + step]))
    return n + len(c.flush())


def select_images(store: Store, refs: list[str], all_images: bool) -> list[ImageInfo]:
    from .reader import resolve  # noqa: PLC0415
    if all_images:
        ids = [i for (i,) in store.db.execute("SELECT id FROM images ORDER BY created, id")]
    else:
        ids = list(dict.fromkeys(resolve(store, r) for r in refs))
    if not ids:
        raise StoreError("no images to analyse (name some, or use --all on a store that has images)")
    out = []
    for i in ids:
        img = load_image(store, i)
        out.append(ImageInfo(i, img.tags, len(img.layer_ids)))
    return out


def _layers(store: Store, images: list[ImageInfo]) -> tuple[list[LayerInfo], list[list[LayerInfo]]]:
    """Distinct layers of the images with their masks, and each image's layers bottom to top."""
    layers: dict[int, LayerInfo] = {}
    per_image = []
    for bit, img in enumerate(images):
        rows = store.db.execute("SELECT l.id, l.diff_id, l.size, l.content_size FROM image_layers il "
                                "JOIN layers l ON l.id = il.layer_id WHERE il.image_id=? ORDER BY il.position",
                                (img.id,)).fetchall()
        mine = []
        for lid, diff_id, size, content in rows:
            layer = layers.setdefault(lid, LayerInfo(lid, diff_id, size, content))
            layer.mask |= 1 << bit
            mine.append(layer)
        per_image.append(mine)
    return list(layers.values()), per_image


def _file_level(store: Store, layers: list[LayerInfo]) -> dict[str, tuple[int, int, int]]:
    """Distinct non-empty contents of the layers: hash -> (size, images mask, number of layers holding it); sets
    each layer's unique_bytes."""
    objs: dict[str, list] = {}
    # entries.size is the content's size: no join with objects, no DISTINCT (those took 2.6-3.5 s over 75,000
    # files; this takes 0.2-0.3 s)
    q = "SELECT object, size FROM entries WHERE layer_id=? AND object IS NOT NULL AND size > 0"
    for layer in layers:
        for h, size in store.db.execute(q, (layer.id,)):
            o = objs.get(h)
            if o is None:
                objs[h] = [size, layer.mask, 1, layer]
            elif o[3] is not layer:  # a second layer holding it (not a hardlink or copy within the same one)
                o[1] |= layer.mask
                o[2] += 1
                o[3] = layer
    for size, _, n, layer in objs.values():
        if n == 1:
            layer.unique_bytes += size
    return {h: (o[0], o[1], o[2]) for h, o in objs.items()}


def _open_contents(store: Store, objects: dict[str, tuple[int, int, int]]) -> Iterator[tuple[str, memoryview]]:
    """Each object's bytes once: inlined ones in batches from the index, files read (or mapped when large)."""
    inline = [h for h, (size, _, _) in objects.items() if size <= INLINE_MAX]
    for i in range(0, len(inline), 500):
        batch = inline[i:i + 500]
        rows = store.db.execute(f"SELECT hash, data FROM objects WHERE hash IN ({','.join('?' * len(batch))}) "
                                "AND data IS NOT NULL", batch).fetchall()
        found = {h: d for h, d in rows}
        for h in batch:
            if h in found:
                yield h, memoryview(found[h])
            else:  # an old store may keep small contents as files
                with open(store.object_path(h), "rb") as f:
                    yield h, memoryview(f.read())
    for h in sorted(h for h, (size, _, _) in objects.items() if size > INLINE_MAX):
        with open(store.object_path(h), "rb") as f:
            if objects[h][0] < _MMAP_FROM:
                yield h, memoryview(f.read())
            else:
                m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
                yield h, memoryview(m)
                try:
                    m.close()
                except BufferError:  # a chunk view still alive: the map goes with it
                    pass


def _compress_layers(store: Store, layers: list[LayerInfo], done: list) -> None:
    """Thread body: each distinct layer tar, rebuilt from the store, through gzip -6 and zstd -3."""
    from .export import layer_bytes  # noqa: PLC0415
    t = time.perf_counter()
    try:
        for layer in layers:
            gz = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)  # 31: gzip framing
            zs = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compressobj(size=layer.tar_bytes)
            g = z = 0
            for piece in layer_bytes(store, layer.id):
                g += len(gz.compress(piece))
                z += len(zs.compress(piece))
            layer.gzip_bytes = g + len(gz.flush())
            layer.zstd_bytes = z + len(zs.flush())
    except BaseException as e:  # handed to the caller's thread
        done.append(e)
    finally:
        store.close()  # this thread's connection
    done.append(time.perf_counter() - t)


@dataclass
class _Scan:
    """The one pass over the distinct contents: every chunker fed, and each content's zstd size when asked."""
    bytes: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    zstd_seconds: float = 0.0
    file_zstd: dict[str, int] = field(default_factory=dict)

    def run(self, store: Store, objects: dict[str, tuple[int, int, int]], chunkers: list[_Chunker],
            file_zstd: bool, progress: Callable[[int], None] | None, total: Callable[[int], None] | None) -> None:
        wall, cpu = time.perf_counter(), time.thread_time()
        if total:
            total(sum(size for size, _, _ in objects.values()))
        small = min((c.smallest for c in chunkers), default=0)
        for h, data in _open_contents(store, objects):
            mask = objects[h][1]
            if len(data) <= small:  # most contents: one piece under every strategy, hashed once for all
                d, hi = xxhash.xxh3_128_digest(data), mask << 64
                for c in chunkers:
                    c.feed_one(d, data, hi)
            else:
                for c in chunkers:
                    c.feed(data, mask)
            if file_zstd:
                t = time.perf_counter()
                self.file_zstd[h] = _zstd_size(data)
                self.zstd_seconds += time.perf_counter() - t
            self.bytes += len(data)
            if progress:
                progress(len(data))
        self.seconds, self.cpu_seconds = time.perf_counter() - wall, time.thread_time() - cpu


def analyse(store: Store, images: list[ImageInfo], strategies: tuple[str, ...] = STRATEGIES, compress: bool = True,
            progress: Callable[[int], None] | None = None, total: Callable[[int], None] | None = None) -> Analysis:
    """Every requested strategy over `images` (the bit of image i in masks is 1 << i). `total` is told the bytes
    the chunk pass will read before it starts, `progress` the bytes of each object read."""
    unknown = set(strategies) - set(STRATEGIES)
    if unknown:
        raise StoreError(f"unknown strategy {sorted(unknown)[0]!r} (one of {', '.join(STRATEGIES)})")
    started = time.perf_counter()
    n = len(images)
    layers, image_layers = _layers(store, images)
    logical_g = _Groups()
    for bit, mine in enumerate(image_layers):
        for layer in mine:
            logical_g.add(1 << bit, layer.content_bytes)
    logical_r = logical_g.result("logical", n, False)
    logical_r.tar_bytes = sum(layer.tar_bytes for mine in image_layers for layer in mine)

    thread, done = None, []
    if "layer" in strategies and compress:
        thread = threading.Thread(target=_compress_layers, args=(store, layers, done), name="dedup-layers",
                                  daemon=True)
        thread.start()

    t = time.perf_counter()
    objects = _file_level(store, layers)
    file_index_seconds = time.perf_counter() - t
    results: dict[str, StrategyResult] = {}
    if "file" in strategies:
        g = _Groups()
        for size, mask, _ in objects.values():
            g.add(mask, size)
        results["file"] = g.result("file", n, False)
        results["file"].seconds = file_index_seconds

    chunkers = [_Chunker(s, compress) for s in CHUNK_STRATEGIES if s in strategies]
    scan = _Scan()
    if chunkers or ("file" in strategies and compress):
        scan.run(store, objects, chunkers, compress and "file" in strategies, progress, total)
    if "file" in strategies and compress:
        g = _Groups()
        for h, (size, mask, _) in objects.items():
            g.add(mask, size, scan.file_zstd[h])
        results["file"] = g.result("file", n, True)
        results["file"].seconds = file_index_seconds + scan.zstd_seconds
    for c in chunkers:
        t = time.perf_counter()
        results[c.name] = c.groups().result(c.name, n, compress)
        results[c.name].seconds = c.seconds + time.perf_counter() - t

    if "layer" in strategies:
        t = time.perf_counter()
        g = _Groups()
        for layer in layers:
            g.add(layer.mask, layer.content_bytes)
        r = g.result("layer", n, False)
        r.tar_bytes = sum(layer.tar_bytes for layer in layers)
        r.seconds = time.perf_counter() - t
        if thread is not None:
            thread.join()
            if isinstance(done[0], BaseException):
                raise done[0]
            r.seconds += done[0]
            r.zstd_bytes = sum(layer.zstd_bytes or 0 for layer in layers)
            r.gzip_bytes = sum(layer.gzip_bytes or 0 for layer in layers)
            logical_r.zstd_bytes = logical_r.gzip_bytes = 0  # every image's layers compressed in full
            for p, lp, mine in zip(r.per_image, logical_r.per_image, image_layers):
                p.zstd_bytes = sum(layer.zstd_bytes or 0 for layer in {id(x): x for x in mine}.values())
                lp.zstd_bytes = sum(layer.zstd_bytes or 0 for layer in mine)
                logical_r.zstd_bytes += lp.zstd_bytes
                logical_r.gzip_bytes += sum(layer.gzip_bytes or 0 for layer in mine)
        results["layer"] = r

    ordered = [logical_r] + [results[s] for s in STRATEGIES if s in results]
    return Analysis(images, layers, ordered, logical_r.bytes, scan.bytes, scan.seconds, scan.cpu_seconds,
                    time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                    _anon_rss(), compress, objects)


def _anon_rss() -> int:
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("RssAnon:"))
    except (OSError, StopIteration):
        return 0
