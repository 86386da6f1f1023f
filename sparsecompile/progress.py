"""Progress on stderr: numbered stages with timings, bars for long loops.

Quiet by default in non-interactive use only for bars; stage lines always
print unless ``quiet`` so CI logs show where time goes.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterable, Iterator, TypeVar

import click

T = TypeVar("T")


class Progress:
    def __init__(self, total_stages: int = 0, quiet: bool = False, verbose: bool = False):
        self.total = total_stages
        self.index = 0
        self.quiet = quiet
        self.verbose = verbose

    def info(self, message: str) -> None:
        if not self.quiet:
            click.echo(message, err=True)

    def detail(self, message: str) -> None:
        if self.verbose and not self.quiet:
            click.echo(f"      {message}", err=True)

    def warn(self, message: str) -> None:
        click.echo(f"warning: {message}", err=True)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.index += 1
        prefix = f"[{self.index}/{self.total}]" if self.total else f"[{self.index}]"
        start = time.perf_counter()
        if not self.quiet:
            click.echo(f"{prefix} {name} ...", err=True)
        yield
        if self.verbose and not self.quiet:
            click.echo(f"      done in {time.perf_counter() - start:.1f}s", err=True)

    def bar(self, items: Iterable[T], label: str, length: int | None = None) -> Iterator[T]:
        if self.quiet or not sys.stderr.isatty():
            yield from items
            return
        with click.progressbar(items, label=f"      {label}", length=length, file=sys.stderr) as bar:
            yield from bar
