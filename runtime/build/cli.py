"""`lamina build` and `lamina builder prune`, collected by runtime/cli.py through COMMANDS."""
from __future__ import annotations

import os
import sys

import click


def _root(ctx: click.Context) -> str:
    from runtime.commands import _root as root  # noqa: PLC0415
    return root(ctx)


@click.command("build")
@click.option("-t", "--tag", "tags", multiple=True, metavar="NAME[:TAG]", help="Name the image (repeatable).")
@click.option("-f", "--file", "dockerfile", metavar="PATH", help="The Dockerfile (default CONTEXT/Dockerfile).")
@click.option("--build-arg", "build_args", multiple=True, metavar="K=V", help="Set a build argument.")
@click.option("--target", metavar="STAGE", help="Build up to this stage.")
@click.option("--no-cache", is_flag=True, help="Do not use the build cache.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the image id.")
@click.option("--network", type=click.Choice(["none", "host"]), default="none", show_default=True,
              help="The network RUN steps see.")
@click.argument("context", type=click.Path(file_okay=False))
@click.pass_context
def build_cmd(ctx: click.Context, tags: tuple[str, ...], dockerfile: str | None, build_args: tuple[str, ...],
              target: str | None, no_cache: bool, quiet: bool, network: str, context: str) -> None:
    """Build an image from a Dockerfile."""
    from store.errors import StoreError  # noqa: PLC0415

    from .builder import BuildError, Options, build  # noqa: PLC0415
    from .dockerfile import DockerfileError  # noqa: PLC0415

    args = {}
    for a in build_args:
        k, eq, v = a.partition("=")
        if not k:
            _fail(f"invalid --build-arg {a!r}: expected KEY=VALUE")
        args[k] = v if eq else os.environ.get(k, "")
    opts = Options(context, dockerfile, list(tags), args, target, no_cache, quiet, network)
    try:
        image_id = build(_root(ctx), opts)
    except (BuildError, DockerfileError, StoreError, ValueError) as e:
        _fail(str(e), getattr(e, "code", 1))
    except OSError as e:  # e.g. a context file that cannot be read
        _fail(f"{e.strerror or e}{': ' + str(e.filename) if e.filename else ''}", 1)
    except KeyboardInterrupt:
        _fail("build interrupted: nothing was tagged", 130)
    if quiet:
        click.echo(image_id)
    else:
        click.echo(f"Successfully built {image_id[7:19]}")
        for t in tags:
            click.echo(f"Successfully tagged {t}")
        click.echo(image_id)


def _fail(msg: str, code: int = 1) -> None:
    click.echo(f"lamina: {msg}", err=True)
    sys.exit(code)


@click.group("builder")
def builder_group() -> None:
    """Manage the build cache."""


@builder_group.command("prune")
@click.pass_context
def prune_cmd(ctx: click.Context) -> None:
    """Forget the build cache and reclaim the images and layers only it kept."""
    from store import buildcache  # noqa: PLC0415
    from store.maintenance import gc  # noqa: PLC0415
    from store.root import Store  # noqa: PLC0415

    store = Store(_root(ctx))
    try:
        n = buildcache.prune(store)
        r = gc(store)
    finally:
        store.close()
    click.echo(f"Deleted {n} build cache entries; reclaimed {r['images']} images, {r['layers']} layers, "
               f"{r['bytes']} bytes")


COMMANDS = [build_cmd, builder_group]
