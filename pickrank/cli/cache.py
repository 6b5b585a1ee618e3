"""`pickrank cache info|clear|prune`: look at and manage the embedding cache."""

from __future__ import annotations

import sys
from typing import Annotated, Callable, Optional

import typer

from pickrank.cli.lifecycle import Command
from pickrank.cli.shared import CACHE, Opt, Opts, with_options
from pickrank.errors import UsageError
from pickrank.options import CacheOptions, CommandOptions

_CACHE_OPTIONS = ((CacheOptions, "cache"), (CommandOptions, "debug"))


def _cache_command(opts: Opts, action: Callable, check: Callable[[], None] = lambda: None) -> None:
    """Run check(), then action(cache) on the cache, inside the command lifecycle."""
    with Command(opts.command):
        check()  # before the cache is opened (which would make the file)
        from pickrank.core.cache import managed_cache

        with managed_cache(opts.cache.cache) as c:
            action(c)


@with_options(*_CACHE_OPTIONS)
def cache_info(*, opts: Opts) -> None:
    """Show the cache's path, entries, size and models.

    Examples:
      $ pickrank cache info
      $ pickrank cache info --cache /data/pickrank-cache.sqlite3
    """
    def show(c) -> None:
        info = c.info()
        typer.echo(f"path:    {info.path}\nentries: {info.entries}\nsize:    {info.size_bytes / 1e6:.1f} MB")
        if info.read_only:
            typer.echo("access:  read-only (runs use its entries but save no new ones; clear/prune cannot delete)")
        for model, n in info.models.items():
            typer.echo(f"model:   {model}  ({n} entries)")

    _cache_command(opts, show)


def confirm_clear_all(yes: bool, path: str | None) -> None:
    """Deleting every entry asks first on a terminal (--yes skips it); scripts (no terminal) are not asked."""
    if yes or not sys.stdin.isatty():
        return
    from pickrank.core.cache import default_cache_path

    if not typer.confirm(f"Delete every cached embedding in {path or default_cache_path()}?", default=False,
                         err=True):
        typer.echo("pickrank: nothing deleted", err=True)
        raise typer.Exit(1)


@with_options(*_CACHE_OPTIONS)
def cache_clear(
    model: Annotated[Optional[str], Opt(metavar="TEXT", panel=CACHE, help="Only entries of models whose "
                                        "fingerprint contains TEXT.")] = None,
    yes: Annotated[bool, Opt("--yes", "-y", panel=CACHE, help="Do not ask before deleting every entry.")] = False,
    *, opts: Opts,
) -> None:
    """Delete cached embeddings (all, or one model's); clearing all asks first on a terminal.

    Examples:
      $ pickrank cache clear --model PickScore_v1
      $ pickrank cache clear --yes
    """
    def check() -> None:
        if model is not None and not model.strip():  # an empty pattern would match every fingerprint
            raise UsageError("--model must not be empty: leave it out to clear every entry")
        if model is None:
            confirm_clear_all(yes, opts.cache.cache)

    _cache_command(opts, lambda c: typer.echo(f"deleted {c.clear(model)} entries"), check)


@with_options(*_CACHE_OPTIONS)
def cache_prune(
    older_than: Annotated[float, Opt("--older-than", min=0, metavar="DAYS", panel=CACHE,
                                     help="Delete entries older than DAYS.")],
    *, opts: Opts,
) -> None:
    """Delete cached embeddings older than some days.

    Examples:
      $ pickrank cache prune --older-than 30
      $ pickrank cache prune --older-than 7 --cache /data/pickrank.sqlite3
    """
    _cache_command(opts, lambda c: typer.echo(f"deleted {c.prune(older_than)} entries"))
