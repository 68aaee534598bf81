"""What pull and push show while they work: on a terminal one tqdm line per layer (bytes and a bar), elsewhere one
plain line per layer when it is done, nothing with --quiet. Everything goes to stderr; stdout carries the result."""
from __future__ import annotations

import sys
import threading

import click


class Bar:
    def __init__(self, ui: "UI", label: str, total: int) -> None:
        self.ui = ui
        self.label = label
        self.bar = None
        if ui.tty:
            from tqdm import tqdm
            with ui.lock:
                pos = ui.next_pos
                ui.next_pos += 1
            self.bar = tqdm(total=total, desc=label, unit="B", unit_scale=True, position=pos, leave=True,
                            file=sys.stderr)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self, status: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(f"{self.label} {status}")
            self.bar.close()
        elif not self.ui.quiet:
            click.echo(f"{self.label}: {status}", err=True)


class UI:
    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = not quiet and sys.stderr.isatty()
        self.lock = threading.Lock()
        self.next_pos = 0

    def layer_bar(self, digest: str, total: int) -> Bar:
        return Bar(self, digest.split(":")[-1][:12], total)

    def layer_done(self, digest: str, status: str) -> None:
        if not self.quiet:
            click.echo(f"{digest.split(':')[-1][:12]}: {status}", err=True)
