"""Container networking with real traffic: the default bridge, published TCP and UDP ports (from the host's
127.0.0.1 and from a "remote client" namespace), user-defined networks (names, aliases, isolation), outbound
masquerade (to a server in a namespace standing in for the internet), bad input, and nothing left after `rm`.

Traffic goes only to loopback, to the containers' private addresses and to the network namespaces made here, wired
to the host with veth pairs on their own private /30s. Every namespace, link and nftables table is removed even
when a test fails (the `lamina` fixture's sweep removes the containers; `nets` below the rest).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from runtime import ipam, network

from .conftest import Lamina, sweep

pytestmark = pytest.mark.skipif(subprocess.run(["which", "nft"], capture_output=True).returncode != 0,
                                reason="nft (Debian package nftables) is not installed")

WWW = "hello from the container\n"
UDP_SERVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(100)
    s.sendto(b"pong:" + data, peer)
"""
TCP_PEER_SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen()
print("ready", flush=True)
c, peer = s.accept()
c.sendall(f"you are {peer[0]}\\n".encode())
c.close()
"""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nets:
    """Network namespaces wired to the host, each by a veth pair on a /30 of its own."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.procs: list[subprocess.Popen] = []

    def make(self, role: str, third: int) -> tuple[str, str, str]:
        """(namespace, host's address, namespace's address) on 10.<200+third>.0.0/30."""
        ns = f"lmt{role}{os.getpid() % 10000}"
        host_if, ns_if = f"{ns}h", f"{ns}n"
        host_ip, ns_ip = f"10.{200 + third}.0.1", f"10.{200 + third}.0.2"
        self.names.append(ns)
        ip("netns", "add", ns)
        ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", ns)
        ip("addr", "add", f"{host_ip}/30", "dev", host_if)
        ip("link", "set", host_if, "up")
        ip("-n", ns, "addr", "add", f"{ns_ip}/30", "dev", ns_if)
        ip("-n", ns, "link", "set", ns_if, "up")
        ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", ns, "route", "add", "default", "via", host_ip)
        return ns, host_ip, ns_ip

    def start(self, argv: list[str]) -> subprocess.Popen:
        """A server; returns once it printed "ready"."""
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(p)
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
        return p

    def cleanup(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()
        for ns in self.names:
            ip("link", "del", f"{ns}h", check=False)
            ip("netns", "del", ns, check=False)


@pytest.fixture
def nets():
    n = Nets()
    try:
        yield n
    finally:
        n.cleanup()


@pytest.fixture(autouse=True)
def _no_network_left(lamina_root):
    """After each test, failed or not: its containers, then its user networks (their bridges) go."""
    _VETHS_BEFORE.clear()
    _VETHS_BEFORE.update(_links("lmv"))
    yield
    sweep(lamina_root)
    with ipam.open_store(str(lamina_root)) as st:
        names = [n.name for n in ipam.networks(st) if n.user_defined]
    if names:
        Lamina(lamina_root)("network", "rm", *names)


def nft_table(root: Path) -> str | None:
    _, table = ipam.host_names(str(root))
    r = subprocess.run(["nft", "list", "table", "ip", table], capture_output=True, text=True)
    return r.stdout if r.returncode == 0 else None


def _links(*prefixes: str) -> set[str]:
    out = ip("-o", "link", "show").stdout
    names = {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}
    return {n for n in names if n.startswith(prefixes)}


_VETHS_BEFORE: set[str] = set()  # container veths (lmv…) of other stores on this host, when the test began


def lamina_links(root: Path) -> list[str]:
    """This store's bridges, and container veths made since the test began."""
    prefix, _ = ipam.host_names(str(root))
    return sorted(_links(prefix) | (_links("lmv") - _VETHS_BEFORE))


def assert_nothing_left(root: Path) -> None:
    assert lamina_links(root) == []
    assert nft_table(root) is None
    with ipam.open_store(str(root)) as st:
        assert st.db.execute("SELECT * FROM net_addresses").fetchall() == []
        assert st.db.execute("SELECT * FROM net_ports").fetchall() == []
        assert [n.name for n in ipam.networks(st) if not n.user_defined] == []


def www(tmp_path: Path) -> str:
    d = tmp_path / "www"
    d.mkdir()
    (d / "index.html").write_text(WWW)
    return str(d)


def container_pid(lamina, name: str) -> int:
    return json.loads(lamina("inspect", name).stdout)[0]["State"]["Pid"]


def get(url: str) -> str:
    deadline = time.monotonic() + 20
    while True:
        try:
            return urllib.request.urlopen(url, timeout=5).read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)  # the detached container's httpd may not listen yet


def test_default_bridge(lamina, image):
    """An address on the default network's subnet, a default route via its gateway, lo up, the host's non-loopback
    DNS servers; and after the container nothing of the network remains."""
    r = lamina.sh(image, "ip -4 -o addr; ip route; cat /etc/resolv.conf /etc/hosts")
    assert r.returncode == 0, r.stderr
    assert "127.0.0.1/8" in r.stdout
    addr = next(line.split()[3] for line in r.stdout.splitlines() if " eth0 " in line)
    assert addr.startswith("10.") and addr.endswith("/16")
    gateway = addr.rsplit(".", 2)[0] + ".0.1"
    assert f"default via {gateway} dev eth0" in r.stdout
    assert "nameserver 127." not in r.stdout
    assert f"{addr.split('/')[0]}\t" in r.stdout  # its own name on its address in /etc/hosts
    assert_nothing_left(lamina.root)


def test_resolv_conf_replaces_loopback():
    assert network.resolv_conf("nameserver 127.0.0.53\noptions edns0\n") == \
        "options edns0\nnameserver 8.8.8.8\nnameserver 8.8.4.4\n"
    assert network.resolv_conf("search x\nnameserver 127.0.0.1\nnameserver 10.1.2.3\n") == \
        "search x\nnameserver 10.1.2.3\n"


def test_published_ports_from_host_and_remote(lamina, image, nets, tmp_path):
    """-p HOST:80 (TCP) and -p HOST:9090/udp answer on the host's 127.0.0.1 and from another host (a namespace
    routed through this one); -p 80 alone gets a free port; ps, port and inspect show them."""
    client, host_ip, _ = nets.make("cl", 1)
    tport, uport = free_port(), free_port(socket.SOCK_DGRAM)
    r = lamina("run", "-d", "--name", "web", "-p", f"{tport}:80", "-p", f"{uport}:9090/udp", "-p", "8000",
               "-v", f"{www(tmp_path)}:/www", image, "sh", "-c", "httpd -p 8000 -h /www; exec httpd -f -p 80 -h /www")
    assert r.returncode == 0, r.stderr
    # busybox has no UDP server: one runs in the container's network namespace, behind the same published port
    pid = container_pid(lamina, "web")
    nets.start(["nsenter", f"--net=/proc/{pid}/ns/net", sys.executable, "-c", UDP_SERVER, "9090"])

    assert get(f"http://127.0.0.1:{tport}/") == WWW
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(10)
        s.sendto(b"ping", ("127.0.0.1", uport))
        assert s.recvfrom(100)[0] == b"pong:ping"
    remote = subprocess.run(
        ["ip", "netns", "exec", client, sys.executable, "-c",
         "import socket, sys, urllib.request\n"
         f"print(urllib.request.urlopen('http://{host_ip}:{tport}/', timeout=10).read().decode(), end='')\n"
         "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(10)\n"
         f"s.sendto(b'far', ('{host_ip}', {uport})); print(s.recvfrom(100)[0].decode())\n"],
        capture_output=True, text=True, timeout=60)
    assert remote.returncode == 0, remote.stderr
    assert remote.stdout == WWW + "pong:far\n"

    port = lamina("port", "web")
    assert port.returncode == 0, port.stderr
    lines = port.stdout.splitlines()
    assert f"80/tcp -> 0.0.0.0:{tport}" in lines and f"9090/udp -> 0.0.0.0:{uport}" in lines
    free = int(lamina("port", "web", "8000").stdout.strip().rsplit(":", 1)[1])
    assert get(f"http://127.0.0.1:{free}/") == WWW
    ps = next(x for x in lamina("ps").stdout.splitlines() if x.endswith("web"))
    assert f"0.0.0.0:{tport}->80/tcp" in ps
    settings = json.loads(lamina("inspect", "web").stdout)[0]["NetworkSettings"]
    assert settings["Ports"]["80/tcp"] == [{"HostIp": "0.0.0.0", "HostPort": str(tport)}]

    assert lamina("rm", "-f", "web").returncode == 0
    assert_nothing_left(lamina.root)
    with socket.socket() as s:  # the port is the host's again
        s.bind(("127.0.0.1", tport))


def test_port_in_use_and_bad_input(lamina, image):
    """A port in use, a bad -p, a bad subnet, a duplicate --ip: one line, exit 125, nothing left."""
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        r = lamina("run", "--rm", "-p", f"{taken}:80", image, "true")
        assert r.returncode == 125 and r.stderr.count("\n") == 1 and str(taken) in r.stderr, r.stderr
    for bad in ("99999", "80:80/sctp", "1.2.3:80:80", "0:80", "80-90:80"):
        r = lamina("run", "--rm", "-p", bad, image, "true")
        assert r.returncode == 125 and r.stderr.count("\n") == 1, (bad, r.stderr)
    r = lamina("run", "--rm", "--network", "none", "-p", "80", image, "true")
    assert r.returncode == 125 and r.stderr.count("\n") == 1, r.stderr
    for opt in (["--ip", "10.88.0.9"], ["--network-alias", "x1"]):  # the default network takes neither
        r = lamina("run", "--rm", *opt, image, "true")
        assert r.returncode == 125 and "user-defined" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = lamina("run", "--rm", "--network", "nosuchnet", image, "true")
    assert r.returncode == 125 and "not found" in r.stderr, r.stderr
    assert lamina.containers() == []
    assert_nothing_left(lamina.root)
    try:
        assert lamina("network", "create", "n1", "--subnet", "10.97.0.0/24").returncode == 0
        for args in (["n2", "--subnet", "10.97.0.128/25"], ["n2", "--subnet", "10.97.0.0/33"], ["n1"],
                     ["bridge"], ["n2", "--subnet", "192.0.2.0/24" if _on_host("192.0.2.0/24") else "127.0.0.0/8"]):
            r = lamina("network", "create", *args)
            assert r.returncode == 125 and r.stderr.count("\n") == 1, (args, r.stderr)
        r = lamina("run", "-d", "--name", "ipa", "--network", "n1", "--ip", "10.97.0.50", image, "sleep", "60")
        assert r.returncode == 0, r.stderr
        r = lamina("run", "--rm", "--network", "n1", "--ip", "10.97.0.50", image, "true")
        assert r.returncode == 125 and "in use" in r.stderr and r.stderr.count("\n") == 1, r.stderr
        r = lamina("network", "rm", "n1")
        assert r.returncode == 1 and "active endpoints" in r.stderr
        assert len(lamina.containers()) == 1
    finally:
        lamina("rm", "-f", "ipa")
        lamina("network", "rm", "n1")
    assert_nothing_left(lamina.root)


def _on_host(cidr: str) -> bool:
    import ipaddress  # noqa: PLC0415
    return any(n.overlaps(ipaddress.ip_network(cidr)) for n in network.host_networks())


def test_user_networks_names_and_isolation(lamina, image, nets, tmp_path):
    """Containers on one user network reach each other by name and alias, with /etc/hosts kept current as they
    come and go; a container on another network cannot reach them; --add-host and --ip apply."""
    if _on_host("10.196.0.0/24"):
        pytest.skip("10.196.0.0/24 is one of this host's networks")
    assert lamina("network", "create", "front", "--subnet", "10.196.0.0/24").returncode == 0
    assert lamina("network", "create", "back").returncode == 0
    _, host_ip, _ = nets.make("hp", 3)  # a host address of the test's own, for the published port
    port = free_port()
    r = lamina("run", "-d", "--name", "srv", "--network", "front", "--network-alias", "db", "--ip", "10.196.0.77",
               "-p", f"{port}:80", "-v", f"{www(tmp_path)}:/www", image, "httpd", "-f", "-p", "80", "-h", "/www")
    assert r.returncode == 0, r.stderr
    r = lamina("run", "-d", "--name", "peer", "--network", "front", "--add-host", "extra:10.1.2.3", image,
               "sleep", "120")
    assert r.returncode == 0, r.stderr
    r = lamina.sh(image, "wget -q -O- http://srv/ && wget -q -O- http://db/ && cat /etc/hosts", "--network", "front")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(WWW + WWW)
    assert "10.196.0.77\tsrv db" in r.stdout
    hosts = lamina("exec", "peer", "cat", "/etc/hosts").stdout
    assert "10.196.0.77\tsrv db" in hosts and "10.1.2.3\textra" in hosts
    # the other network: no route through the host between the two bridges
    r = lamina.sh(image, "nc -w 3 10.196.0.77 80 </dev/null && echo reached", "--network", "back")
    assert "reached" not in r.stdout
    r = lamina.sh(image, "nc -w 3 10.196.0.77 80 </dev/null && echo reached", "--network", "bridge")
    assert "reached" not in r.stdout
    # but its published port is open to every network, and to its own (hairpin), through a host address
    for net in ("back", "front"):
        r = lamina.sh(image, f"wget -q -O- http://{host_ip}:{port}/", "--network", net)
        assert r.returncode == 0 and r.stdout == WWW, (net, r.stderr)
    # srv leaves: peer's /etc/hosts forgets it
    assert lamina("rm", "-f", "srv").returncode == 0
    hosts = lamina("exec", "peer", "cat", "/etc/hosts").stdout
    assert "srv" not in hosts and "10.1.2.3\textra" in hosts


def test_outbound_masquerade(lamina, image, nets):
    """A container's connection to "the internet" (a namespace routed through the host) arrives from the host's
    own address on that link: masqueraded."""
    inet, host_ip, inet_ip = nets.make("in", 2)
    port = 8765
    nets.start(["ip", "netns", "exec", inet, sys.executable, "-c", TCP_PEER_SERVER, inet_ip, str(port)])
    r = lamina.sh(image, f"nc {inet_ip} {port} </dev/null")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"you are {host_ip}\n"


def test_concurrent_starts_get_distinct_addresses(lamina, image):
    """Containers started at once on one network get distinct addresses and reach each other; after `rm -f` of
    all of them nothing remains."""
    assert lamina("network", "create", "many").returncode == 0
    n = 12
    procs = [lamina.popen("run", "-d", "--name", f"m{i}", "--network", "many", image,
                          "sh", "-c", "httpd -p 80 -h /etc; sleep 300") for i in range(n)]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
    addrs = [json.loads(lamina("inspect", f"m{i}").stdout)[0]["NetworkSettings"]["IPAddress"] for i in range(n)]
    assert len(set(addrs)) == n and all(addrs)
    r = lamina("exec", "m0", "sh", "-c", " && ".join(f"wget -q -O /dev/null http://m{i}/passwd" for i in range(n)))
    assert r.returncode == 0, r.stderr
    assert lamina("rm", "-f", *[f"m{i}" for i in range(n)]).returncode == 0
    assert lamina("network", "rm", "many").returncode == 0
    assert_nothing_left(lamina.root)


def test_stop_and_crash_release_everything(lamina, image):
    """A stopped container has given back its address and port; one whose supervisor and init were killed is
    cleaned up by `rm` (the veth, the rules, the records)."""
    port = free_port()
    assert lamina("run", "-d", "--name", "s1", "-p", f"{port}:80", image, "httpd", "-f", "-p", "80").returncode == 0
    assert lamina("stop", "-t", "1", "s1").returncode == 0
    assert_nothing_left(lamina.root)
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # the supervisor's hold on the port is gone too
    r = lamina("run", "-d", "--name", "s2", "-p", f"{port}:80", image, "httpd", "-f", "-p", "80")
    assert r.returncode == 0, r.stderr
    c = next(c for c in lamina.containers() if c.name == "s2")
    os.kill(c.data["shim_pid"], 9)
    os.kill(c.data["pid"], 9)
    assert nft_table(lamina.root) is not None  # nobody cleaned up yet
    # the dead container's port and address block no new container
    r = lamina("run", "--rm", "-p", f"{port}:80", image, "true")
    assert r.returncode == 0, r.stderr
    r = lamina("rm", "-f", "s2")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert_nothing_left(lamina.root)
