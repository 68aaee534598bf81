"""The `lamina` command: one click group that gathers the commands of every package.

Each package keeps its commands in its own `cli.py` as a `COMMANDS` list; this module only assembles them, so
the dependency direction (runtime -> unionfs -> store) holds for the CLI too.

`lamina [--root DIR] mount ...` in the background is told apart before click loads: the union filesystem's daemon is
forked first, from this still small process, and loads its code (mfusepy, the union core, the store reader) while
this process loads click and only the commands of `unionfs.cli`, checks the arguments and finds the image exactly as
for any other command (same errors, same exit codes), then hands it the mount. The daemon carries none of click,
nor of the other commands' modules.
"""
from __future__ import annotations

import importlib
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~5 ms) before a daemon is forked
if TYPE_CHECKING:
    import click

PACKAGES = ("store.cli", "unionfs.cli", "registry.cli", "runtime.commands", "runtime.netcommands",
            "runtime.build.cli")


def group(packages: tuple[str, ...] = PACKAGES) -> click.Group:
    """The `lamina` group with the commands of `packages`."""
    import click  # noqa: PLC0415 - after the fork of a mount's daemon (module docstring)

    @click.group(context_settings={"help_option_names": ["-h", "--help"]})
    @click.option("--root", envvar="LAMINA_ROOT", default=None, metavar="DIR",
                  help="Store root (default /var/lib/lamina for root, $XDG_DATA_HOME/lamina otherwise).")
    @click.pass_context
    def cli(ctx: click.Context, root: str | None) -> None:
        """lamina: a deduplicating layer store, a union filesystem and a container runtime."""
        ctx.ensure_object(dict)["root"] = root

    for mod in packages:
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:  # the package has no commands yet
                continue
            raise
        for cmd in getattr(m, "COMMANDS", []):
            cli.add_command(cmd)
    return cli


def _mount_args(argv: list[str]) -> list[str] | None:
    """The arguments after `mount` when `argv` is `[--root DIR] mount ...`, else None."""
    i = 0
    while i < len(argv) and argv[i] != "mount":
        if argv[i] == "--root":
            i += 2
        elif argv[i].startswith("--root="):
            i += 1
        else:
            return None
    return argv[i + 1:] if i < len(argv) else None


def background_mount(argv: list[str]) -> bool:
    """Whether `argv` is `[--root DIR] mount ...` without -f/--foreground, --driver kernel or help. Only a hint: a
    wrong guess forks a daemon that is then cancelled, never a different outcome."""
    rest = _mount_args(argv)
    if rest is None:
        return False
    kernel = any(a == "--driver=kernel" or (a == "--driver" and rest[j + 1:j + 2] == ["kernel"])
                 for j, a in enumerate(rest))  # kernel overlayfs: no daemon
    return not kernel and not any(a in ("-f", "--foreground", "-h", "--help") for a in rest)


def _die_of_sigpipe() -> None:
    """The reader of our output went away (`lamina images | head -1`): end as docker and coreutils do, killed by
    SIGPIPE, silently (not `lamina: Broken pipe`, exit 1)."""
    import os  # noqa: PLC0415
    import signal  # noqa: PLC0415

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # nothing left to flush into the closed pipe at exit
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGPIPE)


def _index_path(argv: list[str]) -> str:
    import os  # noqa: PLC0415

    from store.root import default_root  # noqa: PLC0415
    root = None
    for i, a in enumerate(argv):
        if a == "--root" and i + 1 < len(argv):
            root = argv[i + 1]
        elif a.startswith("--root="):
            root = a[len("--root="):]
        if root is not None or not a.startswith("-"):
            break
    return os.path.abspath(os.path.join(root or default_root(), "index.db"))


def main() -> None:
    stdout = sys.stdout
    try:
        _main()
    except BrokenPipeError:
        _die_of_sigpipe()
    except Exception as e:
        sqlite3 = sys.modules.get("sqlite3")
        if sqlite3 is None or not isinstance(e, sqlite3.Error):
            raise
        # The store's index failed under a command that does not expect it (damaged, read-only, full): one line.
        from store.root import index_error  # noqa: PLC0415
        sys.stderr.write(f"lamina: {index_error(_index_path(sys.argv[1:]), e)}\n")
        sys.exit(1)
    except SystemExit:
        if sys.stdout is not stdout:  # click's own answer to EPIPE: stdout wrapped to silence its flush, exit 1
            _die_of_sigpipe()
        raise


def _main() -> None:
    standby = None
    if background_mount(sys.argv[1:]):
        from unionfs.storemount import standby_store_mount  # noqa: PLC0415

        standby = standby_store_mount()
    try:
        if standby is None:
            # a mount (kernel driver, -f) needs no other command's modules (the registry's httpx: ~50 ms)
            group(("unionfs.cli",) if _mount_args(sys.argv[1:]) is not None else PACKAGES)(prog_name="lamina")
        else:
            group(("unionfs.cli",))(prog_name="lamina", obj={"standby": standby})
    finally:
        if standby is not None:
            standby.cancel()  # unless `lamina mount` gave it its mount


if __name__ == "__main__":
    sys.exit(main())
