"""The `lamina` command: one click group that gathers the commands of every package.

Each package keeps its commands in its own `cli.py` as a `COMMANDS` list; this module only assembles them, so
the dependency direction (runtime -> unionfs -> store) holds for the CLI too.
"""
from __future__ import annotations

import importlib
import sys

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--root", envvar="LAMINA_ROOT", default=None, metavar="DIR",
              help="Store root (default /var/lib/lamina for root, $XDG_DATA_HOME/lamina otherwise).")
@click.pass_context
def cli(ctx: click.Context, root: str | None) -> None:
    """lamina: a deduplicating layer store, a union filesystem and a container runtime."""
    ctx.obj = {"root": root}


def _register() -> None:
    for mod in ("store.cli", "unionfs.cli", "runtime.commands"):
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:  # the package has no commands yet
                continue
            raise
        for cmd in getattr(m, "COMMANDS", []):
            cli.add_command(cmd)


_register()


def main() -> None:
    cli(prog_name="lamina")


if __name__ == "__main__":
    sys.exit(main())
