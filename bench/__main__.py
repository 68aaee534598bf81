"""`python -m bench [--quick] [--only NAME…] [--out DIR]`: install peers, probe contenders, run, report.
`python -m bench dedup`: the storage dedup report (bench/dedup.py)."""
from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import signal
import sys
from pathlib import Path

from bench import contenders as cmod
from bench import mounts, peers, report
from bench.data import FULL, PROFILES, QUICK
from bench.runner import log, run_row
from bench.workloads import registry

RESULTS = Path(__file__).resolve().parent / "results"
LATEST = Path(__file__).resolve().parent / "latest"
README = Path(__file__).resolve().parent.parent / "README.md"


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def parse(argv: list[str] | None) -> argparse.Namespace:
    names = [w.name for w in registry()]
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small sizes, 3 repetitions: under 5 minutes on 2 cores")
    ap.add_argument("--profile", choices=sorted(PROFILES), help=argparse.SUPPRESS)
    ap.add_argument("--only", nargs="+", metavar="NAME", choices=names, help="rows to run: " + ", ".join(names))
    contenders = [c.name for c in cmod.all_contenders(Path("/nonexistent"))]
    ap.add_argument("--contenders", nargs="+", metavar="NAME", choices=contenders,
                    help="contenders to run (default: all): " + ", ".join(contenders))
    ap.add_argument("--reps", type=int, help="repetitions per contender (default: profile's)")
    ap.add_argument("--out", type=Path, help="results directory (default: bench/results/<timestamp>)")
    ap.add_argument("--scratch", type=Path, default=Path("/var/tmp/lamina-bench"),
                    help="where mounts, uppers and stores live during the run")
    ap.add_argument("--publish", action="store_true",
                    help="copy table.md and charts.png to bench/latest/ and put the table in README.md's Performance section")
    ap.add_argument("--render", type=Path, metavar="DIR",
                    help="run nothing: write table.md and charts.png again from DIR/runs.json (with --publish, publish it)")
    ap.add_argument("--no-install", action="store_true", help="do not apt-get install missing peers")
    return ap.parse_args(argv)


def render(out: Path, publish: bool) -> int:
    meta, rows = report.read(out)
    targets = {w.name: list(w.targets) for w in registry()}
    print(report.write(out, meta, rows, targets, list(meta["contenders"]), raw=False))
    if publish:
        report.publish(out, LATEST, README)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["dedup"]:  # the storage dedup report: a corpus and an analysis, no mounts
        from bench.dedup import main as dedup_main
        return dedup_main(argv[1:])
    a = parse(argv)
    if a.render:
        return render(a.render, a.publish)
    if os.geteuid() != 0:
        print("bench: must run as root (mount, chroot, drop_caches)", file=sys.stderr)
        return 2
    profile = PROFILES[a.profile] if a.profile else QUICK if a.quick else FULL
    if a.reps:
        profile = type(profile)(**{**profile.asdict(), "reps": a.reps})
    started = dt.datetime.now(dt.timezone.utc)
    out = a.out or RESULTS / started.strftime("%Y%m%dT%H%M%SZ")
    scratch = a.scratch / f"run-{os.getpid()}"
    scratch.mkdir(parents=True)
    # explicitly: a shell starts background jobs with SIGINT ignored, and Python would keep ignoring it
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    load_start = report.loadavg()
    workloads = [w(profile, scratch) for w in registry() if not a.only or w.name in a.only]
    try:
        if not a.no_install:
            peers.ensure(["fuse-overlayfs", "unionfs-fuse"])
        cs = cmod.all_contenders(scratch / "store")
        if a.contenders:
            cs = [c for c in cs if c.name in a.contenders]
        status, unavailable = {}, {}
        for c in cs:
            try:
                cmod.probe(c, scratch)
                status[c.name] = {"available": True, "reason": "", "version": c.version()}
            except cmod.Unavailable as e:
                unavailable[c.name] = f"not available: {e}"
                status[c.name] = {"available": False, "reason": str(e), "version": ""}
            log(f"{c.name}: {'available' if c.name not in unavailable else unavailable[c.name]}")
        rows = []
        for w in workloads:
            log(f"{w.name}: {w.title}")
            rows.append(run_row(w, cs, unavailable, profile, scratch))
        meta = {"started": started.isoformat(timespec="seconds"),
                "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "profile": profile.asdict(), "machine": report.machine(), "load": [load_start, report.loadavg()],
                "contenders": status}
        md = report.write(out, meta, rows, {w.name: list(w.targets) for w in workloads}, [c.name for c in cs])
        print(md)
        log(f"results in {out}")
        if a.publish:
            report.publish(out, LATEST, README)
            log(f"published to {LATEST} and {README}")
        return 0
    except KeyboardInterrupt:
        log("bench: interrupted; unmounting")
        return 130
    finally:
        leaked = mounts.cleanup_all(a.scratch)
        if leaked:
            log(f"bench: unmounted {len(leaked)} leftover mount(s)")
        shutil.rmtree(scratch, ignore_errors=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
