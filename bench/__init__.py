"""Benchmarks: lamina against kernel overlayfs, fuse-overlayfs, unionfs-fuse and the native filesystem.

`python -m bench [--quick] [--only NAME…] [--out DIR]`. The package owns the whole harness: peer installation
(`peers`), mount bookkeeping (`mounts`), the contenders (`contenders`), the shared data sets (`data`), the workloads
(`workloads`, `images`), the interleaved runner (`runner`) and the reporter (`report`). Nothing here is used by the
product; tests/bench/test_smoke.py runs one tiny workload per contender.
"""
