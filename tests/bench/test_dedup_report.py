"""`python -m bench dedup` end to end on a small offline corpus (the real one needs the Debian mirror and PyPI)."""
from __future__ import annotations

import json

from bench import data
from bench import dedup as bdedup
from bench.__main__ import main
from tests.store.test_dedup import A_INS, L1, L2_ONE, L2_TWO, docker_archive


def test_report_from_a_small_corpus(tmp_path, monkeypatch, busybox_dir):
    monkeypatch.setattr(data, "CACHE", tmp_path / "cache")
    for tag, layers in (("one", [L1, L2_ONE]), ("two", [L1, L2_TWO])):
        docker_archive(tmp_path / f"{tag}.tar", layers, tag)
    corpus = [("bench:one", tmp_path / "one.tar", "synthetic, two layers"),
              ("bench:two", tmp_path / "two.tar", "synthetic, the same bottom layer"),
              ("bench:busybox", busybox_dir, "busybox")]
    monkeypatch.setattr(bdedup, "sources", lambda: corpus)
    out = tmp_path / "out"
    assert main(["dedup", "--out", str(out), "--db", str(tmp_path / "r.db")]) == 0
    md = (out / "report.md").read_text()
    for heading in ("## Corpus", "## Every strategy", "## Where file-level dedup falls short of chunking",
                    "## Against the published figures", "PuzzleFS", "EROFS", "Gear", "DupHunter", "Docker Hub"):
        assert heading in md
    res = json.loads((out / "results.json").read_text())
    assert [i["tags"] for i in res["images"]] == [["bench:one"], ["bench:two"], ["bench:busybox"]]
    assert res["raw"]["scan"]["bytes"] == res["scan"]["bytes"] > len(A_INS)
    assert (out / "chart.png").stat().st_size > 0
    (out / "report.md").unlink()
    assert main(["dedup", "--out", str(out), "--render"]) == 0 and (out / "report.md").read_text() == md
    # cached: a second run builds nothing and gives the same figures
    assert main(["dedup", "--out", str(out)]) == 0
    again = json.loads((out / "results.json").read_text())
    assert [s["bytes"] for s in again["strategies"]] == [s["bytes"] for s in res["strategies"]]
