"""`python -m bench dedup`: build the dedup corpus (cached), run `lamina dedup` over it, write the report.

The corpus, built here from sources this machine reaches (apt's Debian mirror, PyPI), each piece cached under
bench/data.py's CACHE:
  * Debian root filesystems made independently by debootstrap (minbase plus packages), one layer each: images that
    share most of their files but, built apart, not one layer;
  * Python application images: the minbase+python3 root filesystem as a shared bottom layer plus one layer of
    successive versions of the same libraries installed with pip (numpy, compiled; Django, pure Python), the case
    where chunks should beat whole files;
  * the images of the other benchmarks (busybox, the many-file image in 4 layers, the big-file image: random
    bytes, which nothing dedups or compresses).
The store is built once per corpus (a key of its recipe); the report goes to bench/dedup/ (report.md, chart.png,
results.json) and `--db` keeps the result database.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

from bench import data, report

OUT = Path(__file__).resolve().parent / "dedup"
DEBIAN = {"minbase": [], "minbase+python3": ["python3"], "minbase+curl+git": ["curl", "git"],
          "minbase+python3-pip": ["python3-pip"], "minbase+build-essential": ["build-essential"]}
PIP = [("numpy", "1.26.3"), ("numpy", "1.26.4"), ("django", "5.0.7"), ("django", "5.0.8")]
SITE = "usr/local/lib/python3.11/dist-packages"
RAW_RUNS = 3  # the speed figure is the median of these (other work on the machine shows in their spread)

# Published figures (REFERENCES.md section 3), each with what it measured.
PUBLISHED = [
    ("Docker Hub study (Zhao et al., CLUSTER 2019)", "167 TB of Docker Hub images, uncompressed: only 3 % of files "
     "unique (file level)"),
    ("DupHunter (USENIX ATC 2020)", "up to 6.9x less registry storage (file-level dedup of layers)"),
    ("Gear (ICDCS 2021)", "file-level sharing saved 54 % of registry space"),
    ("PuzzleFS (linux-fsdevel, 2024-09)", "10 ubuntu:jammy tags, 766 MB as tars, 282 MB as tar.gz -> FastCDC "
     "130 MB uncompressed / 53 MB zstd"),
    ("EROFS -Ededupe (erofs.docs.kernel.org)", "the same 10 tags -> 109.5 MiB uncompressed / 46.4 MiB DEFLATE"),
]


def log(msg: str) -> None:
    print(f"bench dedup: {msg}", file=sys.stderr, flush=True)


def pip_layer(pkg: str, version: str) -> Path:
    """One layer: `pip install pkg==version` into /usr/local (wheels from PyPI, compiled .pyc as pip leaves them)."""
    def build(d: Path) -> None:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                        "--only-binary=:all:", "--target", str(d / SITE), f"{pkg}=={version}"], check=True)
    return data._cached(f"pip-{pkg}-{version}", build)


def sources() -> list[tuple[str, Path, str]]:
    """(tag, archive or directory, how it was made) for every corpus image, building what is not cached."""
    out = []
    for name, pkgs in DEBIAN.items():
        log(f"debootstrap {name}")
        out.append((f"debian:{name.replace('+', '-')}", data.debootstrap_tar(name, pkgs),
                    f"debootstrap --variant=minbase{' --include=' + ','.join(pkgs) if pkgs else ''}, one layer"))
    base = data.debootstrap_rootfs("minbase+python3", ["python3"])
    for pkg, version in PIP:
        log(f"pip {pkg}=={version}")
        layer = pip_layer(pkg, version)
        out.append((f"py-{pkg}:{version}", data.docker_archive(f"dedup-{pkg}-{version}", [layer, base]),
                    f"debian minbase+python3 layer + `pip install {pkg}=={version}` layer"))
    out.append(("bench:busybox", data.small_image(), "busybox-static and its applet links (bench: mount)"))
    many = data.many_image(data.QUICK)
    out.append(("bench:many", data.docker_archive(f"many{data.QUICK.many_files}", many),
                f"{data.QUICK.many_files:,} random files of 0-4 KiB in {len(many)} layers (bench: mount, memory)"))
    out.append(("bench:big", data.big_image(data.QUICK), "128 + 64 MiB of random bytes (bench: read, copy-up)"))
    return out


def build_store(srcs: list[tuple[str, Path, str]]) -> Path:
    """A store holding every corpus image under its tag, built once per recipe."""
    from store.images import rmi, tag
    from store.reader import load_image
    from store.refs import normalize_ref
    from store.importer import import_source
    from store.root import Store
    key = hashlib.sha256(json.dumps([(t, str(p)) for t, p, _ in srcs]).encode()).hexdigest()[:12]

    def build(d: Path) -> None:
        st = Store(str(d))
        for t, path, _ in srcs:
            log(f"import {t}")
            for image_id in import_source(st, str(path)):
                tag(st, image_id, t)
                for other in load_image(st, image_id).tags:
                    if other != normalize_ref(t):
                        rmi(st, other)  # the archive's own name: the report names images by corpus tag
        st.close()
    return data._cached(f"dedup-store-{key}", build)


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.1f} MB"


def write_report(res: dict) -> str:
    """report.md from results.json: the corpus, every strategy, file against chunk, and the published figures
    beside ours."""
    from store.dedup_report import from_json, label
    a, meta, how = from_json(res), res["meta"], res["corpus"]
    s = {x["name"]: x for x in res["strategies"]}
    lg = s["logical"]
    idx = {label(a, i): i for i in range(len(a.images))}
    lines = ["# Storage dedup: layer, file and chunk level on one corpus", "",
             f"Run {meta['started']} on {meta['machine']['cpu']}, {meta['machine']['cores']} cores, "
             f"{meta['machine']['os']}; `python -m bench dedup` (corpus cached under {data.CACHE}).", "",
             "All sizes are file content bytes (tar headers apart), MB = 10^6 bytes. *Ratio* = logical / stored.", "",
             "## Corpus", "", "| image | layers | content | how it was made |", "|---|---|---|---|"]
    for i, img in enumerate(a.images):
        t = label(a, i)
        lines.append(f"| `{t}` | {img.layers} | {_mb(a.strategies[0].per_image[i].bytes)} | {how.get(t, '')} |")
    lines += ["", f"{len(a.images)} images, {len(a.layers)} distinct layers, {_mb(lg['bytes'])} of file contents "
              f"({_mb(lg['tar_bytes'])} as layer tars; {_mb(lg['gzip_bytes'])} as tar.gz, {_mb(lg['zstd_bytes'])} "
              f"as tar.zst). The debootstrap trees keep apt's package lists (/var/lib/apt/lists, a 50 MB Packages "
              f"file identical in all of them), which the official Debian images delete; they add to what file and "
              f"chunk dedup find.", "", "## Every strategy", "",
              "| strategy | stored | zstd -3 | gzip -6 | units (index rows) | ratio | ratio, compressed | time |",
              "|---|---|---|---|---|---|---|---|"]
    for x in res["strategies"]:
        comp = x["zstd_bytes"]
        cr = f"{lg['gzip_bytes'] / comp:.2f}x" if comp else "-"
        lines.append(f"| {x['name']} | {_mb(x['bytes'])} | {_mb(x['zstd_bytes'])} | {_mb(x['gzip_bytes'])} | "
                     f"{x['objects']:,} | {x['ratio']:.2f}x | {cr} | {x['seconds']:.2f} s |")
    runs = [r["mb_per_s"] for r in res["raw"].get("runs", [res["raw"]["scan"]])]
    lines += ["", "*Ratio, compressed* = every image's layers as tar.gz (what registries hold today) / the "
              "strategy's distinct units each compressed with zstd -3.", "",
              f"Speed: the chunk pass read {_mb(res['raw']['scan']['bytes'])} of distinct contents once for all "
              f"four chunkers in {res['raw']['scan']['seconds']:.2f} s without compression "
              f"(**{res['raw']['scan']['mb_per_s']:.0f} MB/s**, median of {len(runs)} runs, "
              f"{min(runs):.0f}-{max(runs):.0f} MB/s; warm page cache, load average {meta['load']}; "
              f"{res['raw']['scan']['cpu_seconds']:.2f} s of CPU: "
              f"{res['raw']['scan']['bytes'] / res['raw']['scan']['cpu_seconds'] / 1e6:.0f} MB/s on a core of its "
              f"own), and in "
              f"{res['scan']['seconds']:.2f} s with every distinct unit compressed "
              f"({res['scan']['mb_per_s']:.0f} MB/s; layer tars were gzipped meanwhile on the other core). "
              f"The target, 300 MB/s on this 2-core machine: {_target(res, meta)}. "
              f"File level from the index alone: {res['file_index_seconds']:.3f} s. "
              f"Peak RSS {_mb(res['peak_rss_bytes'])} (mapped large contents included); anonymous memory at the "
              f"end, chunk tables alive, {_mb(res.get('anon_rss_bytes'))}.", ""]
    kinds = ("file", "fixed-4k", "fixed-64k", "cdc-16k", "cdc-64k")
    lines += ["## Where file-level dedup falls short of chunking", "",
              "Bytes the second image adds to a store already holding the first (its own distinct units minus "
              "those the first holds too):", "",
              "| first / second | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for x, y in _pairs(idx):
        i, j = idx[x], idx[y]
        adds = [res["shared"][k][j][j] - res["shared"][k][i][j] for k in kinds]
        lines.append(f"| `{x}` / `{y}` | " + " | ".join(_mb(n) for n in adds) + " |")
    gap = s["file"]["bytes"] - s["cdc-16k"]["bytes"]
    gapz = (s["file"]["zstd_bytes"] or 0) - (s["cdc-16k"]["zstd_bytes"] or 0)

    def less(n: int, of: int) -> str:
        return f"{_mb(abs(n))} {'less' if n >= 0 else 'more'} ({100 * abs(n) / of:.1f} %)"
    lines += ["", f"Set-wide, cdc-16k stores {less(gap, s['file']['bytes'])} than file level raw and "
              f"{less(gapz, s['file']['zstd_bytes'])} compressed (each chunk compressed alone loses the context a "
              f"whole file gives zstd), with {s['cdc-16k']['objects'] / s['file']['objects']:.1f}x as many index "
              f"rows ({s['cdc-16k']['objects']:,} chunks against {s['file']['objects']:,} contents).", ""]
    lines += ["## Against the published figures", "", "| source | published | this corpus |", "|---|---|---|"]
    ours = _ours(s, res)
    for (src, pub), mine in zip(PUBLISHED, ours):
        lines.append(f"| {src} | {pub} | {mine} |")
    lines += ["", "The corpora differ: the papers measure Docker Hub's millions of layers or successive tags of one "
              "image; this one mixes independently built Debian root filesystems (no common layer: layer sharing "
              "saves nothing between them), layered pip images and random benchmark data (which nothing dedups; bench:many's 20,000 random files, all "
              "distinct, are a fifth of the file entries). "
              "Compare the mechanisms, not the absolute ratios.", "", "![dedup chart](chart.png)", ""]
    return "\n".join(lines)


def _target(res: dict, meta: dict) -> str:
    wall = res["raw"]["scan"]["mb_per_s"]
    cpu = res["raw"]["scan"]["bytes"] / res["raw"]["scan"]["cpu_seconds"] / 1e6
    if wall >= 300:
        return "met"
    return (f"{'met' if cpu >= 300 else 'missed'} in CPU time, missed in wall time while other work held the cores "
            f"(load average {meta['load']})")


def _pairs(idx: dict[str, int]) -> list[tuple[str, str]]:
    want = [("py-numpy:1.26.3", "py-numpy:1.26.4"), ("py-django:5.0.7", "py-django:5.0.8"),
            ("debian:minbase", "debian:minbase-python3"), ("debian:minbase-python3", "debian:minbase-python3-pip")]
    return [(x, y) for x, y in want if x in idx and y in idx]


def _ours(s: dict, res: dict) -> list[str]:
    lg, f, c = s["logical"], s["file"], s["cdc-16k"]
    unique_files = res["distinct_files"] / res["file_entries"] if res["file_entries"] else 0
    return [
        f"{100 * unique_files:.0f} % of non-empty file entries have a distinct content "
        f"({res['distinct_files']:,} of {res['file_entries']:,})",
        f"{lg['gzip_bytes'] / f['zstd_bytes']:.1f}x less than every image's tar.gz layers "
        f"({s['layer']['gzip_bytes'] / f['zstd_bytes']:.1f}x less than distinct tar.gz layers)",
        f"file level saves {100 * (1 - f['zstd_bytes'] / s['layer']['gzip_bytes']):.0f} % of the distinct tar.gz "
        f"layers' space ({100 * (1 - f['zstd_bytes'] / lg['gzip_bytes']):.0f} % of every image's)",
        f"tars {_mb(lg['tar_bytes'])}, tar.gz {_mb(lg['gzip_bytes'])} -> FastCDC 16 KiB {_mb(c['bytes'])} / "
        f"{_mb(c['zstd_bytes'])} zstd ({lg['tar_bytes'] / c['bytes']:.1f}x, {lg['gzip_bytes'] / c['zstd_bytes']:.1f}x;"
        f" PuzzleFS: 5.9x, 5.3x)",
        f"fixed 4 KiB blocks {_mb(s['fixed-4k']['bytes'])} / {_mb(s['fixed-4k']['zstd_bytes'])} zstd "
        f"({lg['tar_bytes'] / s['fixed-4k']['bytes']:.1f}x, {lg['gzip_bytes'] / s['fixed-4k']['zstd_bytes']:.1f}x; "
        f"EROFS: 6.7x, 5.8x)",
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench dedup", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT, help=f"where report.md, chart.png, results.json go ({OUT})")
    ap.add_argument("--db", type=Path, help="also append the run to this SQLite result database")
    ap.add_argument("--render", action="store_true", help="run nothing: write report.md and chart.png again from "
                    "OUT/results.json")
    a = ap.parse_args(argv)
    from store import dedup_report as rep
    if a.render:
        res = json.loads((a.out / "results.json").read_text())
        rep.chart(rep.from_json(res), str(a.out / "chart.png"))
        (a.out / "report.md").write_text(write_report(res))
        return 0
    from store.dedup import analyse, select_images
    from store.root import Store
    started = dt.datetime.now(dt.timezone.utc)
    corpus = sources()
    root = build_store(corpus)
    st = Store(str(root))
    images = select_images(st, [t for t, _, _ in corpus], False)
    log(f"analysis without compression (speed), {RAW_RUNS} runs")
    load = report.loadavg()
    raws = [analyse(st, images, compress=False) for _ in range(RAW_RUNS)]
    raw = sorted(raws, key=lambda r: r.scan_seconds)[len(raws) // 2]  # the median run
    log("analysis with compression")
    t = time.perf_counter()
    full = analyse(st, images)
    log(f"took {time.perf_counter() - t:.1f} s")
    res = rep.to_json(full)
    res["raw"] = {"scan": rep.to_json(raw)["scan"], "seconds": round(raw.seconds, 3),
                  "runs": [rep.to_json(r)["scan"] for r in raws]}
    res["file_index_seconds"] = round(raw.strategy("file").seconds, 4)
    ids = [i.id for i in images]
    marks = ",".join("?" * len(ids))
    (res["file_entries"],) = st.db.execute(
        f"SELECT count(*) FROM image_layers il JOIN entries e ON e.layer_id = il.layer_id "
        f"WHERE il.image_id IN ({marks}) AND e.kind = 'f' AND e.size > 0 AND e.link_ino IS NULL", ids).fetchone()
    res["distinct_files"] = len(full.objects)
    a.out.mkdir(parents=True, exist_ok=True)
    res["meta"] = {"started": started.isoformat(timespec="seconds"), "machine": report.machine(), "load": load}
    res["corpus"] = {t: how for t, _, how in corpus}
    (a.out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    rep.chart(full, str(a.out / "chart.png"))
    if a.db:
        rep.write_db(full, st, str(a.db))
    md = write_report(res)
    (a.out / "report.md").write_text(md)
    st.close()
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
