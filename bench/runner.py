"""The runner: every workload, every contender, several repetitions, interleaved, each trial in a child process.

A trial runs in a forked child so a hung FUSE request cannot hang the run: past the profile's timeout the parent
kills the serving daemon and the child and moves on. Whatever happens, every mount under the scratch root is
unmounted after each trial (and reported as a leak if the trial itself did not unmount it).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from bench import mounts
from bench.contenders import Contender, Unavailable
from bench.data import Profile
from bench.workloads import Trial, Workload


@dataclass
class Row:
    name: str
    title: str
    unit: str
    higher_better: bool
    targets: list[str]
    samples: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    na: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the whole row, preparation included
    refs: dict[str, float] = field(default_factory=dict)  # reference figures that are not contenders

    def medians(self) -> dict[str, float]:
        return {c: statistics.median(v) for c, v in self.samples.items() if v}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _child(w: Workload, t: Trial, wfd: int) -> None:
    result: dict = {}
    try:
        mounted = False
        try:
            if w.premount:
                t.mount()
                mounted = True
            w.setup(t)
            result["value"] = float(w.run(t))
            w.teardown(t)
        finally:
            if mounted or (w.mounts and mounts.is_mounted(t.mnt)):
                try:
                    t.contender.unmount(t.mnt)
                except Exception as e:  # the parent's sweep still unmounts; say why the proper way failed
                    result["unmount_error"] = str(e)
    except Unavailable as e:
        result = {"na": str(e)}
    except BaseException as e:  # report everything, including KeyboardInterrupt, to the parent
        result = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300],
                  "trace": traceback.format_exc(limit=4)}
    os.write(wfd, json.dumps(result).encode())
    os.close(wfd)


def trial(w: Workload, c: Contender, layers: list[Path], profile: Profile, base: Path) -> dict:
    """One measured trial; returns {"value": x} or {"error": ...} or {"na": ...}."""
    shutil.rmtree(base, ignore_errors=True)
    t = Trial(c, layers, base / "upper", base / "work", base / "mnt", base / "tmp", profile)
    for d in (t.upper, t.work, t.mnt, t.tmp):
        d.mkdir(parents=True)
    r, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        code = 0
        try:
            _child(w, t, wfd)
        except BaseException:
            code = 1
        os._exit(code)
    os.close(wfd)
    try:
        deadline = time.monotonic() + profile.timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                daemon = c.daemon_pid(t.mnt)
                if daemon:
                    os.kill(daemon, signal.SIGKILL)
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                os.close(r)
                return {"error": f"timed out after {profile.timeout:.0f} s"}
            time.sleep(0.005)
        raw = b""
        while chunk := os.read(r, 65536):
            raw += chunk
        os.close(r)
        return json.loads(raw) if raw else {"error": f"trial process died (status {status})"}
    except BaseException:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        raise
    finally:
        daemon = c.daemon_pid(t.mnt) if mounts.is_mounted(t.mnt) else None
        leaked = mounts.cleanup_all(base)
        if leaked:
            log(f"    swept {len(leaked)} leftover mount(s) of {c.name}")
        mounts.wait_gone(daemon)
        shutil.rmtree(base, ignore_errors=True)


def run_row(w: Workload, contenders: list[Contender], unavailable: dict[str, str], profile: Profile,
            scratch: Path) -> Row:
    t0 = time.monotonic()
    try:
        row = _run_row(w, contenders, unavailable, profile, scratch)
    finally:
        w.finish()
    row.seconds = round(time.monotonic() - t0, 1)
    log(f"    {row.seconds:.1f} s")
    return row


def _run_row(w: Workload, contenders: list[Contender], unavailable: dict[str, str], profile: Profile,
             scratch: Path) -> Row:
    row = Row(w.name, w.title, w.unit, w.higher_better, [tg.text for tg in w.targets])
    try:
        key, layers = w.image()
        w.prepare()
    except Exception as e:  # a broken data set fails its row, not the run
        why = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        row.notes.append(f"the row could not be prepared: {why}")
        row.errors = {c.name: "row not prepared" for c in contenders}
        log(f"    the row could not be prepared: {why}")
        return row
    row.title = w.title  # may depend on what prepare found
    row.notes.extend(w.notes())
    row.refs.update(w.refs())
    active = []
    for c in contenders:
        reason = (unavailable.get(c.name) if w.mounts else None) or w.applies(c)
        if reason:
            row.na[c.name] = reason
            continue
        try:
            if w.mounts:
                t0 = time.monotonic()
                c.prepare(layers, key)
                if time.monotonic() - t0 > 1:
                    log(f"    {c.name}: prepared {key} in {time.monotonic() - t0:.1f} s")
        except Unavailable as e:
            row.na[c.name] = f"prepare: {e}"
            continue
        except RuntimeError as e:  # e.g. the import of the image failed: a failure, not an absence
            row.errors[c.name] = f"preparing the image: {e}"
            log(f"    {c.name}: {row.errors[c.name]}")
            continue
        active.append(c)
        row.samples[c.name] = []
    if w.warmup:
        for c in active:
            trial(w, c, layers, profile, scratch / "trial")  # untimed; a failure shows in the real trials
    for rep in range(w.reps or profile.reps):
        # rotate the order so no contender always runs first (cold) or last
        order = active[rep % len(active):] + active[:rep % len(active)] if active else []
        for c in order:
            if c.name in row.errors or c.name in row.na:
                continue
            res = trial(w, c, layers, profile, scratch / "trial")
            if "value" in res:
                row.samples[c.name].append(res["value"])
            elif "na" in res:
                row.na[c.name] = res["na"]
            else:
                row.errors[c.name] = res["error"]
                log(f"    {c.name}: {res['error']}")
                if os.environ.get("LAMINA_BENCH_DEBUG"):
                    log(res.get("trace", ""))
            if res.get("unmount_error"):
                row.notes.append(f"{c.name}: unmount: {res['unmount_error']}")
    for c in list(row.samples):
        if not row.samples[c]:
            del row.samples[c]
    return row
