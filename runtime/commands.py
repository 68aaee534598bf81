"""The runtime's `lamina` commands (run, ps, logs, stop, kill, rm, exec, diff, inspect, volume), collected by
runtime/cli.py through COMMANDS. Thin: parse, call run/lifecycle/volumes, print, exit as Docker does (125 for
lamina's own errors, the command's code otherwise).
"""
from __future__ import annotations

import json
import os
import sys
import time

import click

from . import lifecycle, state, volumes
from .spec import (RunSpec, SpecError, parse_add_host, parse_cap, parse_env, parse_env_file, parse_hostname,
                   parse_limits, parse_network_alias, parse_publish, parse_tmpfs, parse_user, parse_volume)


def _root(ctx: click.Context) -> str:
    obj = ctx.find_root().obj or {}
    if obj.get("root"):
        return os.path.abspath(obj["root"])
    try:
        from store.root import default_root  # noqa: PLC0415 - the store's default is the one default
        return default_root()
    except ImportError:
        return os.environ.get("LAMINA_ROOT") or "/var/lib/lamina"


def _fail(msg: str, code: int = 125) -> None:
    click.echo(f"lamina: {msg}", err=True)
    sys.exit(code)


class _Cmd(click.Command):
    """Usage errors: one line, exit 125, as Docker's for `run`, `exec` and friends."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as e:
            click.echo(f"lamina {ctx.info_name}: {e.format_message()} (see lamina {ctx.info_name} --help)", err=True)
            raise click.exceptions.Exit(125) from None


class _Group(click.Group):
    command_class = _Cmd


def _find(root: str, ref: str) -> state.Container:
    try:
        return state.find(root, ref)
    except state.NotFound as e:
        _fail(str(e), 1)
        raise


_RUN_CTX = {"ignore_unknown_options": False, "allow_interspersed_args": False}


@click.command("run", cls=_Cmd, context_settings=_RUN_CTX)
@click.option("--rm", is_flag=True, help="Remove the container (and its anonymous volumes) when it exits.")
@click.option("-d", "--detach", is_flag=True, help="Run in the background and print the container id.")
@click.option("-i", "--interactive", is_flag=True, help="Keep stdin open.")
@click.option("-t", "--tty", is_flag=True, help="Allocate a pseudo-terminal.")
@click.option("--name", default=None, help="Name the container.")
@click.option("-e", "--env", multiple=True, metavar="K=V", help="Set an environment variable (K alone: the caller's).")
@click.option("--env-file", multiple=True, metavar="FILE", help="Read KEY=VALUE lines (before -e applies).")
@click.option("--entrypoint", default=None, metavar="CMD", help="Replace the image's entrypoint (and its Cmd).")
@click.option("-w", "--workdir", default=None, metavar="DIR", help="Working directory (created if missing).")
@click.option("-u", "--user", default=None, metavar="UID[:GID]", help="User (or NAME[:GROUP] from the image).")
@click.option("--hostname", "-h", default=None, help="Container hostname (default: its short id).")
@click.option("--network", "--net", default="bridge", show_default=True, metavar="bridge|none|host|NAME",
              help="The default bridge, no network (lo only), the host's, or a network of `lamina network create`.")
@click.option("-p", "--publish", multiple=True, metavar="[IP:][HOST:]CONTAINER[/PROTO]",
              help="Publish a container port on the host (HOST omitted: a free port).")
@click.option("-P", "--publish-all", is_flag=True, help="Publish every port the image exposes on free host ports.")
@click.option("--network-alias", multiple=True, metavar="NAME", help="Another name on a user-defined network.")
@click.option("--add-host", multiple=True, metavar="NAME:IP", help="An entry of the container's /etc/hosts.")
@click.option("--ip", default=None, metavar="ADDRESS", help="The container's address on a user-defined network.")
@click.option("-v", "--volume", multiple=True, metavar="SRC:DST[:ro]",
              help="Bind a host path (/SRC), a named volume (NAME) or an anonymous one (DST alone).")
@click.option("--tmpfs", multiple=True, metavar="PATH[:OPTS]", help="Mount a tmpfs (nosuid,nodev,noexec, 1777).")
@click.option("--read-only", is_flag=True, help="Mount the container's root filesystem read-only.")
@click.option("-m", "--memory", default=None, metavar="SIZE", help="Memory limit, e.g. 64m.")
@click.option("--memory-swap", default=None, metavar="SIZE", help="Memory plus swap; -1 for unlimited swap.")
@click.option("--cpus", default=None, metavar="N", help="CPU quota in CPUs, e.g. 0.5.")
@click.option("--pids-limit", default=None, type=int, metavar="N", help="Process limit (0 or -1: none).")
@click.option("--device-read-bps", multiple=True, metavar="DEV:RATE", help="Read rate limit, e.g. /dev/sda:1mb.")
@click.option("--device-write-bps", multiple=True, metavar="DEV:RATE", help="Write rate limit, e.g. /dev/sda:1mb.")
@click.option("--userns", is_flag=True, help="Map container root to an unprivileged host uid range.")
@click.option("--cap-add", multiple=True, metavar="CAP", help="Add a capability (NAME or CAP_NAME, or ALL).")
@click.option("--cap-drop", multiple=True, metavar="CAP", help="Drop a capability (NAME or CAP_NAME, or ALL).")
@click.option("--driver", type=click.Choice(["fuse", "kernel", "auto"]), default="fuse", show_default=True,
              help="Root filesystem of a store image: lamina's union filesystem, kernel overlayfs, or kernel where "
                   "supported.")
@click.argument("image")
@click.argument("cmd", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def run_cmd(ctx: click.Context, rm: bool, detach: bool, interactive: bool, tty: bool, name: str | None,
            env: tuple[str, ...], env_file: tuple[str, ...], entrypoint: str | None, workdir: str | None,
            user: str | None, hostname: str | None, network: str,
            publish: tuple[str, ...], publish_all: bool, network_alias: tuple[str, ...], add_host: tuple[str, ...],
            ip: str | None,
            volume: tuple[str, ...], tmpfs: tuple[str, ...], read_only: bool, memory: str | None,
            memory_swap: str | None, cpus: str | None,
            pids_limit: int | None, device_read_bps: tuple[str, ...], device_write_bps: tuple[str, ...],
            userns: bool, cap_add: tuple[str, ...], cap_drop: tuple[str, ...], driver: str, image: str,
            cmd: tuple[str, ...]) -> None:
    """Run a command in a new container."""
    root = _root(ctx)
    try:
        spec = RunSpec(
            image=image, cmd=list(cmd), name=name,
            env=[e for f in env_file for e in parse_env_file(f)] + parse_env(env),
            workdir=workdir, entrypoint=entrypoint, cap_add=[parse_cap(x) for x in cap_add],
            cap_drop=[parse_cap(x) for x in cap_drop], tmpfs=[parse_tmpfs(t) for t in tmpfs],
            user=parse_user(user) if user is not None else None,
            hostname=parse_hostname(hostname) if hostname is not None else None, network=network,
            mounts=[parse_volume(v) for v in volume], read_only=read_only,
            limits=parse_limits(memory, memory_swap, cpus, pids_limit, device_read_bps, device_write_bps),
            userns=userns, rm=rm, detach=detach, interactive=interactive, tty=tty,
            publish=[parse_publish(p) for p in publish], publish_all=publish_all,
            network_aliases=[parse_network_alias(a) for a in network_alias],
            add_hosts=[parse_add_host(h) for h in add_host], ip=ip, driver=driver)
        if network in ("none", "host") and (publish or publish_all or network_alias or ip):
            raise SpecError(f"conflicting options: port publishing, --ip and --network-alias need a bridge network, "
                            f"not --network {network}")
    except SpecError as e:
        _fail(str(e))
        return
    if workdir is not None and not workdir.startswith("/"):
        _fail(f"invalid working directory {workdir!r}: it must be absolute")
    targets = [m.target for m in spec.mounts] + [t[0] for t in spec.tmpfs]
    dup = {t for t in targets if targets.count(t) > 1}
    if dup:
        _fail(f"duplicate mount point: {sorted(dup)[0]}")
    sys.stdout.flush()
    # Descriptors inherited from our caller reach neither the container nor the union filesystem's daemon.
    from .linux import close_fds_from  # noqa: PLC0415
    close_fds_from(3)
    # The root filesystem's daemon is forked first: it loads mfusepy and the union core while this process loads
    # the runtime (kept out of the imports above for this reason) and prepares the container.
    from .rootfs import standby  # noqa: PLC0415
    daemon = standby(spec.image) if driver == "fuse" else None
    try:
        from .run import run  # noqa: PLC0415
        code = run(root, spec, daemon)
    finally:
        if daemon is not None:
            daemon.cancel()  # unless it was given its mount
    # Everything is released by now: skip the interpreter's teardown (~10 ms of freeing modules).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@click.command("ps", cls=_Cmd)
@click.option("-a", "--all", "all_", is_flag=True, help="Show all containers (default shows just running).")
@click.option("-q", "--quiet", is_flag=True, help="Only display container ids.")
@click.pass_context
def ps_cmd(ctx: click.Context, all_: bool, quiet: bool) -> None:
    """List containers."""
    rows = lifecycle.ps_rows(_root(ctx), all_)
    if quiet:
        for r in rows[1:]:
            click.echo(r[0])
        return
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("   ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())


@click.command("logs", cls=_Cmd)
@click.option("-f", "--follow", is_flag=True)
@click.argument("container")
@click.pass_context
def logs_cmd(ctx: click.Context, follow: bool, container: str) -> None:
    """Show a container's output (stdout and stderr)."""
    c = _find(_root(ctx), container)
    out = sys.stdout.buffer
    try:
        f = open(c.log, "rb")
    except FileNotFoundError:
        return
    with f:
        while True:
            data = f.read(65536)
            if data:
                out.write(data)
                out.flush()
                continue
            if not follow or c.status() != "running":
                break
            time.sleep(0.1)


@click.command("stop", cls=_Cmd)
@click.option("-t", "--time", "timeout", default=10, type=int, show_default=True,
              help="Seconds to wait after SIGTERM before SIGKILL.")
@click.argument("containers", nargs=-1, required=True)
@click.pass_context
def stop_cmd(ctx: click.Context, timeout: int, containers: tuple[str, ...]) -> None:
    """Stop running containers: SIGTERM, then SIGKILL after the timeout."""
    root, bad = _root(ctx), 0
    for ref in containers:
        try:
            lifecycle.stop(root, state.find(root, ref), timeout)
            click.echo(ref)
        except (state.NotFound, lifecycle.LifecycleError) as e:
            click.echo(f"lamina: {e}", err=True)
            bad = 1
    sys.exit(bad)


@click.command("kill", cls=_Cmd)
@click.option("-s", "--signal", "sig", default="KILL", show_default=True)
@click.argument("containers", nargs=-1, required=True)
@click.pass_context
def kill_cmd(ctx: click.Context, sig: str, containers: tuple[str, ...]) -> None:
    """Send a signal to running containers."""
    root, bad = _root(ctx), 0
    try:
        n = lifecycle.parse_signal(sig)
    except lifecycle.LifecycleError as e:
        _fail(str(e), 1)
        return
    for ref in containers:
        try:
            lifecycle.kill(state.find(root, ref), n)
            click.echo(ref)
        except (state.NotFound, lifecycle.LifecycleError, ProcessLookupError) as e:
            click.echo(f"lamina: {e}", err=True)
            bad = 1
    sys.exit(bad)


@click.command("rm", cls=_Cmd)
@click.option("-f", "--force", is_flag=True, help="Kill a running container first.")
@click.argument("containers", nargs=-1, required=True)
@click.pass_context
def rm_cmd(ctx: click.Context, force: bool, containers: tuple[str, ...]) -> None:
    """Remove containers and their container layers."""
    root, bad = _root(ctx), 0
    for ref in containers:
        try:
            lifecycle.remove(root, state.find(root, ref), force)
            click.echo(ref)
        except (state.NotFound, lifecycle.LifecycleError) as e:
            click.echo(f"lamina: {e}", err=True)
            bad = 1
        except OSError as e:  # e.g. a mount left on its tree: refused, and said in one line
            click.echo(f"lamina: removing container {ref}: {e.strerror or e}"
                       f"{': ' + str(e.filename) if e.filename else ''}", err=True)
            bad = 1
    sys.exit(bad)


@click.command("exec", cls=_Cmd, context_settings=_RUN_CTX)
@click.option("-i", "--interactive", is_flag=True)
@click.option("-t", "--tty", is_flag=True, help="Allocate a pseudo-terminal (from the container's devpts).")
@click.option("-e", "--env", multiple=True, metavar="K=V")
@click.option("-w", "--workdir", default=None)
@click.option("-u", "--user", default=None)
@click.argument("container")
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def exec_cmd(ctx: click.Context, interactive: bool, tty: bool, env: tuple[str, ...], workdir: str | None,
             user: str | None, container: str, cmd: tuple[str, ...]) -> None:
    """Run a command in a running container."""
    from . import cgroups  # noqa: PLC0415
    from .launch import Process, StartError, join  # noqa: PLC0415
    from .linux import DEFAULT_CAPS  # noqa: PLC0415
    from .run import _merge_env
    from .users import resolve_user  # noqa: PLC0415

    root = _root(ctx)
    c = _find(root, container)
    if c.status() != "running":
        _fail(f"container {c.id[:12]} is not running", 1)
    d = c.data
    try:
        extra = parse_env(env)
        if user is not None:
            uid, gid, groups, _ = resolve_user(f"/proc/{d['pid']}/root", parse_user(user))
        else:
            uid, gid, groups = d.get("uid", 0), d.get("gid", 0), d.get("groups", [])
    except SpecError as e:
        _fail(str(e))
        return
    p = Process(argv=list(cmd), env=_merge_env(d.get("env", []), extra + (["TERM=xterm"] if tty else [])),
                cwd=workdir or d.get("cwd", "/"), uid=uid, gid=gid, groups=groups, tty=tty,
                caps=frozenset(d["caps"]) if "caps" in d else DEFAULT_CAPS)
    cg = cgroups.from_json(d["cgroup"])
    stdin = 0 if interactive else os.open(os.devnull, os.O_RDONLY)
    try:
        mem = getattr(cg, "dirs", {}).get("memory")
        from .relay import winsize  # noqa: PLC0415
        code = join(d["pid"], p, cg.add, (stdin, 1, 2), str(mem.parent / "cgroup.procs") if mem else None,
                    winsize() if tty else None)
    except StartError as e:
        _fail(str(e), e.code)
        return
    sys.exit(code)


@click.command("wait", cls=_Cmd)
@click.argument("containers", nargs=-1, required=True)
@click.pass_context
def wait_cmd(ctx: click.Context, containers: tuple[str, ...]) -> None:
    """Block until containers stop, then print their exit codes."""
    root, bad = _root(ctx), 0
    for ref in containers:
        try:
            c = state.find(root, ref)
        except state.NotFound as e:
            click.echo(f"lamina: {e}", err=True)
            bad = 1
            continue
        if c.status() in ("running", "dead"):
            lifecycle.wait_exit(root, c, float("inf"))  # then the supervisor's record, or ours if it is gone
        try:
            c.reload()
        except (OSError, ValueError):
            pass  # removed (--rm): the last record read is the answer
        click.echo(c.data.get("exit_code", 0) if c.data.get("status") != "created" else 0)
    sys.exit(bad)


@click.command("diff", cls=_Cmd)
@click.argument("container")
@click.pass_context
def diff_cmd(ctx: click.Context, container: str) -> None:
    """List the paths the container added (A), changed (C) or deleted (D)."""
    try:
        rows = lifecycle.diff(_find(_root(ctx), container))
    except (lifecycle.LifecycleError, OSError) as e:
        _fail(str(e), 1)
        return
    for kind, path in rows:
        click.echo(f"{kind} {path}")


@click.command("commit", cls=_Cmd)
@click.argument("container")
@click.argument("name", required=False)
@click.pass_context
def commit_cmd(ctx: click.Context, container: str, name: str | None) -> None:
    """Create an image from a container's changes (the container is paused meanwhile; volumes are excluded)."""
    from .commit import CommitError, commit  # noqa: PLC0415

    root = _root(ctx)
    c = _find(root, container)
    try:
        image_id = commit(root, c, name)
    except (CommitError, OSError) as e:
        _fail(str(e), 1)
        return
    except Exception as e:  # noqa: BLE001 - the store's own errors carry a one-line message
        _fail(str(e), 1)
        return
    click.echo(image_id)


@click.command("inspect", cls=_Cmd)
@click.argument("containers", nargs=-1, required=True)
@click.pass_context
def inspect_cmd(ctx: click.Context, containers: tuple[str, ...]) -> None:
    """Show containers' or images' low-level information as JSON, as `docker inspect` does."""
    root = _root(ctx)
    out, bad = [], 0
    for ref in containers:
        try:
            out.append(lifecycle.inspect(state.find(root, ref)))
        except state.NotFound:
            # As `docker inspect`: a name that is no container may be an image.
            from store.errors import NotFound, StoreError  # noqa: PLC0415 - only here: `lamina run` never loads it
            from store.images import inspect as image_inspect  # noqa: PLC0415
            from store.root import Store  # noqa: PLC0415
            try:
                out.append(image_inspect(Store(root), ref))
            except NotFound:
                click.echo(f"lamina: no such object: {ref}", err=True)
                bad = 1
            except StoreError as e:  # a store that cannot be opened (lost or damaged index) is no missing image
                _fail(str(e), 1)
    click.echo(json.dumps(out, indent=4))
    sys.exit(bad)


@click.group("volume", cls=_Group)
def volume_grp() -> None:
    """Manage named volumes."""


@volume_grp.command("create")
@click.argument("name", required=False)
@click.pass_context
def volume_create(ctx: click.Context, name: str | None) -> None:
    """Create a volume (a random name if none is given)."""
    try:
        v = volumes.create(_root(ctx), name)
    except volumes.VolumeError as e:
        _fail(str(e), 1)
        return
    click.echo(v.name)


@volume_grp.command("ls")
@click.option("-q", "--quiet", is_flag=True)
@click.pass_context
def volume_ls(ctx: click.Context, quiet: bool) -> None:
    """List volumes."""
    vs = volumes.list_volumes(_root(ctx))
    if not quiet:
        click.echo(f"{'DRIVER':<10}VOLUME NAME")
    for v in vs:
        click.echo(v.name if quiet else f"{'local':<10}{v.name}")


@volume_grp.command("inspect")
@click.argument("names", nargs=-1, required=True)
@click.pass_context
def volume_inspect(ctx: click.Context, names: tuple[str, ...]) -> None:
    """Show volumes as JSON."""
    root = _root(ctx)
    out, bad = [], 0
    for n in names:
        try:
            out.append(volumes.get(root, n).inspect())
        except volumes.VolumeError as e:
            click.echo(f"lamina: {e}", err=True)
            bad = 1
    click.echo(json.dumps(out, indent=4))
    sys.exit(bad)


@volume_grp.command("rm")
@click.option("-f", "--force", is_flag=True)
@click.argument("names", nargs=-1, required=True)
@click.pass_context
def volume_rm(ctx: click.Context, force: bool, names: tuple[str, ...]) -> None:
    """Remove volumes (refused while a container uses them)."""
    root, bad = _root(ctx), 0
    for n in names:
        try:
            volumes.remove(root, n, force)
            click.echo(n)
        except volumes.VolumeError as e:
            click.echo(f"lamina: {e}", err=True)
            bad = 1
    sys.exit(bad)


COMMANDS = [run_cmd, ps_cmd, logs_cmd, stop_cmd, kill_cmd, rm_cmd, exec_cmd, wait_cmd, diff_cmd, commit_cmd,
            inspect_cmd, volume_grp]
