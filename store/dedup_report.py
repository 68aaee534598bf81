"""Presenting a dedup analysis (store/dedup.py): a table, stable JSON and CSV, a SQLite result database, a chart.

JSON (`"format": "lamina-dedup/1"`; fields are only ever added):
    images      [{id, tags, layers}] in analysis order: index i is image i of every per-image list and matrix
    strategies  [{name, bytes, zstd_bytes, gzip_bytes, tar_bytes, objects, ratio, seconds}] logical first; bytes are
                file content bytes; ratio = logical bytes / bytes; zstd/gzip null when not computed
    per_image   {strategy: [{bytes, zstd_bytes, objects, unique_bytes, shared_bytes}]}
    shared      {strategy: [[bytes]]}: [i][j] bytes images i and j both hold under that strategy ([i][i]: image i's)
    layers      [{diff_id, tar_bytes, content_bytes, gzip_bytes, zstd_bytes, unique_bytes, images: [i…]}]
    scan        {bytes, seconds, mb_per_s, cpu_seconds}: the one pass over distinct contents feeding every chunker
                (cpu_seconds: of the thread that ran it, what the pass takes on a core of its own)
    seconds, peak_rss_bytes (mapped large contents included), anon_rss_bytes (anonymous memory resident at the
                end, the chunk tables alive: what the analysis itself holds), compress
"""
from __future__ import annotations

import csv
import datetime as dt
import io
import json

from .cli import human as cli_human
from .dedup import Analysis, ImageInfo, LayerInfo, PerImage, StrategyResult

# The result database. Every run appends; rows carry their run id. Tables, with what each row is:
DB_TABLES: dict[str, tuple[dict, list[str], list[list[str]]]] = {
    # one row per `lamina dedup --db` run
    "runs": ({"id": int, "started": str, "store": str, "images": int, "compress": int, "seconds": float,
              "scan_bytes": int, "scan_seconds": float, "peak_rss_bytes": int, "anon_rss_bytes": int}, ["id"], []),
    # the images of a run; position = the image's bit/index in the run
    "images": ({"run_id": int, "image_id": str, "position": int, "tags": str, "layers": int},
               ["run_id", "image_id"], []),
    # the whole set under each strategy (logical = every image's layers in full)
    "strategies": ({"run_id": int, "strategy": str, "bytes": int, "zstd_bytes": int, "gzip_bytes": int,
                    "tar_bytes": int, "objects": int, "ratio": float, "seconds": float},
                   ["run_id", "strategy"], []),
    # each image under each strategy: its distinct units, those no other image has, those some other image has
    "image_strategies": ({"run_id": int, "strategy": str, "image_id": str, "bytes": int, "zstd_bytes": int,
                          "objects": int, "unique_bytes": int, "shared_bytes": int},
                         ["run_id", "strategy", "image_id"], [["run_id", "image_id"]]),
    # the image x image matrix: bytes both images hold under a strategy (a = b: the image's own bytes)
    "shared": ({"run_id": int, "strategy": str, "image_a": str, "image_b": str, "bytes": int},
               ["run_id", "strategy", "image_a", "image_b"], []),
    # distinct layers; unique_bytes = contents no other analysed layer holds (file level)
    "layers": ({"run_id": int, "diff_id": str, "tar_bytes": int, "content_bytes": int, "gzip_bytes": int,
                "zstd_bytes": int, "unique_bytes": int, "images": int}, ["run_id", "diff_id"], []),
    # distinct non-empty file contents; path = one path holding it (the smallest)
    "files": ({"run_id": int, "object": str, "size": int, "images": int, "layers": int, "path": str},
              ["run_id", "object"], [["run_id", "size"], ["run_id", "path"]]),
    # which image holds which content
    "file_images": ({"run_id": int, "object": str, "image_id": str}, ["run_id", "object", "image_id"],
                    [["run_id", "image_id"]]),
}


def human(n: int | None) -> str:
    return "-" if n is None else cli_human(n)


def ratio(a: Analysis, s: StrategyResult) -> float | None:
    return round(a.logical_bytes / s.bytes, 3) if s.bytes else None


def label(a: Analysis, i: int) -> str:
    img = a.images[i]
    return img.tags[0] if img.tags else img.id[7:19]


def to_json(a: Analysis) -> dict:
    return {
        "format": "lamina-dedup/1",
        "images": [{"id": i.id, "tags": i.tags, "layers": i.layers} for i in a.images],
        "strategies": [{"name": s.name, "bytes": s.bytes, "zstd_bytes": s.zstd_bytes, "gzip_bytes": s.gzip_bytes,
                        "tar_bytes": s.tar_bytes, "objects": s.objects, "ratio": ratio(a, s),
                        "seconds": round(s.seconds, 3)} for s in a.strategies],
        "per_image": {s.name: [dict(p.__dict__) for p in s.per_image] for s in a.strategies},
        "shared": {s.name: s.shared for s in a.strategies},
        "layers": [{"diff_id": layer.diff_id, "tar_bytes": layer.tar_bytes, "content_bytes": layer.content_bytes,
                    "gzip_bytes": layer.gzip_bytes, "zstd_bytes": layer.zstd_bytes,
                    "unique_bytes": layer.unique_bytes,
                    "images": [i for i in range(len(a.images)) if layer.mask >> i & 1]} for layer in a.layers],
        "scan": {"bytes": a.scan_bytes, "seconds": round(a.scan_seconds, 3),
                 "mb_per_s": round(a.scan_bytes / a.scan_seconds / 1e6, 1) if a.scan_seconds else None,
                 "cpu_seconds": round(a.scan_cpu_seconds, 3)},
        "seconds": round(a.seconds, 3),
        "peak_rss_bytes": a.peak_rss_bytes,
        "anon_rss_bytes": a.anon_rss_bytes,
        "compress": a.compress,
    }


def from_json(d: dict) -> Analysis:
    """An analysis back from its JSON (`to_json`), to draw or report it again without running it."""
    images = [ImageInfo(i["id"], i["tags"], i["layers"]) for i in d["images"]]
    strategies = [StrategyResult(x["name"], x["bytes"], x["zstd_bytes"], x["gzip_bytes"], x["tar_bytes"],
                                 x["objects"], x["seconds"], [PerImage(**p) for p in d["per_image"][x["name"]]],
                                 d["shared"][x["name"]]) for x in d["strategies"]]
    layers = [LayerInfo(0, x["diff_id"], x["tar_bytes"], x["content_bytes"], sum(1 << i for i in x["images"]),
                        x["unique_bytes"], x["gzip_bytes"], x["zstd_bytes"]) for x in d["layers"]]
    scan = d["scan"]
    return Analysis(images, layers, strategies, strategies[0].bytes, scan["bytes"], scan["seconds"],
                    scan.get("cpu_seconds", 0.0), d["seconds"], d["peak_rss_bytes"], d.get("anon_rss_bytes", 0),
                    d["compress"])


CSV_FIELDS = ["strategy", "image", "tags", "bytes", "zstd_bytes", "gzip_bytes", "tar_bytes", "objects",
              "unique_bytes", "shared_bytes", "ratio", "seconds"]


def to_csv(a: Analysis) -> str:
    """One row per strategy for the set (image empty), then one per strategy and image."""
    out = io.StringIO()
    w = csv.DictWriter(out, CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for s in a.strategies:
        w.writerow({"strategy": s.name, "image": "", "tags": "", "bytes": s.bytes, "zstd_bytes": s.zstd_bytes,
                    "gzip_bytes": s.gzip_bytes, "tar_bytes": s.tar_bytes, "objects": s.objects,
                    "ratio": ratio(a, s), "seconds": round(s.seconds, 3)})
    for s in a.strategies:
        for img, p in zip(a.images, s.per_image):
            w.writerow({"strategy": s.name, "image": img.id, "tags": " ".join(img.tags), "bytes": p.bytes,
                        "zstd_bytes": p.zstd_bytes if s.zstd_bytes is not None else None, "objects": p.objects,
                        "unique_bytes": p.unique_bytes, "shared_bytes": p.shared_bytes})
    return out.getvalue()


def _table(rows: list[list[str]], headers: list[str]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    return ["   ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip() for r in [headers, *rows]]


def to_table(a: Analysis) -> str:
    rows = []
    for s in a.strategies:
        r = ratio(a, s)
        rows.append([s.name, human(s.bytes), human(s.zstd_bytes), human(s.gzip_bytes), f"{s.objects:,}",
                     f"{r:.2f}x" if r else "-", f"{s.seconds:.2f}s"])
    lines = [f"{len(a.images)} images, {len(a.layers)} distinct layers; file content bytes (tar headers apart)", ""]
    lines += _table(rows, ["STRATEGY", "STORED", "ZSTD", "GZIP", "UNITS", "RATIO", "TIME"])
    lines += ["", "Per image: bytes no other image holds (what the image adds to the set) / bytes it holds", ""]
    names = [s.name for s in a.strategies if s.name != "logical"]
    per = []
    for i in range(len(a.images)):
        per.append([label(a, i), a.images[i].id[7:19]] +
                   [f"{human(s.per_image[i].unique_bytes)}/{human(s.per_image[i].bytes)}"
                    for s in a.strategies if s.name != "logical"])
    lines += _table(per, ["IMAGE", "ID", *[n.upper() for n in names]])
    if a.scan_seconds and a.scan_bytes:
        lines += ["", f"chunk pass: {human(a.scan_bytes)} of distinct contents in {a.scan_seconds:.2f}s "
                      f"({a.scan_bytes / a.scan_seconds / 1e6:.0f} MB/s; {a.scan_cpu_seconds:.2f}s of CPU); "
                      f"total {a.seconds:.2f}s; "
                      f"peak RSS {human(a.peak_rss_bytes)} (anonymous {human(a.anon_rss_bytes)})"]
    return "\n".join(lines)


def _file_paths(store, objects: dict) -> dict[str, str]:
    """One path per content (the smallest), for the files table."""
    paths: dict[str, str] = {}
    hashes = list(objects)
    for i in range(0, len(hashes), 500):
        batch = hashes[i:i + 500]
        q = (f"SELECT object, min(CASE parent WHEN '/' THEN '/' || name ELSE parent || '/' || name END) "
             f"FROM entries WHERE object IN ({','.join('?' * len(batch))}) GROUP BY object")
        paths.update(store.db.execute(q, batch).fetchall())
    return paths


def write_db(a: Analysis, store, path: str) -> int:
    """Appends the run to the SQLite database at `path` (created with its tables and indexes); returns its id."""
    import sqlite_utils  # noqa: PLC0415
    db = sqlite_utils.Database(path)
    for name, (cols, pk, indexes) in DB_TABLES.items():
        t = db[name]
        t.create(cols, pk=pk[0] if len(pk) == 1 else pk, if_not_exists=True)
        for ix in indexes:
            t.create_index(ix, if_not_exists=True)
    with db.conn:
        run = db["runs"].insert({"started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                                 "store": str(store.root), "images": len(a.images), "compress": int(a.compress),
                                 "seconds": round(a.seconds, 3), "scan_bytes": a.scan_bytes,
                                 "scan_seconds": round(a.scan_seconds, 3), "peak_rss_bytes": a.peak_rss_bytes,
                                 "anon_rss_bytes": a.anon_rss_bytes}, alter=True).last_pk
        ids = [i.id for i in a.images]
        db["images"].insert_all({"run_id": run, "image_id": img.id, "position": n, "tags": json.dumps(img.tags),
                                 "layers": img.layers} for n, img in enumerate(a.images))
        db["strategies"].insert_all({"run_id": run, "strategy": s.name, "bytes": s.bytes, "zstd_bytes": s.zstd_bytes,
                                     "gzip_bytes": s.gzip_bytes, "tar_bytes": s.tar_bytes, "objects": s.objects,
                                     "ratio": ratio(a, s), "seconds": round(s.seconds, 3)} for s in a.strategies)
        db["image_strategies"].insert_all(
            {"run_id": run, "strategy": s.name, "image_id": ids[i], "bytes": p.bytes,
             "zstd_bytes": p.zstd_bytes if s.zstd_bytes is not None else None, "objects": p.objects,
             "unique_bytes": p.unique_bytes, "shared_bytes": p.shared_bytes}
            for s in a.strategies for i, p in enumerate(s.per_image))
        db["shared"].insert_all({"run_id": run, "strategy": s.name, "image_a": ids[i], "image_b": ids[j],
                                 "bytes": s.shared[i][j]}
                                for s in a.strategies for i in range(len(ids)) for j in range(len(ids)))
        db["layers"].insert_all({"run_id": run, "diff_id": layer.diff_id, "tar_bytes": layer.tar_bytes,
                                 "content_bytes": layer.content_bytes, "gzip_bytes": layer.gzip_bytes,
                                 "zstd_bytes": layer.zstd_bytes, "unique_bytes": layer.unique_bytes,
                                 "images": bin(layer.mask).count("1")} for layer in a.layers)
        paths = _file_paths(store, a.objects)
        db["files"].insert_all({"run_id": run, "object": h, "size": size, "images": bin(mask).count("1"),
                                "layers": n, "path": paths.get(h)} for h, (size, mask, n) in a.objects.items())
        db["file_images"].insert_all({"run_id": run, "object": h, "image_id": ids[i]}
                                     for h, (_, mask, _) in a.objects.items()
                                     for i in range(len(ids)) if mask >> i & 1)
    return run


def chart(a: Analysis, path: str, heatmaps: tuple[str, ...] = ("layer", "file", "cdc-16k")) -> None:
    """Bars of every strategy's stored bytes (raw, zstd, gzip) and heatmaps of the shared fraction per pair."""
    try:
        import matplotlib  # noqa: PLC0415
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        from .errors import StoreError  # noqa: PLC0415
        raise StoreError("--chart needs matplotlib: pip install 'lamina[bench]'") from None
    maps = [a.strategy(h) for h in heatmaps if any(s.name == h for s in a.strategies)]
    n = len(a.images)
    fig = plt.figure(figsize=(max(10, 4.5 * len(maps)), 5 + max(3.0, 0.35 * n) + 1))
    grid = fig.add_gridspec(2, max(1, len(maps)), height_ratios=[5, max(3.0, 0.35 * n) + 1])
    ax = fig.add_subplot(grid[0, :])
    names = [s.name for s in a.strategies]
    x = range(len(names))
    w = 0.27
    mb = 1e6
    ax.bar([i - w for i in x], [s.bytes / mb for s in a.strategies], w, label="raw")
    ax.bar(list(x), [(s.zstd_bytes or 0) / mb for s in a.strategies], w, label="zstd -3")
    ax.bar([i + w for i in x], [(s.gzip_bytes or 0) / mb for s in a.strategies], w, label="gzip -6 (layer tars)")
    for i, s in enumerate(a.strategies):
        r = ratio(a, s)
        if r:
            ax.annotate(f"{r:.2f}x", (i - w, s.bytes / mb), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), names)
    ax.set_ylabel("MB stored (file contents)")
    ax.set_title(f"Dedup strategies over {n} images (ratio = logical / stored)")
    ax.legend()
    labels = [label(a, i) for i in range(n)]
    for k, s in enumerate(maps):
        hm = fig.add_subplot(grid[1, k])
        frac = [[s.shared[i][j] / s.shared[i][i] if s.shared[i][i] else 0.0 for j in range(n)] for i in range(n)]
        im = hm.imshow(frac, vmin=0, vmax=1, cmap="viridis")
        hm.set_title(f"{s.name}: share of row image's bytes", fontsize=9)
        hm.set_xticks(range(n), labels, rotation=90, fontsize=7)
        hm.set_yticks(range(n), labels if k == 0 else [""] * n, fontsize=7)
        fig.colorbar(im, ax=hm, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
