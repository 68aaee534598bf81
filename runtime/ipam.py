"""The runtime's networks, container addresses and published ports, kept in the store's index (the tables are
documented beside their CREATE TABLE in store/schema.py, NETWORK_SCHEMA).

Every allocation is one BEGIN IMMEDIATE transaction: the primary keys make a second container with one address
or one published port impossible, however many start at once. Subnets are chosen (or checked, with --subnet)
against the host's routes and addresses, which the caller reads from netlink (runtime/network.py), and against
the store's other networks. Nothing here touches the host; host names of bridges and the nftables table follow
from the store root, so two stores on one host never share (and never tear down) each other's.
"""
from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import json
import os
import re
import secrets
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from store.root import Store
from store.schema import NETWORK_SCHEMA, NETWORK_SCHEMA_KEY, NETWORK_SCHEMA_VERSION

DEFAULT = "bridge"
DEFAULT_ROOT = "/var/lib/lamina"
RESERVED = ("bridge", "host", "none", "default")
NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")
# Docker's default bridge is 172.17.0.0/16 and podman's 10.88.0.0/16; user networks get /24s as podman's 10.89.x.
DEFAULT_SUBNETS = [f"10.{b}.0.0/16" for b in (88, 87, 86, 85, 84, 83, 82, 81)]
USER_SUBNETS = [f"10.{a}.{b}.0/24" for a in (89, 90, 91) for b in range(256)]


class NetworkError(ValueError):
    """Bad network input or a conflict; the message is shown as is (exit 125)."""


@dataclass
class Net:
    name: str
    id: str
    subnet: str
    gateway: str
    bridge: str
    user_defined: bool

    @property
    def prefixlen(self) -> int:
        return ipaddress.ip_network(self.subnet).prefixlen


@dataclass
class Port:
    proto: str            # "tcp" or "udp"
    host_ip: str          # "" for every host address
    host_port: int        # 0: any free port (chosen by runtime/network.reserve_ports)
    container_port: int

    def to_json(self) -> dict:
        return {"proto": self.proto, "host_ip": self.host_ip, "host_port": self.host_port,
                "container_port": self.container_port}

    def text(self) -> str:
        """As `docker ps` shows it: 0.0.0.0:8080->80/tcp."""
        return f"{self.host_ip or '0.0.0.0'}:{self.host_port}->{self.container_port}/{self.proto}"


def host_names(root: str) -> tuple[str, str]:
    """(interface prefix, nftables table) of a store root: "lamina" and "lamina" for /var/lib/lamina, a short hash
    of the root's path appended otherwise (interface names have 15 characters)."""
    real = os.path.realpath(root)
    tag = "" if real == DEFAULT_ROOT else hashlib.sha256(real.encode()).hexdigest()[:4]
    return "lamina" + tag, "lamina" + (f"_{tag}" if tag else "")


def open_store(root: str) -> Store:
    st = Store(str(root))
    row = st.db.execute("SELECT value FROM meta WHERE key=?", (NETWORK_SCHEMA_KEY,)).fetchone()
    if row is None or int(row[0]) < NETWORK_SCHEMA_VERSION:
        with st.write() as db:
            for stmt in re.sub(r"--[^\n]*", "", NETWORK_SCHEMA).split(";"):
                if stmt.strip():
                    db.execute(stmt)
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (NETWORK_SCHEMA_KEY, str(NETWORK_SCHEMA_VERSION)))
    return st


@contextmanager
def lock(root: str) -> Iterator[None]:
    """Serializes what changes the host for this store (bridges made and removed, the rules regenerated): a bridge
    is never removed between another container's allocation on it and its veth joining it."""
    fd = os.open(os.path.join(root, "network.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _row(r: tuple) -> Net:
    return Net(r[0], r[1], r[2], r[3], r[4], bool(r[5]))


_COLS = "name, id, subnet, gateway, bridge, user_defined"


def get(st: Store, name: str) -> Net | None:
    r = st.db.execute(f"SELECT {_COLS} FROM networks WHERE name=? OR id=?", (name, name)).fetchone()
    return None if r is None else _row(r)


def networks(st: Store) -> list[Net]:
    return [_row(r) for r in st.db.execute(f"SELECT {_COLS} FROM networks ORDER BY name")]


def parse_subnet(text: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        raise NetworkError(f"invalid subnet {text!r}: {e}") from None
    if not isinstance(net, ipaddress.IPv4Network):
        raise NetworkError(f"invalid subnet {text!r}: only IPv4 subnets are supported")
    if net.prefixlen > 29 or net.prefixlen < 8:
        raise NetworkError(f"invalid subnet {text!r}: the prefix length must be between 8 and 29")
    return net


def create(st: Store, root: str, name: str, subnet: str | None, host_nets: list[ipaddress.IPv4Network],
           user_defined: bool = True) -> Net:
    """A network's record (the caller makes its bridge). `host_nets`: the host's routes and addresses."""
    if user_defined and (name in RESERVED or not NAME.match(name) or len(name) > 64):
        raise NetworkError(f"invalid network name {name!r}" + (": it is reserved" if name in RESERVED else
                                                                ": only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed"))
    prefix, _ = host_names(root)
    nid = secrets.token_hex(32)
    bridge = prefix + "0" if not user_defined else f"{prefix}-{nid[:14 - len(prefix)]}"
    with st.write() as db:
        if db.execute("SELECT 1 FROM networks WHERE name=?", (name,)).fetchone():
            raise NetworkError(f"network with name {name} already exists")
        ours = [(n, ipaddress.ip_network(s)) for n, s in db.execute("SELECT name, subnet FROM networks")]
        if subnet is not None:
            want = parse_subnet(subnet)
            for other, s in ours:
                if want.overlaps(s):
                    raise NetworkError(f"subnet {subnet} overlaps with network {other} ({s})")
            for s in host_nets:
                if want.overlaps(s):
                    raise NetworkError(f"subnet {subnet} overlaps with the host's route or address {s}")
        else:
            taken = [s for _, s in ours] + list(host_nets)
            want = next((c for c in map(ipaddress.ip_network, USER_SUBNETS if user_defined else DEFAULT_SUBNETS)
                         if not any(c.overlaps(t) for t in taken)), None)
            if want is None:
                raise NetworkError("no free subnet left for a new network: give one with --subnet")
        gateway = str(next(want.hosts()))
        db.execute("INSERT INTO networks VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (name, nid, str(want), gateway, bridge, int(user_defined),
                    time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())))
    return Net(name, nid, str(want), gateway, bridge, user_defined)


def remove(st: Store, name: str) -> Net:
    with st.write() as db:
        r = db.execute(f"SELECT {_COLS} FROM networks WHERE name=? OR id=?", (name, name)).fetchone()
        if r is None:
            raise NetworkError(f"network {name} not found")
        net = _row(r)
        users = [c for (c,) in db.execute("SELECT container FROM net_addresses WHERE network=?", (net.name,))]
        if users:
            raise NetworkError(f"network {net.name} has active endpoints: {', '.join(u[:12] for u in users)}")
        db.execute("DELETE FROM networks WHERE name=?", (net.name,))
    return net


def allocate(st: Store, net: Net, cid: str, cname: str, aliases: list[str], ip: str | None,
             ports: list[Port]) -> str:
    """The container's address on `net` (`ip` if given and free) and its published ports, in one transaction."""
    subnet = ipaddress.ip_network(net.subnet)
    with st.write() as db:
        used = {a for (a,) in db.execute("SELECT address FROM net_addresses WHERE network=?", (net.name,))}
        used.add(net.gateway)
        if ip is not None:
            try:
                want = ipaddress.ip_address(ip)
            except ValueError:
                raise NetworkError(f"invalid IP address {ip!r}") from None
            if want not in subnet or want in (subnet.network_address, subnet.broadcast_address):
                raise NetworkError(f"invalid IP address {ip}: not a host address of network {net.name} ({subnet})")
            if str(want) in used:
                raise NetworkError(f"address {ip} is already in use on network {net.name}")
            address = str(want)
        else:
            address = next((str(h) for h in subnet.hosts() if str(h) not in used), "")
            if not address:
                raise NetworkError(f"no address left on network {net.name} ({subnet})")
        db.execute("INSERT INTO net_addresses VALUES (?, ?, ?, ?, ?)",
                   (net.name, address, cid, cname, json.dumps(aliases)))
        for p in ports:
            clash = db.execute("SELECT container FROM net_ports WHERE proto=? AND host_port=? AND "
                               "(host_ip=? OR host_ip='' OR ?='')",
                               (p.proto, p.host_port, p.host_ip, p.host_ip)).fetchone()
            if clash is not None:
                raise NetworkError(f"port {p.host_ip or '0.0.0.0'}:{p.host_port}/{p.proto} is already allocated "
                                   f"(container {clash[0][:12]})")
            try:
                db.execute("INSERT INTO net_ports VALUES (?, ?, ?, ?, ?, ?)",
                           (cid, p.proto, p.host_ip, p.host_port, p.container_port, address))
            except sqlite3.IntegrityError:
                raise NetworkError(f"port {p.host_port}/{p.proto} is published twice") from None
    return address


def release(st: Store, cid: str) -> list[str]:
    """Frees the container's addresses and ports; returns the names of the networks it was on."""
    with st.write() as db:
        nets = [n for (n,) in db.execute("SELECT network FROM net_addresses WHERE container=?", (cid,))]
        db.execute("DELETE FROM net_addresses WHERE container=?", (cid,))
        db.execute("DELETE FROM net_ports WHERE container=?", (cid,))
    return nets


def members(st: Store, network: str) -> list[tuple[str, str, str, list[str]]]:
    """(container id, address, name, aliases) of every container on the network."""
    return [(c, a, n, json.loads(al)) for c, a, n, al in
            st.db.execute("SELECT container, address, name, aliases FROM net_addresses WHERE network=? "
                          "ORDER BY address", (network,))]


def all_ports(st: Store) -> list[tuple[Port, str]]:
    """Every published port with the address it leads to."""
    return [(Port(proto, hip, hport, cport), addr) for proto, hip, hport, cport, addr in
            st.db.execute("SELECT proto, host_ip, host_port, container_port, address FROM net_ports "
                          "ORDER BY host_port, proto")]
