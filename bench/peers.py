"""Installing the peers the benchmark compares against, with apt, only when they are missing."""
from __future__ import annotations

import os
import subprocess
import sys


def installed(pkg: str) -> bool:
    p = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True)
    return "ok installed" in p.stdout


def ensure(pkgs: list[str]) -> list[str]:
    """apt-get install whatever of `pkgs` is missing; returns the packages still missing afterwards."""
    need = [p for p in pkgs if not installed(p)]
    if need:
        print(f"bench: installing {' '.join(need)}", file=sys.stderr, flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *need], env=env,
                       stdout=subprocess.DEVNULL)
    return [p for p in pkgs if not installed(p)]
