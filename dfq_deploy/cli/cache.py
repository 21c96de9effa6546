"""``dfq-deploy cache list|verify|clear``: what the verified caches hold, whether it is intact, and
removing it (:mod:`dfq_deploy.io.cache_store`)."""

from __future__ import annotations

import click

from dfq_deploy.cli.errors import run_reporting_errors
from dfq_deploy.errors import StorageError


@click.group()
def cache() -> None:
    """The cache of calibration sets (and engines) under $DFQ_DEPLOY_CACHE or ~/.cache/dfq-deploy."""


@cache.command(name="list")
@run_reporting_errors
def cache_list() -> None:
    """Each entry: kind, key, size, age and what it holds."""
    from dfq_deploy.io.cache_store import cache_root, stores

    entries = [entry for store in stores() for entry in store.entries()]
    for entry in entries:
        what = ", ".join(f"{k}={v}" for k, v in entry.meta.items() if k in ("method", "num_images", "target"))
        click.echo(
            f"{entry.kind:<10} {entry.key[:16]}  {_size_text(entry.size_bytes):>9}  "
            f"{_age_text(entry.age_s):>8} old  {what}"
        )
    leftovers = [p for store in stores() for p in store.leftovers()]
    click.echo(
        f"{len(entries)} entries, {_size_text(sum(e.size_bytes for e in entries))} in {cache_root()}"
        + (
            f"; {len(leftovers)} damaged or unfinished left over (`dfq-deploy cache clear` removes them)"
            if leftovers
            else ""
        )
    )


@cache.command(name="verify")
@run_reporting_errors
def cache_verify() -> None:
    """Check every entry's files against the sha256 in its manifest (exit 12 if any is damaged)."""
    from dfq_deploy.io.cache_store import verify_all

    results = verify_all()
    for entry, problem in results:
        click.echo(f"{'ok' if problem is None else 'DAMAGED':<8} {entry.path}" + (f": {problem}" if problem else ""))
    damaged = sum(problem is not None for _, problem in results)
    if damaged:
        raise StorageError(
            f"{damaged} of {len(results)} cache entries are damaged",
            hint="builds move a damaged entry aside and make it again; `dfq-deploy cache clear` removes all entries",
        )
    click.echo(f"{len(results)} entries verified")


@cache.command(name="clear")
@click.option("--older-than", help="Only entries older than this age: 7d, 12h, 30m, 90s, 2w.")
@run_reporting_errors
def cache_clear(older_than) -> None:
    """Remove all entries (and damaged or unfinished leftovers), or those older than --older-than."""
    from dfq_deploy.io.cache_store import clear, parse_age

    removed, freed = clear(older_than_s=parse_age(older_than) if older_than else None)
    click.echo(f"removed {removed} entries, {_size_text(freed)} freed")


def _size_text(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def _age_text(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"
