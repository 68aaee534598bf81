"""Parsing and validating `lamina run` input into a `RunSpec`, before anything is created.

Everything a user can get wrong (sizes, CPU counts, volume specs, device rates, users, env) is checked here so that
bad input fails with one line and exit 125 while nothing exists yet. Formats follow Docker's (`-m 32m`,
`--memory-swap -1`, `--cpus 0.5`, `-v SRC:DST[:ro]`, `--device-read-bps /dev/sda:1mb`).
"""
from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass, field

from .cgroups import Limits


class SpecError(ValueError):
    """Bad user input; the message is shown as is."""


_SIZE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)\s*([kmgtp]?)(?:i?b)?$", re.I)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
VOLUME_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]+$")
MIN_MEMORY = 6 << 20  # Docker's minimum
MAX_SIZE = (1 << 63) - 1  # Docker's sizes are int64; a cgroup file takes no more
MAX_ID = (1 << 31) - 1  # podman's bound for uids and gids: 2^32-1 is -1 to setresuid, and 0 modulo a 32-bit id map


def parse_size(text: str, what: str) -> int:
    m = _SIZE.match(text.strip())
    if not m:
        raise SpecError(f"invalid {what} {text!r}: expected a size such as 512k, 64m or 1g")
    # In integers (a float overflows at 400 digits; the decimal module costs `run` ~10 ms to import), the integer
    # part's length bounded first (int() refuses 4,300 digits) and the fraction cut below a byte's worth.
    whole, _, frac = m.group(1).partition(".")
    unit = _UNITS[m.group(2).lower()]
    frac = frac[:20]
    n = MAX_SIZE + 1 if len(whole) > 24 else int(whole) * unit + (int(frac or "0") * unit) // 10 ** len(frac)
    if n > MAX_SIZE:
        raise SpecError(f"invalid {what} {text!r}: larger than the largest size, {MAX_SIZE} bytes")
    return n


@dataclass
class Mount:
    kind: str          # "bind", "volume" (named) or "anon" (anonymous volume, removed with the container)
    source: str        # host path for bind; volume name otherwise
    target: str        # absolute path inside the container
    readonly: bool = False

    def to_json(self) -> dict:
        return {"kind": self.kind, "source": self.source, "target": self.target, "readonly": self.readonly}


@dataclass
class RunSpec:
    image: str
    cmd: list[str]
    name: str | None = None
    env: list[str] = field(default_factory=list)
    workdir: str | None = None
    user: str | None = None
    hostname: str | None = None
    network: str = "none"
    mounts: list[Mount] = field(default_factory=list)
    read_only: bool = False
    limits: Limits = field(default_factory=Limits)
    userns: bool = False
    driver: str = "fuse"  # the root filesystem's: fuse, kernel or auto (unionfs.storemount.DRIVERS)
    rm: bool = False
    detach: bool = False
    interactive: bool = False
    tty: bool = False


def _clean_target(target: str, spec: str) -> str:
    if not target.startswith("/"):
        raise SpecError(f"invalid volume specification {spec!r}: destination {target!r} is not an absolute path")
    parts = [p for p in target.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise SpecError(f"invalid volume specification {spec!r}: destination {target!r} escapes with '..'")
    if not parts:
        raise SpecError(f"invalid volume specification {spec!r}: destination can not be '/'")
    return "/" + "/".join(parts)


def parse_volume(spec: str) -> Mount:
    parts = spec.split(":")
    if len(parts) == 1:
        return Mount("anon", "", _clean_target(parts[0], spec))
    if len(parts) > 3 or not parts[0] or not parts[1]:
        raise SpecError(f"invalid volume specification {spec!r}: expected SRC:DST[:ro|rw]")
    ro = False
    if len(parts) == 3:
        opts = parts[2].split(",")
        for o in opts:
            if o not in ("ro", "rw", "z", "Z"):
                raise SpecError(f"invalid volume specification {spec!r}: unknown option {o!r}")
        ro = "ro" in opts
    src, dst = parts[0], _clean_target(parts[1], spec)
    if src.startswith("/"):
        return Mount("bind", os.path.normpath(src), dst, ro)
    if src.startswith("."):
        raise SpecError(f"invalid volume specification {spec!r}: relative host path {src!r} (use an absolute path)")
    if not VOLUME_NAME.match(src):
        raise SpecError(f"invalid volume name {src!r}: only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed")
    return Mount("volume", src, dst, ro)


def parse_device_rate(text: str, what: str) -> tuple[str, int]:
    dev, sep, rate = text.rpartition(":")
    if not sep or not dev:
        raise SpecError(f"invalid {what} {text!r}: expected DEVICE:RATE, e.g. /dev/sda:1mb")
    try:
        st = os.stat(dev)
    except OSError as e:
        raise SpecError(f"invalid {what} {text!r}: {dev}: {e.strerror}") from None
    if not stat.S_ISBLK(st.st_mode):
        raise SpecError(f"invalid {what} {text!r}: {dev} is not a block device")
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}", parse_size(rate, what)


def parse_env(items: tuple[str, ...] | list[str]) -> list[str]:
    out = []
    for e in items:
        k, sep, _ = e.partition("=")
        if not k or "\0" in e:
            raise SpecError(f"invalid environment variable {e!r}")
        if not sep:  # Docker: -e NAME passes the caller's value, if any
            if k in os.environ:
                out.append(f"{k}={os.environ[k]}")
            continue
        out.append(e)
    return out


def parse_user(text: str) -> str:
    if not re.match(r"^[A-Za-z0-9_.-]+(:[A-Za-z0-9_.-]+)?$", text):
        raise SpecError(f"invalid user {text!r}: expected UID[:GID] or NAME[:GROUP]")
    for part in text.split(":"):
        if part.isdigit() and int(part) > MAX_ID:
            raise SpecError(f"invalid user {text!r}: uids and gids must be in range 0-{MAX_ID}")
    return text


def check_config(cfg: object, ref: str) -> dict:
    """The image config's `config` object, checked for what `run` takes from it: a bad type or a NUL byte would
    otherwise surface only as the command failing to start (a silent 127), or as a traceback."""
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise SpecError(f"image {ref}: invalid config: not an object")
    for key in ("Entrypoint", "Cmd", "Env"):
        v = cfg.get(key)
        if v is None:
            continue
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise SpecError(f"image {ref}: invalid config: {key} must be a list of strings, not {json.dumps(v)}")
        if any("\0" in x for x in v):
            raise SpecError(f"image {ref}: invalid config: {key} holds a NUL byte")
    for e in cfg.get("Env") or []:
        if e.startswith("="):
            raise SpecError(f"image {ref}: invalid config: environment variable {e!r} has no name")
    for key in ("User", "WorkingDir"):
        v = cfg.get(key)
        if v is not None and (not isinstance(v, str) or "\0" in v):
            raise SpecError(f"image {ref}: invalid config: {key} must be a string without NUL bytes, "
                            f"not {json.dumps(v)}")
    return cfg


def parse_hostname(text: str) -> str:
    if not re.match(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,62})$", text):
        raise SpecError(f"invalid hostname {text!r}")
    return text


def parse_limits(memory: str | None, memory_swap: str | None, cpus: str | None, pids: int | None,
                 read_bps: tuple[str, ...], write_bps: tuple[str, ...]) -> Limits:
    lim = Limits()
    if memory is not None:
        lim.memory = parse_size(memory, "memory")
        if lim.memory < MIN_MEMORY:
            raise SpecError(f"invalid memory {memory!r}: minimum memory limit allowed is 6MB")
    if memory_swap is not None:
        if lim.memory is None:
            raise SpecError("--memory-swap needs a memory limit: set -m as well")
        lim.memory_swap = -1 if memory_swap.strip() == "-1" else parse_size(memory_swap, "memory-swap")
        if lim.memory_swap != -1 and lim.memory_swap < lim.memory:
            raise SpecError(f"invalid memory-swap {memory_swap!r}: it must be at least the memory limit")
    if cpus is not None:
        try:
            n = float(cpus)
        except ValueError:
            raise SpecError(f"invalid cpus {cpus!r}: expected a number such as 0.5") from None
        ncpu = os.cpu_count() or 1
        if not (0.01 <= n <= ncpu):
            raise SpecError(f"invalid cpus {cpus!r}: range of CPUs is from 0.01 to {ncpu}.00, as there are only "
                            f"{ncpu} CPUs available")
        lim.cpus = n
    if pids is not None:
        if pids < -1 or pids > MAX_SIZE:
            raise SpecError(f"invalid pids-limit {pids}: use a positive number, or 0 or -1 for unlimited")
        lim.pids = pids
    lim.read_bps = [parse_device_rate(t, "device-read-bps") for t in read_bps]
    lim.write_bps = [parse_device_rate(t, "device-write-bps") for t in write_bps]
    return lim
