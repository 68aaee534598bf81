"""Rows that time lamina's commands rather than a filesystem: run, store size, import throughput."""
from __future__ import annotations

CLI_WORKLOADS: list = []
