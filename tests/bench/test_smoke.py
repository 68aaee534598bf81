"""Smoke test of the benchmark code: one tiny workload per contender, and one tiny end-to-end run.

Checks that the harness measures, reports and cleans up; it asserts nothing about speed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench import contenders as cmod
from bench import data, mounts
from bench.__main__ import main
from bench.runner import run_row, trial
from bench.workloads import ReadWarm, Storm

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="benchmarks mount filesystems: root only")

@pytest.fixture(autouse=True)
def tiny_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setattr(data, "CACHE", tmp_path_factory.getbasetemp() / "bench-data")


@pytest.fixture
def scratch(tmp_path):
    yield tmp_path
    leaked = mounts.cleanup_all(tmp_path)
    assert not leaked, f"benchmark left mounts behind: {leaked}"


@pytest.mark.parametrize("name", [c.name for c in cmod.all_contenders(Path("/nonexistent"))])
def test_one_tiny_workload_per_contender(name, scratch):
    c = next(c for c in cmod.all_contenders(scratch / "store") if c.name == name)
    cmod.probe(c, scratch)  # every contender, lamina's own included, must be available here
    w = Storm(data.TINY, scratch)
    key, layers = w.image()
    w.prepare()
    c.prepare(layers, key)
    res = trial(w, c, layers, data.TINY, scratch / "trial")
    assert "value" in res, res
    assert res["value"] > 0
    assert mounts.mounts_under(scratch) == []


def test_a_failing_contender_fails_its_row_only(scratch):
    class Broken(cmod.FuseOverlayfs):
        name = "broken"

        def mount(self, layers, upper, work, mnt):
            raise RuntimeError("broken: cannot mount")

    good = cmod.KernelOverlay()
    row = run_row(ReadWarm(data.TINY, scratch), [Broken(), good], {}, data.TINY, scratch)
    assert "broken" in row.errors and "cannot mount" in row.errors["broken"]
    assert len(row.samples["kernel-overlay"]) == data.TINY.reps
    assert mounts.mounts_under(scratch) == []


def test_end_to_end_writes_json_table_and_chart(scratch):
    out = scratch / "out"
    rc = main(["--profile", "tiny", "--only", "readdir", "copy-up", "--contenders", "native", "kernel-overlay",
               "lamina-fs", "--no-install", "--out", str(out), "--scratch", str(scratch / "s")])
    assert rc == 0
    runs = json.loads((out / "runs.json").read_text())
    assert [r["name"] for r in runs["rows"]] == ["readdir", "copy-up"]
    readdir = runs["rows"][0]
    assert set(readdir["samples"]) >= {"native", "kernel-overlay"}
    copyup = runs["rows"][1]
    assert "native" in copyup["na"]
    table = (out / "table.md").read_text()
    assert "readdir" in table and "lamina-fs" in table  # an unavailable contender is shown, not hidden
    assert (out / "charts.png").stat().st_size > 0
    (out / "table.md").unlink()
    assert main(["--render", str(out)]) == 0
    assert (out / "table.md").read_text() == table
