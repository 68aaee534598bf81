"""`lamina` commands for the store: import, save, images, tag, rmi, history, inspect, df, gc, fsck."""
from __future__ import annotations

import datetime as dt
import errno
import functools
import json
import os
import shlex
import sqlite3
import sys
from typing import Callable

import click

from .errors import StoreError
from .root import Store, default_root, index_error


def fail(msg: str, code: int = 1) -> None:
    click.echo(f"lamina: {msg}", err=True)
    sys.exit(code)


def store_command(fn: Callable) -> Callable:
    """Opens the store named by --root/LAMINA_ROOT and turns StoreError/OSError into a one-line error."""

    @functools.wraps(fn)
    @click.pass_context
    def wrapper(ctx: click.Context, *args, **kwargs):
        root = (ctx.obj or {}).get("root")
        try:
            store = Store(root)
            return fn(store, *args, **kwargs)
        except StoreError as e:
            fail(str(e))
        except sqlite3.Error as e:
            fail(str(index_error(os.path.abspath(os.path.join(root or default_root(), "index.db")), e)))
        except BrokenPipeError:
            raise  # the reader went away (`lamina images | head -1`): runtime/cli.py ends quietly
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):  # an import names its store itself; this is `save`'s file
                fail(f"no space left on {e.filename or 'device'}")
            fail(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")
    return wrapper


def human(n: int) -> str:
    """docker's SI sizes: 1.23MB."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.3g}{unit}" if unit != "B" else f"{n}B"
        n /= 1000  # type: ignore[assignment]
    return f"{n}B"


def ago(iso: str, now: dt.datetime | None = None) -> str:
    """docker's CREATED column: go-units' HumanDuration of (now - created) + ' ago'. Like docker, a time in the
    future (a clock behind the image's) reads 'Less than a second ago'."""
    try:
        t = dt.datetime.fromisoformat(iso.replace("Z", "+00:00"))
        if t.tzinfo is None:
            t = t.replace(tzinfo=dt.timezone.utc)
    except ValueError:
        return iso or "N/A"
    d = ((now or dt.datetime.now(dt.timezone.utc)) - t).total_seconds()
    return human_duration(d) + " ago"


def human_duration(d: float) -> str:
    """go-units' HumanDuration (docker/go-units duration.go), for d seconds."""
    seconds, minutes, hours = int(d), int(d / 60), int(d / 3600 + 0.5)
    if seconds < 1:
        return "Less than a second"
    if seconds == 1:
        return "1 second"
    if seconds < 60:
        return f"{seconds} seconds"
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{int(d / 3600) // 24 // 365} years"


def table(rows: list[list[str]], headers: list[str]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    for r in [headers, *rows]:
        click.echo("   ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip())


def progress_bar(total: int | None, desc: str):
    """A tqdm bar on a terminal, nothing otherwise (import and save stay quiet in scripts and CI)."""
    if not sys.stderr.isatty():
        return None, lambda: None
    from tqdm import tqdm
    bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, leave=False)
    return bar.update, bar.close


_CHANGE_KEYS = {"CMD": "Cmd", "ENTRYPOINT": "Entrypoint", "ENV": "Env", "WORKDIR": "WorkingDir",
                "USER": "User", "LABEL": "Labels", "EXPOSE": "ExposedPorts", "STOPSIGNAL": "StopSignal"}


def parse_changes(changes: tuple[str, ...]) -> dict:
    """docker import's --change, for the instructions that set config fields."""
    cfg: dict = {}
    for c in changes:
        word, _, rest = c.strip().partition(" ")
        key = _CHANGE_KEYS.get(word.upper())
        if key is None or not rest.strip():
            raise StoreError(f"unsupported --change {c!r} (one of {', '.join(_CHANGE_KEYS)} with a value)")
        rest = rest.strip()
        if key in ("Cmd", "Entrypoint"):
            if rest.startswith("["):
                try:
                    v = json.loads(rest)
                except ValueError:
                    raise StoreError(f"--change {c!r}: bad JSON array") from None
            else:
                v = ["/bin/sh", "-c", rest]
            cfg[key] = v
        elif key == "Env":
            k, _, v = rest.partition("=") if "=" in rest else rest.partition(" ")
            env = [e for e in cfg.get("Env", ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"])
                   if not e.startswith(k + "=")]
            cfg["Env"] = env + [f"{k}={v}"]
        elif key == "Labels":
            for item in shlex.split(rest):
                k, _, v = item.partition("=")
                cfg.setdefault("Labels", {})[k] = v
        elif key == "ExposedPorts":
            for p in rest.split():
                cfg.setdefault("ExposedPorts", {})[p if "/" in p else p + "/tcp"] = {}
        else:
            cfg[key] = rest
    return cfg


@click.command("import")
@click.argument("source")
@click.option("-t", "--tag", help="Name the image NAME[:TAG].")
@click.option("-c", "--change", "changes", multiple=True,
              help="Set a config field for a directory or tar source (CMD, ENTRYPOINT, ENV, WORKDIR, USER, LABEL).")
@store_command
def import_cmd(store: Store, source: str, tag: str | None, changes: tuple[str, ...]) -> None:
    """Import SOURCE: a directory, a tar (plain, gzip, zstd), an OCI layout (dir or tar) or a docker save archive."""
    from .importer import import_source
    update, close = progress_bar(None, "import")
    try:
        ids = import_source(store, source, tag, parse_changes(changes), progress=update if update else None)
    finally:
        close()
    for i in ids:
        click.echo(i)


@click.command("load")
@click.option("-i", "--input", "source", required=True, help="Image archive (OCI layout or docker save).")
@click.option("-q", "--quiet", is_flag=True)
@store_command
def load_cmd(store: Store, source: str, quiet: bool) -> None:
    """Load images from an archive, as `docker load -i` does (`import` takes every other kind of source too)."""
    from .importer import import_images
    update, close = progress_bar(None, "load")
    try:
        loaded = import_images(store, source, progress=update if update and not quiet else None, archive_only=True)
    finally:
        close()
    for image_id, tags in loaded:  # the archive's own tags, not every name the store has for the image
        for t in tags or [image_id]:
            click.echo(f"Loaded image: {t}" if tags else f"Loaded image ID: {image_id}")


@click.command("save")
@click.argument("images", nargs=-1, required=True)
@click.option("-o", "--output", required=True, help="Archive to write.")
@click.option("--format", "fmt", type=click.Choice(["oci", "docker"]), default="oci", show_default=True)
@store_command
def save_cmd(store: Store, images: tuple[str, ...], output: str, fmt: str) -> None:
    """Write IMAGES to an OCI layout archive or a docker save archive."""
    from .export import save
    from .reader import load_image, resolve_name
    imgs = []
    for ref in images:
        # As docker save: an image named by tag carries that tag alone; one named by id carries none.
        image_id, tag = resolve_name(store, ref)
        img = load_image(store, image_id)
        img.tags = [tag] if tag else []
        imgs.append(img)
    update, close = progress_bar(None, "save")
    try:
        save(store, imgs, output, fmt, progress=update)
    finally:
        close()


@click.command("images")
@click.option("-q", "--quiet", is_flag=True, help="Only image ids.")
@click.option("--no-trunc", is_flag=True)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@store_command
def images_cmd(store: Store, quiet: bool, no_trunc: bool, fmt: str) -> None:
    """List images."""
    from .images import list_images
    rows = list_images(store)
    if fmt == "json":
        click.echo(json.dumps([r.__dict__ for r in rows], indent=2))
        return
    short = (lambda i: i) if no_trunc else (lambda i: i[7:19])
    if quiet:
        for i in dict.fromkeys(short(r.id) for r in rows):
            click.echo(i)
        return
    table([[r.repository, r.tag, short(r.id), ago(r.created), human(r.size)] for r in rows],
          ["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"])


@click.command("tag")
@click.argument("source")
@click.argument("target")
@store_command
def tag_cmd(store: Store, source: str, target: str) -> None:
    """Give the image SOURCE the name TARGET."""
    from .images import tag
    tag(store, source, target)


@click.command("rmi")
@click.argument("images", nargs=-1, required=True)
@click.option("-f", "--force", is_flag=True)
@store_command
def rmi_cmd(store: Store, images: tuple[str, ...], force: bool) -> None:
    """Remove images (their storage is reclaimed by `lamina gc`)."""
    from .images import rmi
    for ref in images:
        for line in rmi(store, ref, force):
            click.echo(line)


@click.command("history")
@click.argument("image")
@click.option("--no-trunc", is_flag=True)
@click.option("-H", "--human", "human_", type=bool, default=True, show_default=True)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@store_command
def history_cmd(store: Store, image: str, no_trunc: bool, human_: bool, fmt: str) -> None:
    """Show an image's history: one row per instruction, with the size of the layer it added."""
    from .images import history
    rows = history(store, image)
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    out = []
    for r in rows:
        ident = r["id"] if no_trunc or r["id"] == "<missing>" else r["id"][7:19]
        by = r["created_by"] if no_trunc or len(r["created_by"]) <= 45 else r["created_by"][:44] + "…"
        out.append([ident, ago(r["created"]) if human_ else r["created"], by,
                    human(r["size"]) if human_ else str(r["size"]), r["comment"]])
    table(out, ["IMAGE", "CREATED", "CREATED BY", "SIZE", "COMMENT"])


@click.command("df")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@store_command
def df_cmd(store: Store, fmt: str) -> None:
    """Show what the store holds and what deduplication saves."""
    from .maintenance import df
    d = df(store)
    if fmt == "json":
        click.echo(json.dumps(d, indent=2))
        return
    ratio = f"{d['dedup_ratio']:.2f}x" if d["dedup_ratio"] else "-"
    click.echo(f"Images: {d['images']}   Layers: {d['layers']}   Objects: {d['objects']}")
    click.echo(f"Sum of image layer tars (no sharing):      {human(d['images_bytes'])}")
    click.echo(f"Distinct layer tars (layer sharing):       {human(d['layers_bytes'])}")
    click.echo(f"Distinct contents (lamina):                {human(d['content_bytes'])}")
    click.echo(f"On disk (objects + index, allocated):      {human(d['disk_bytes'])}")
    if d["derived_bytes"]:
        click.echo(f"  of which derived per-layer data:         {human(d['derived_bytes'])}")
    click.echo(f"Dedup ratio (layer tars / contents):       {ratio}")
    rows = []
    for image_id, v in sorted(d["per_image"].items(), key=lambda kv: kv[1]["tags"]):
        rows.append([",".join(v["tags"]) or "<none>", image_id[7:19], human(v["size_bytes"]),
                     human(v["shared_bytes"]), human(v["unique_bytes"])])
    if rows:
        click.echo()
        table(rows, ["IMAGE", "ID", "SIZE", "SHARED SIZE", "UNIQUE SIZE"])


@click.command("gc")
@store_command
def gc_cmd(store: Store) -> None:
    """Remove untagged unused images, and layers and contents that no image references."""
    from .maintenance import gc
    r = gc(store)
    click.echo(f"Removed {r['images']} untagged images, {r['layers']} layers and {r['objects']} objects, "
               f"{human(r['bytes'])} reclaimed")


@click.command("fsck")
@click.option("--repair", is_flag=True, help="Fix what can be fixed (drops damaged images: re-import them).")
@click.option("--quick", is_flag=True, help="Skip rebuilding each layer to its DiffID.")
@store_command
def fsck_cmd(store: Store, repair: bool, quick: bool) -> None:
    """Re-hash every object and check every reference; exit 1 if anything is wrong."""
    from .maintenance import fsck
    rep = fsck(store, repair=repair, verify_layers=not quick)
    for p in rep.problems:
        click.echo(f"problem: {p}")
    for r in rep.repaired:
        click.echo(f"repaired: {r}")
    click.echo(f"checked {rep.objects} objects, {rep.layers} layers, {rep.images} images: "
               f"{len(rep.problems)} problems" + (f", {len(rep.repaired)} repairs" if repair else ""))
    if rep.problems and not repair:
        sys.exit(1)


@click.command("dedup")
@click.argument("images", nargs=-1)
@click.option("--all", "all_images", is_flag=True, help="Every image in the store.")
@click.option("--strategy", "strategies", multiple=True, metavar="NAME",
              help="layer, file, fixed-4k, fixed-64k, cdc-16k, cdc-64k (repeatable; default all).")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table")
@click.option("--db", "db_path", metavar="FILE", help="Append the results to this SQLite database.")
@click.option("--chart", metavar="FILE.png", help="Draw stored bytes and shared-bytes heatmaps (needs matplotlib).")
@click.option("--compress/--no-compress", default=True, show_default=True,
              help="Also measure zstd (and gzip for layer tars) sizes: the slow part.")
@store_command
def dedup_cmd(store: Store, images: tuple[str, ...], all_images: bool, strategies: tuple[str, ...], fmt: str,
              db_path: str | None, chart: str | None, compress: bool) -> None:
    """What layer, file, fixed-block and content-defined-chunk dedup would store for IMAGES.

    IMAGES are names or ids in the store, or archives / OCI layouts given as paths, which are imported into a
    temporary store of their own (the store is left untouched) and analysed there.
    """
    import os
    import tempfile
    from .dedup import STRATEGIES
    if all_images == bool(images):
        fail("name images, or give --all (not both)", 2)
    paths = [i for i in images if os.path.exists(i)]
    tmp = None
    if paths:
        if len(paths) != len(images):
            fail("give images in the store or paths to archives, not both", 2)
        from .importer import import_source
        tmp = tempfile.TemporaryDirectory(prefix="lamina-dedup-")
    try:
        if tmp is not None:
            store = Store(tmp.name)
            images = tuple(i for p in paths for i in import_source(store, p))
        _dedup(store, images, all_images, strategies or STRATEGIES, fmt, db_path, chart, compress)
    finally:
        if tmp is not None:
            store.close()
            tmp.cleanup()


def _dedup(store: Store, images: tuple[str, ...], all_images: bool, strategies: tuple[str, ...], fmt: str,
           db_path: str | None, chart: str | None, compress: bool) -> None:
    from . import dedup_report as rep
    from .dedup import analyse, select_images
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(desc="dedup", unit="B", unit_scale=True, leave=False)
    try:
        imgs = select_images(store, list(images), all_images)
        a = analyse(store, imgs, strategies, compress, progress=bar.update if bar else None,
                    total=(lambda n: (setattr(bar, "total", n), bar.refresh())) if bar else None)
    finally:
        if bar:
            bar.close()
    if db_path:
        rep.write_db(a, store, db_path)
    if chart:
        rep.chart(a, chart)
    if fmt == "json":
        click.echo(json.dumps(rep.to_json(a), indent=2))
    elif fmt == "csv":
        click.echo(rep.to_csv(a), nl=False)
    else:
        click.echo(rep.to_table(a))


COMMANDS = [import_cmd, load_cmd, save_cmd, images_cmd, tag_cmd, rmi_cmd, history_cmd, df_cmd, gc_cmd, fsck_cmd,
            dedup_cmd]
