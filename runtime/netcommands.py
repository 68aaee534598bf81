"""`lamina network create|ls|inspect|rm` and `lamina port`, collected by runtime/cli.py through COMMANDS.

Thin: the records are runtime/ipam.py's, the host's bridges and rules runtime/network.py's. Errors are one line;
exit 125 for bad input as `run`'s, 1 for a missing or busy network as Docker's.
"""
from __future__ import annotations

import json
import sys

import click

from . import ipam, state
from .commands import _Cmd, _Group, _fail, _find, _root


@click.group("network", cls=_Group)
def network_grp() -> None:
    """Manage networks (bridges on the host with their own subnet and name resolution)."""


@network_grp.command("create")
@click.option("--subnet", default=None, metavar="CIDR", help="e.g. 10.90.0.0/24 (default: a free 10.89.x.0/24).")
@click.option("-d", "--driver", default="bridge", type=click.Choice(["bridge"]), show_default=True)
@click.argument("name")
@click.pass_context
def network_create(ctx: click.Context, subnet: str | None, driver: str, name: str) -> None:
    """Create a network."""
    from . import network  # noqa: PLC0415 - pyroute2 loads only here

    root = _root(ctx)
    try:
        with ipam.open_store(root) as st, ipam.lock(root):
            net = ipam.create(st, root, name, subnet, network._foreign(st))
            try:
                network.ensure_bridge(net)
                network.sync(root, st)
            except BaseException:
                ipam.remove(st, net.name)
                network.delete_link(net.bridge)
                network.sync(root, st)
                raise
    except ipam.NetworkError as e:
        _fail(str(e))
        return
    except OSError as e:
        _fail(f"creating network {name}: {e}")
        return
    click.echo(net.id)


@network_grp.command("ls")
@click.option("-q", "--quiet", is_flag=True)
@click.pass_context
def network_ls(ctx: click.Context, quiet: bool) -> None:
    """List networks."""
    with ipam.open_store(_root(ctx)) as st:
        nets = ipam.networks(st)
    if not quiet:
        click.echo(f"{'NETWORK ID':<15}{'NAME':<20}{'DRIVER':<10}SUBNET")
    for n in nets:
        click.echo(n.name if quiet else f"{n.id[:12]:<15}{n.name:<20}{'bridge':<10}{n.subnet}")


def _inspect(st, n: ipam.Net) -> dict:
    return {"Name": n.name, "Id": n.id, "Driver": "bridge", "Internal": False,
            "IPAM": {"Driver": "default", "Config": [{"Subnet": n.subnet, "Gateway": n.gateway}]},
            "Options": {"com.docker.network.bridge.name": n.bridge},
            "Containers": {cid: {"Name": name, "IPv4Address": f"{addr}/{n.prefixlen}", "Aliases": aliases}
                           for cid, addr, name, aliases in ipam.members(st, n.name)}}


@network_grp.command("inspect")
@click.argument("names", nargs=-1, required=True)
@click.pass_context
def network_inspect(ctx: click.Context, names: tuple[str, ...]) -> None:
    """Show networks as JSON."""
    out, bad = [], 0
    with ipam.open_store(_root(ctx)) as st:
        for name in names:
            n = ipam.get(st, name)
            if n is None:
                click.echo(f"lamina: network {name} not found", err=True)
                bad = 1
                continue
            out.append(_inspect(st, n))
    click.echo(json.dumps(out, indent=4))
    sys.exit(bad)


@network_grp.command("rm")
@click.argument("names", nargs=-1, required=True)
@click.pass_context
def network_rm(ctx: click.Context, names: tuple[str, ...]) -> None:
    """Remove networks (refused while a container is on them)."""
    from . import network  # noqa: PLC0415

    root, bad = _root(ctx), 0
    with ipam.open_store(root) as st, ipam.lock(root):
        for name in names:
            try:
                n = ipam.get(st, name)
                if n is not None and not n.user_defined:
                    raise ipam.NetworkError(f"{name} is a pre-defined network and cannot be removed")
                n = ipam.remove(st, name)
                network.delete_link(n.bridge)
                click.echo(name)
            except ipam.NetworkError as e:
                click.echo(f"lamina: {e}", err=True)
                bad = 1
        network.sync(root, st)
    sys.exit(bad)


@click.command("port", cls=_Cmd)
@click.argument("container")
@click.argument("private_port", required=False, metavar="[PRIVATE_PORT[/PROTO]]")
@click.pass_context
def port_cmd(ctx: click.Context, container: str, private_port: str | None) -> None:
    """List a container's published ports, or the host address of one of them."""
    c = _find(_root(ctx), container)
    rows = published(c)
    if private_port is not None:
        num, _, proto = private_port.partition("/")
        rows = [p for p in rows if str(p.container_port) == num and p.proto == (proto or "tcp")]
        if not rows:
            _fail(f"no public port '{private_port}' published for {c.name}", 1)
        for p in rows:
            click.echo(f"{p.host_ip or '0.0.0.0'}:{p.host_port}")
        return
    for p in rows:
        click.echo(f"{p.container_port}/{p.proto} -> {p.host_ip or '0.0.0.0'}:{p.host_port}")


def published(c: state.Container) -> list[ipam.Port]:
    """The ports of a running container (a stopped one has given them back)."""
    d = c.data.get("net")
    if not d or c.status() != "running":
        return []
    return [ipam.Port(**p) for p in d.get("ports", [])]


COMMANDS = [network_grp, port_cmd]
