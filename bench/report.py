"""The reporter: runs.json (raw samples), table.md (median, min–max, ratio to lamina, targets) and PNG charts."""
from __future__ import annotations

import json
import os
import platform
import statistics
import textwrap
from dataclasses import asdict
from pathlib import Path

from bench.runner import Row
from bench.workloads import Target, lamina_of


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()
               if ln.startswith("MemTotal"))
    try:
        distro = next(ln.split("=", 1)[1].strip('"') for ln in Path("/etc/os-release").read_text().splitlines()
                      if ln.startswith("PRETTY_NAME"))
    except (OSError, StopIteration):
        distro = ""
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": round(mem / 2**20, 1), "kernel": platform.release(),
            "os": distro, "python": platform.python_version(), "fs": _fstype(Path("/var/tmp"))}


def _fstype(path: Path) -> str:
    best = ("", "")
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, mp, fstype, *_ = line.split()
        if str(path).startswith(mp.rstrip("/") + "/") and len(mp) > len(best[0]):
            best = (mp, fstype)
    return best[1]


def loadavg() -> str:
    """The 1-minute load average: other work on the machine shows in the min–max spread."""
    return Path("/proc/loadavg").read_text().split()[0]


def _took(meta: dict) -> str:
    import datetime as dt
    s = (dt.datetime.fromisoformat(meta["finished"]) - dt.datetime.fromisoformat(meta["started"])).total_seconds()
    return f"the run took {s / 60:.1f} min"


def fmt(v: float, unit: str) -> str:
    if unit == "s":
        if v < 1e-3:
            return f"{v * 1e6:.0f} µs"
        if v < 1:
            return f"{v * 1e3:.1f} ms"
        return f"{v:.2f} s"
    if unit == "B":
        return f"{v / 1e6:.1f} MB" if v < 1e9 else f"{v / 1e9:.2f} GB"
    return f"{v:,.0f} {unit}" if v >= 100 else f"{v:.3g} {unit}"


def cell(row: Row, c: str) -> str:
    if c in row.samples:
        v = row.samples[c]
        med = statistics.median(v)
        s = f"{fmt(med, row.unit)} ({fmt(min(v), row.unit)}–{fmt(max(v), row.unit)})"
        m = row.medians()
        ref, ref_name = lamina_of(m), ("lamina" if "lamina" in m else "lamina-fs")
        if ref and c != ref_name:
            s += f" ×{med / ref:.2f}"
        return s
    if c in row.errors:
        return f"failed: {row.errors[c]}"
    if c in row.na:
        # an unavailable contender is explained once, in the report's header
        return "not available" if row.na[c].startswith("not available") else f"n/a: {row.na[c]}"
    return ""


def verdicts(row: Row, targets: list[Target]) -> list[str]:
    m = {**row.refs, **row.medians()}  # a target may compare with a reference figure
    out = []
    for tg in targets:
        ok = tg.check(m)
        out.append(f"{tg.text}: " + ("met" if ok else "n/a" if ok is None else "MISSED"))
    return out


def table(rows: list[Row], targets: dict[str, list[Target]], contenders: list[str]) -> str:
    head = ["workload", *contenders, "targets"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        unit = {"s": "time", "B": "bytes"}.get(r.unit, r.unit)
        better = "higher" if r.higher_better else "lower"
        name = f"{r.title} [{unit}, {better} is better]"
        t = "; ".join(verdicts(r, targets.get(r.name, [])))
        if r.notes:
            t += ("; " if t else "") + "; ".join(r.notes)
        cells = [cell(r, c).replace("|", "/") for c in contenders]
        lines.append("| " + " | ".join([name, *cells, t]) + " |")
    missed = [f"- {r.name}: {v}" for r in rows for v in verdicts(r, targets.get(r.name, [])) if v.endswith("MISSED")]
    lines += ["", f"Targets missed: {len(missed)}" + (":" if missed else "."), *missed]
    return "\n".join(lines) + "\n"


def charts(rows: list[Row], contenders: list[str], out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.samples or r.refs or r.errors]
    if not rows:
        return []
    colours = dict(zip(contenders, plt.get_cmap("tab10").colors))
    ncol = 3
    nrow = (len(rows) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 3.4 * nrow), squeeze=False)
    for ax, r in zip(axes.flat, rows):
        # every contender keeps its slot: one without a figure is labelled, not dropped
        names = [c for c in contenders if c in r.samples or c in r.errors
                 or r.na.get(c, "").startswith("not available")]
        med = [statistics.median(r.samples[c]) if c in r.samples else 0.0 for c in names]
        lo = [m - min(r.samples[c]) if c in r.samples else 0.0 for m, c in zip(med, names)]
        hi = [max(r.samples[c]) - m if c in r.samples else 0.0 for m, c in zip(med, names)]
        scale, unit = (1e6, "MB") if r.unit == "B" else (1, r.unit)
        if r.unit == "s" and max(med, default=0) < 1:
            scale, unit = 1e-3, "ms"
        vals = [m / scale for m in med]
        bars = ax.bar(range(len(names)), vals, yerr=[[x / scale for x in lo], [x / scale for x in hi]],
                      color=[colours[c] for c in names], capsize=3)
        kov = r.medians().get("kernel-overlay")
        for b, m, c in zip(bars, med, names):
            x = b.get_x() + b.get_width() / 2
            if c not in r.samples:
                why = "failed" if c in r.errors else "not available" if r.na[c].startswith("not av") else "n/a"
                ax.annotate(why, (x, 0), ha="center", va="bottom", fontsize=7, rotation=90, color="grey",
                            xytext=(0, 3), textcoords="offset points")
            elif kov:
                ax.annotate(f"{m / kov:.2f}× kov", (x, b.get_height()),
                            ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
        for i, (label, v) in enumerate(r.refs.items(), start=len(names)):
            # reference figures (e.g. the sum of layer tars) as hatched grey bars beside the contenders
            ax.bar(i, v / scale, color="lightgrey", hatch="//", edgecolor="grey")
        names = names + list(r.refs)
        ax.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=7)
        ax.set_title(textwrap.fill(r.title, 60), fontsize=8)
        ax.set_ylabel(unit + (" (higher is better)" if r.higher_better else ""), fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.suptitle("lamina benchmarks — median, min–max bars; label = ratio to kernel overlayfs (kov)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path = out / "charts.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def read(out: Path) -> tuple[dict, list[Row]]:
    """A finished run back from its runs.json, to render again."""
    meta = json.loads((out / "runs.json").read_text())
    return meta, [Row(**r) for r in meta.pop("rows")]


def write(out: Path, meta: dict, rows: list[Row], targets: dict[str, list[Target]], contenders: list[str],
          raw: bool = True) -> str:
    out.mkdir(parents=True, exist_ok=True)
    if raw:
        (out / "runs.json").write_text(json.dumps({**meta, "rows": [asdict(r) for r in rows]}, indent=1) + "\n")
    avail = meta["contenders"]
    intro = [f"# lamina benchmarks — {meta['started']} ({meta['profile']['name']})", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in meta["machine"].items())
             + f"; load average {meta['load'][0]} at start, {meta['load'][1]} at end; {_took(meta)}", "",
             "Contenders: " + "; ".join(
                 f"{c} ({avail[c]['version'] or 'available'})" if avail[c]["available"]
                 else f"{c} (not available: {avail[c]['reason']})" for c in contenders), "",
             f"Median of {meta['profile']['reps']} interleaved runs, (min–max), ×N = ratio to lamina "
             "(store-backed `lamina mount`, else lamina-fs over the same directories).", "", ""]
    md = "\n".join(intro) + table(rows, targets, contenders)
    (out / "table.md").write_text(md)
    charts(rows, contenders, out)
    return md


BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def publish(out: Path, latest: Path, readme: Path) -> None:
    """Keep the latest results in the repository (bench/latest/) and their table in README.md's Performance
    section, between the bench markers; nothing else in the README is touched."""
    import shutil
    latest.mkdir(exist_ok=True)
    for name in ("table.md", "charts.png", "runs.json"):
        if (out / name).exists():
            shutil.copy2(out / name, latest / name)
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise RuntimeError(f"{readme}: no {BEGIN} … {END} markers to publish between")
    title, table_md = (out / "table.md").read_text().split("\n", 1)
    when = title.split("—", 1)[-1].strip()  # "2026-…Z (quick)"
    table_md = f"Latest published run: {when}, from `bench/latest/runs.json`.\n\n" + table_md.strip()
    body = f"{BEGIN}\n{table_md}\n\n![benchmark charts](bench/latest/charts.png)\n{END}"
    head, rest = text.split(BEGIN, 1)
    readme.write_text(head + body + rest.split(END, 1)[1])
