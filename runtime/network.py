"""Container networking on the host: bridges, veth pairs, the container's interface, the nftables rules of published
ports, masquerade and isolation, and the /etc/hosts and /etc/resolv.conf of networked containers.

Netlink goes through pyroute2 (imported only by the commands that network: it costs ~150 ms to load). Rules live in
one nftables table per store root (`ip lamina` for /var/lib/lamina, see ipam.host_names), regenerated whole from the
store's records in one atomic `nft -f` transaction whenever a container or network comes or goes; no other table is
ever read or written, and the table goes with the last network. Published ports are DNAT rules, in prerouting for
other hosts and in output for the host itself, with route_localnet on the bridge and a masquerade of 127.0.0.0/8
so that 127.0.0.1 reaches them too: no proxy process per port, full kernel throughput, TCP and UDP alike (Docker's
`userland-proxy: false`). The supervisor holds a bound socket on every published port for the container's life, so
no host process takes the port meanwhile and a second container asking for it fails before it starts.
"""
from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
from dataclasses import dataclass, field

from . import ipam, linux, state
from .ipam import NetworkError, Port

FALLBACK_DNS = ("8.8.8.8", "8.8.4.4")  # Docker's, when the host has only a loopback resolver


def _iproute():
    from pyroute2 import IPRoute  # noqa: PLC0415 - see the module docstring

    return IPRoute()


def host_networks() -> list[ipaddress.IPv4Network]:
    """The host's IPv4 routes (but the default one) and interface addresses: what a new subnet must not overlap."""
    out = []
    with _iproute() as ipr:
        for r in ipr.get_routes(family=socket.AF_INET, table=254):
            dst, plen = r.get_attr("RTA_DST"), r["dst_len"]
            if dst and plen:
                out.append(ipaddress.ip_network(f"{dst}/{plen}", strict=False))
        for a in ipr.get_addr(family=socket.AF_INET):
            ip = a.get_attr("IFA_ADDRESS")
            if ip:
                out.append(ipaddress.ip_network(f"{ip}/{a['prefixlen']}", strict=False))
    return out


def _sysctl(path: str, value: str) -> None:
    full = "/proc/sys/net/" + path
    with open(full) as f:
        if f.read().strip() == value:
            return
    with open(full, "w") as f:
        f.write(value)


def ensure_bridge(net: ipam.Net) -> None:
    with _iproute() as ipr:
        found = ipr.link_lookup(ifname=net.bridge)
        if not found:
            try:
                ipr.link("add", ifname=net.bridge, kind="bridge")
            except Exception as e:  # noqa: BLE001 - pyroute2's NetlinkError; EEXIST from a racing store is fine
                if getattr(e, "code", None) != 17:
                    raise
            found = ipr.link_lookup(ifname=net.bridge)
        idx = found[0]
        have = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=idx, family=socket.AF_INET)}
        if net.gateway not in have:
            ipr.addr("add", index=idx, address=net.gateway, prefixlen=net.prefixlen)
        ipr.link("set", index=idx, state="up")
    _sysctl(f"ipv4/conf/{net.bridge}/route_localnet", "1")  # 127.0.0.1 -> DNAT -> the bridge
    _sysctl("ipv4/ip_forward", "1")  # as Docker: without it nothing leaves a container


def delete_link(name: str) -> None:
    with _iproute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if found:
            try:
                ipr.link("del", index=found[0])
            except Exception:  # noqa: BLE001 - gone meanwhile (a veth dies with its namespace)
                pass


def _nft(script: str) -> None:
    r = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True)
    if r.returncode != 0:
        raise OSError(f"nft: {r.stderr.strip().splitlines()[0] if r.stderr.strip() else 'failed'}")


def ruleset(table: str, nets: list[ipam.Net], ports: list[tuple[Port, str]]) -> str:
    """The whole of the store's table: NAT for published ports and outbound traffic, isolation of networks (a
    published port is the one way from one network to another, as under Docker)."""
    dnat = []
    for p, addr in ports:
        match = f"ip daddr {p.host_ip} " if p.host_ip else ""
        dnat.append(f"{match}{p.proto} dport {p.host_port} dnat to {addr}:{p.container_port}")
    post, fwd, inp = [], [], []
    for n in nets:
        post.append(f'ip saddr {n.subnet} oifname != "{n.bridge}" masquerade')
        post.append(f'ip saddr 127.0.0.0/8 oifname "{n.bridge}" masquerade')
        # hairpin: a container reaching a published port through a host address must see the reply come back
        post.append(f'ct status dnat ip saddr {n.subnet} oifname "{n.bridge}" masquerade')
        # every lamina bridge's name starts with "lamina", whichever store made it
        fwd.append(f'iifname "{n.bridge}" oifname "lamina*" oifname != "{n.bridge}" drop')
        inp.append(f'iifname "{n.bridge}" ct state established,related accept')
        inp.append(f'iifname "{n.bridge}" drop')
    nl = "\n    "
    return f"""add table ip {table}
delete table ip {table}
table ip {table} {{
  chain ports {{
    {nl.join(dnat)}
  }}
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    fib daddr type local jump ports
  }}
  chain output {{
    type nat hook output priority -100; policy accept;
    fib daddr type local jump ports
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    {nl.join(post)}
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    ct status dnat accept
    {nl.join(fwd)}
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    {nl.join(inp)}
  }}
}}
"""


def sync(root: str, st) -> None:
    """The store's table as its records say (the caller holds ipam.lock); none at all without networks."""
    _, table = ipam.host_names(root)
    nets = ipam.networks(st)
    if nets:
        _nft(ruleset(table, nets, ipam.all_ports(st)))
    else:
        _nft(f"add table ip {table}\ndelete table ip {table}\n")


# -- a container's attachment --------------------------------------------------------------------------------


@dataclass
class Attachment:
    network: str
    bridge: str
    address: str
    prefixlen: int
    gateway: str
    veth: str
    user_defined: bool
    ports: list[Port] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"network": self.network, "bridge": self.bridge, "address": self.address,
                "prefixlen": self.prefixlen, "gateway": self.gateway, "veth": self.veth,
                "user_defined": self.user_defined, "ports": [p.to_json() for p in self.ports],
                "aliases": self.aliases}

    @classmethod
    def from_json(cls, d: dict) -> "Attachment":
        return cls(**{**d, "ports": [Port(**p) for p in d.get("ports", [])]})


def reserve_ports(ports: list[Port]) -> tuple[list[Port], list[socket.socket]]:
    """A bound socket for each port (a free one for host port 0): an error now if one is in use. Kept open by the
    container's supervisor for its life."""
    socks: list[socket.socket] = []
    out: list[Port] = []
    try:
        for p in ports:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM if p.proto == "tcp" else socket.SOCK_DGRAM)
            socks.append(s)
            if p.proto == "tcp":
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT leftover is no user
            try:
                s.bind((p.host_ip or "0.0.0.0", p.host_port))
            except OSError as e:
                raise NetworkError(f"cannot publish {p.host_ip or '0.0.0.0'}:{p.host_port}/{p.proto}: "
                                   f"{e.strerror or e}") from None
            out.append(Port(p.proto, p.host_ip, s.getsockname()[1], p.container_port))
    except BaseException:
        for s in socks:
            s.close()
        raise
    return out, socks


def join(root: str, cid: str, cname: str, network: str, ip: str | None, aliases: list[str],
         ports: list[Port]) -> tuple[Attachment, list[socket.socket]]:
    """Allocates the container's address and ports, makes its network's bridge and rules; undone on failure."""
    ports, socks = reserve_ports(ports)
    try:
        with ipam.open_store(root) as st, ipam.lock(root):
            net = ipam.get(st, network)
            if (network == ipam.DEFAULT or (net is not None and not net.user_defined)) and (ip or aliases):
                raise NetworkError("--ip and --network-alias need a user-defined network (lamina network create)")
            if net is None:
                if network != ipam.DEFAULT:
                    raise NetworkError(f"network {network} not found")
                net = ipam.create(st, root, ipam.DEFAULT, None, _foreign(st), user_defined=False)
            _reap(root, st)
            try:
                address = ipam.allocate(st, net, cid, cname, aliases, ip, ports)
                ensure_bridge(net)
                sync(root, st)
                if net.user_defined:
                    refresh_hosts(root, st, net.name, cid)
            except BaseException:
                ipam.release(st, cid)
                _settle(root, st, [net.name])
                raise
        att = Attachment(net.name, net.bridge, address, net.prefixlen, net.gateway, "lmv" + cid[:12],
                         net.user_defined, ports, aliases)
        return att, socks
    except BaseException:
        for s in socks:
            s.close()
        raise


def _reap(root: str, st) -> None:
    """Records of containers that are gone or dead (a killed supervisor, a host reboot) give their addresses and
    ports back, so that they never block a new container; `rm` later finds nothing left to release."""
    holders = {c for (c,) in st.db.execute("SELECT container FROM net_addresses UNION SELECT container FROM net_ports")}
    for cid in holders:
        d = state.containers_dir(root) / cid
        try:
            c = state.Container(d, json.loads((d / "state.json").read_text()))
        except FileNotFoundError:
            c = None
        except (OSError, ValueError):
            continue
        if c is not None and c.status() in ("created", "running"):  # created: still starting
            continue
        delete_link("lmv" + cid[:12])
        ipam.release(st, cid)


def _foreign(st) -> list[ipaddress.IPv4Network]:
    """The host's networks but this store's own bridges (which the store's records already account for)."""
    ours = {ipaddress.ip_network(n.subnet) for n in ipam.networks(st)}
    return [n for n in host_networks() if n not in ours]


def _settle(root: str, st, nets: list[str]) -> None:
    """After a release: the default network (and its bridge) goes with its last container; the rules follow."""
    for name in set(nets):
        net = ipam.get(st, name)
        if net is not None and not net.user_defined and not ipam.members(st, name):
            with st.write() as db:
                if db.execute("SELECT 1 FROM net_addresses WHERE network=?", (name,)).fetchone() is None:
                    db.execute("DELETE FROM networks WHERE name=?", (name,))
            delete_link(net.bridge)
    sync(root, st)


def leave(root: str, c: state.Container) -> None:
    """Undoes `join` and `attach`; safe to repeat, and after a crash."""
    d = c.data.get("net")
    if not d:
        return
    delete_link(d["veth"])
    with ipam.open_store(root) as st, ipam.lock(root):
        nets = ipam.release(st, c.id)
        if not nets:
            return  # released before (the supervisor's cleanup, then `rm`'s)
        _settle(root, st, nets)
        for name in nets:
            if d.get("user_defined"):
                refresh_hosts(root, st, name, None)


def attach(pid: int, att: Attachment) -> None:
    """The container's end: a veth pair whose peer is born in the network namespace of `pid` as eth0, with the
    address, lo up and the default route; the host's end on the bridge."""
    with _iproute() as ipr:
        br = ipr.link_lookup(ifname=att.bridge)
        if not br:
            raise OSError(f"network bridge {att.bridge} is gone")
        ipr.link("add", ifname=att.veth, kind="veth", peer={"ifname": "eth0", "net_ns_pid": pid})
        idx = ipr.link_lookup(ifname=att.veth)[0]
        ipr.link("set", index=idx, master=br[0], state="up")
    own = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    theirs = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        # A netlink socket belongs to the namespace it was made in: make it there, then come straight back.
        linux.setns(theirs, linux.CLONE_NEWNET)
        try:
            ipr = _iproute()
        finally:
            linux.setns(own, linux.CLONE_NEWNET)
    finally:
        os.close(own)
        os.close(theirs)
    with ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=lo, state="up")
        eth = ipr.link_lookup(ifname="eth0")[0]
        ipr.addr("add", index=eth, address=att.address, prefixlen=att.prefixlen)
        ipr.link("set", index=eth, state="up")
        ipr.route("add", dst="0.0.0.0/0", gateway=att.gateway)


# -- /etc files ----------------------------------------------------------------------------------------------


def resolv_conf(text: str) -> str:
    """The host's resolv.conf for a container on a bridge: a loopback nameserver (systemd-resolved's 127.0.0.53,
    a local dnsmasq) cannot answer from the container's namespace, so those lines go, and if none remain Docker's
    public fallback servers are used."""
    lines, servers = [], 0
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                if ipaddress.ip_address(parts[1].split("%")[0]).is_loopback:
                    continue
            except ValueError:
                continue
            servers += 1
        lines.append(line)
    if not servers:
        lines += [f"nameserver {s}" for s in FALLBACK_DNS]
    return "\n".join(lines) + "\n"


def hosts_text(hostname: str, address: str | None, add_hosts: list[list[str]],
               peers: list[tuple[str, str, list[str]]], own: tuple[str, ...] | list[str] = ()) -> str:
    """/etc/hosts: localhost; the container's hostname on its address (on a user-defined network its name and
    aliases too, as Docker's resolver answers them; on the default bridge the hostname only, as Docker);
    --add-host entries; then (on a user-defined network) every other container of the network by name and alias."""
    out = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    out.append(f"{address}\t{' '.join(dict.fromkeys([hostname, *own]))}" if address else f"127.0.1.1\t{hostname}")
    out += [f"{ip}\t{host}" for host, ip in add_hosts]
    out += [f"{addr}\t{' '.join(dict.fromkeys([pname, *aliases]))}" for addr, pname, aliases in peers]
    return "\n".join(out) + "\n"


def refresh_hosts(root: str, st, network: str, skip: str | None) -> None:
    """Rewrites, in place (a bind mount holds the inode), the /etc/hosts of every container on `network` but
    `skip` (which writes its own before it starts)."""
    ms = ipam.members(st, network)
    for cid, address, _, _ in ms:
        if cid == skip:
            continue
        d = state.containers_dir(root) / cid
        try:
            data = json.loads((d / "state.json").read_text())
            fd = os.open(d / "hosts", os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
        except (OSError, ValueError):
            continue
        peers = [(a, n, al) for c2, a, n, al in ms if c2 != cid]
        own = [n for c2, _, n, al in ms if c2 == cid for n in (n, *al)]
        text = hosts_text(data.get("hostname", ""), address, data.get("add_hosts", []), peers, own)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)


def peers_of(root: str, network: str, cid: str) -> list[tuple[str, str, list[str]]]:
    with ipam.open_store(root) as st:
        return [(a, n, al) for c2, a, n, al in ipam.members(st, network) if c2 != cid]
