"""Parsing and validating `lamina run` input into a `RunSpec`, before anything is created.

Everything a user can get wrong (sizes, CPU counts, volume specs, device rates, users, env) is checked here so that
bad input fails with one line and exit 125 while nothing exists yet. Formats follow Docker's (`-m 32m`,
`--memory-swap -1`, `--cpus 0.5`, `-v SRC:DST[:ro]`, `--device-read-bps /dev/sda:1mb`).
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import stat
from dataclasses import dataclass, field

from .cgroups import Limits
from .ipam import Port
from .linux import ALL_CAPS


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
    network: str = "bridge"
    publish: list[Port] = field(default_factory=list)
    publish_all: bool = False
    network_aliases: list[str] = field(default_factory=list)
    add_hosts: list[list[str]] = field(default_factory=list)   # [name, ip]
    ip: str | None = None
    entrypoint: str | None = None
    cap_add: list[str] = field(default_factory=list)     # names without CAP_, upper case, or ALL
    tmpfs: list[tuple[str, int, str]] = field(default_factory=list)  # (container path, mount flags, options)
    cap_drop: list[str] = field(default_factory=list)
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


def parse_env_file(path: str) -> list[str]:
    """Docker's --env-file: KEY=VALUE lines taken as they are (no quotes removed), KEY alone takes the caller's
    value, blank lines and lines starting with # skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read((1 << 20) + 1)
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"invalid env file {path!r}: {getattr(e, 'strerror', None) or e}") from None
    if len(text) > 1 << 20:
        raise SpecError(f"invalid env file {path!r}: larger than 1 MiB")
    items = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.lstrip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("=") or " " in line.partition("=")[0] or "\0" in line:
            raise SpecError(f"invalid env file {path!r}: line {n}: variable {line.partition('=')[0]!r} is not a name")
        items.append(line)
    return parse_env(items)


_TMPFS_FLAGS = {"ro": (1, True), "rw": (1, False), "nosuid": (2, True), "suid": (2, False), "nodev": (4, True),
                "dev": (4, False), "noexec": (8, True), "exec": (8, False)}
_TMPFS_DATA = re.compile(r"^(size=[0-9]+[kmgKMG%]?|mode=[0-7]{3,4}|uid=[0-9]+|gid=[0-9]+|nr_inodes=[0-9]+[kmgKMG]?)$")


def parse_tmpfs(text: str) -> tuple[str, int, str]:
    """Docker's --tmpfs PATH[:OPTIONS]: nosuid, nodev and noexec unless the options say otherwise, mode 1777
    unless given; ro/rw, (no)suid, (no)dev, (no)exec, size=, mode=, uid=, gid=, nr_inodes= understood."""
    path, _, opts = text.partition(":")
    path = _clean_target(path, text)
    flags = 2 | 4 | 8
    data = []
    for o in filter(None, opts.split(",")):
        if o in _TMPFS_FLAGS:
            bit, on = _TMPFS_FLAGS[o]
            flags = flags | bit if on else flags & ~bit
        elif _TMPFS_DATA.match(o):
            data.append(o)
        else:
            raise SpecError(f"invalid tmpfs option {o!r} in {text!r}")
    if not any(d.startswith("mode=") for d in data):
        data.append("mode=1777")
    return path, flags, ",".join(data)


def parse_cap(text: str) -> str:
    """A capability as --cap-add/--cap-drop take it: a name with or without CAP_, any case, or ALL."""
    name = text.strip().upper()
    name = name[4:] if name.startswith("CAP_") else name
    if name != "ALL" and name not in ALL_CAPS:
        raise SpecError(f"invalid capability {text!r}: unknown capability")
    return name


def capabilities(base: frozenset[int], add: list[str], drop: list[str]) -> frozenset[int]:
    """Docker's rule (moby's TweakCapabilities): --cap-add ALL is every capability (that the host grants: the
    caller intersects with its bounding set) but the dropped ones;
    --cap-drop ALL keeps only the added ones; otherwise the default set minus the dropped, plus the added (an add
    wins over a drop of the same name)."""
    every = frozenset(ALL_CAPS.values())
    if "ALL" in add:
        return every - {ALL_CAPS[n] for n in drop if n != "ALL"}
    if "ALL" in drop:
        return frozenset(ALL_CAPS[n] for n in add)
    return (base - {ALL_CAPS[n] for n in drop}) | {ALL_CAPS[n] for n in add}


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


def _port_number(text: str, spec: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise SpecError(f"invalid port specification {spec!r}: {text!r} is not a port number (1-65535)")
    return int(text)


def parse_publish(spec: str) -> Port:
    """Docker's -p: [IP:][HOST:]CONTAINER[/tcp|/udp]; HOST empty or absent: a free port."""
    rest, _, proto = spec.partition("/")
    proto = proto or "tcp"
    if proto not in ("tcp", "udp"):
        raise SpecError(f"invalid port specification {spec!r}: protocol {proto!r} (use tcp or udp)")
    parts = rest.split(":")
    if len(parts) > 3 or not parts[-1]:
        raise SpecError(f"invalid port specification {spec!r}: expected [IP:][HOST:]CONTAINER[/PROTO]")
    if any("-" in x for x in parts[-2:]):
        raise SpecError(f"invalid port specification {spec!r}: port ranges are not supported")
    ip = parts[0] if len(parts) == 3 else ""
    if ip:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            raise SpecError(f"invalid port specification {spec!r}: {ip!r} is not an IP address") from None
        if addr.version != 4:
            raise SpecError(f"invalid port specification {spec!r}: only IPv4 host addresses are supported")
        ip = "" if addr.is_unspecified else str(addr)
    host = parts[-2] if len(parts) >= 2 else ""
    return Port(proto, ip, _port_number(host, spec) if host else 0, _port_number(parts[-1], spec))


def parse_exposed(cfg: dict) -> list[Port]:
    """-P: the image's ExposedPorts ({"80/tcp": {}}), each on a free host port."""
    out = []
    for key in sorted(cfg.get("ExposedPorts") or {}):
        try:
            p = parse_publish(str(key))
        except SpecError as e:
            raise SpecError(f"image: invalid ExposedPorts entry: {e}") from None
        out.append(Port(p.proto, "", 0, p.container_port))
    return out


def parse_add_host(text: str) -> list[str]:
    name, sep, ip = text.partition(":")
    if not sep:
        name, sep, ip = text.partition("=")
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        raise SpecError(f"invalid argument {text!r} for --add-host: expected NAME:IP") from None
    if not re.match(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$", name):
        raise SpecError(f"invalid argument {text!r} for --add-host: {name!r} is not a host name")
    return [name, ip]


def parse_network_alias(text: str) -> str:
    if not re.match(r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,62})$", text):
        raise SpecError(f"invalid network alias {text!r}")
    return text


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
