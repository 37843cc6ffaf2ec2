"""``modelhash check``: fingerprint paths locally and ask the registry (or the offline cache)."""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

import click

from modelhash._cache import OfflineCache
from modelhash._cli._app import guarded, safe_text
from modelhash._cli._common import (
    client_for,
    echo,
    json_option,
    path_argument,
    print_json,
    progress_option,
    registry_options,
)
from modelhash._cli._exit import Exit
from modelhash._cli._fingerprint import as_layers, layers_option
from modelhash._cli._progress import make_progress
from modelhash._scan import Checker, PathResult, check_paths

cache_option = click.option(
    "--cache",
    envvar="MODELHASH_CACHE",
    show_envvar=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Folder of the offline cache [default: the user cache folder, e.g. ~/.cache/modelhash].",
)


def exit_for(results: list[PathResult]) -> Exit:
    """1 if anything matched, else 2 if any path could not be read, else 0."""
    if any(r.verdict == "match" for r in results):
        return Exit.MATCH
    if any(r.error is not None for r in results):
        return Exit.BAD_INPUT
    return Exit.OK


OFFLINE_NOTE = (
    "offline: matched exact layers only (file and content hashes); the offline cache "
    "holds no sketches, so casts, merges, fine-tunes and LoRAs of flagged models are "
    "not detected"
)
EXACT_NOTE = (
    "--layers exact: matched exact layers only (file and content hashes); casts, merges, "
    "fine-tunes and LoRAs of flagged models are not detected"
)


def _line(r: PathResult) -> str:
    if r.verdict == "match":
        counted = [m for m in r.matches if m.status != "revoked"]
        what = ", ".join(
            f"flag {m.flag_id} ({m.category}, {m.severity}, {m.match}, {m.status})"
            for m in counted
        )
        return f"MATCH  {r.path}: {what}"
    if r.verdict == "clean":
        revoked = [m.flag_id for m in r.matches if m.status == "revoked"]
        line = f"clean  {r.path}" + (f" (revoked flag {', '.join(revoked)})" if revoked else "")
        return line + (" (exact layers only)" if r.layers == "exact" else "")
    return f"error  {r.path}"


def print_errors(results: list[PathResult]) -> None:
    """One line on stderr for each result that is an error."""
    for r in results:
        if r.error is not None:
            sys.stderr.write(f"modelhash: {safe_text(r.error)}\n")


def print_results(results: list[PathResult], as_json: bool, note: str = "") -> None:
    """Errors on stderr, one line each; then the results on stdout.

    When the check covered the exact layers only, ``note`` says so: as the last
    line of the human output, and as ``layers`` and ``note`` in the JSON.
    """
    print_errors(results)
    exact = any(r.layers == "exact" for r in results)
    if as_json:
        out: dict[str, object] = {"results": [r.to_json() for r in results]}
        out["layers"] = "exact" if exact else "all"
        if note:
            out["note"] = note
        print_json(out)
    else:
        for r in results:
            if r.verdict != "error":
                echo(safe_text(_line(r)))
        if note:
            echo(f"note: {note}")


@click.command()
@path_argument("paths", nargs=-1, metavar="PATH...")
@json_option
@click.option("--recursive", "-r", is_flag=True,
              help="Walk folders: every weight file and model folder below them is checked.")
@click.option("--workers", "-j", type=click.IntRange(min=0), default=1, show_default=True,
              help="Fingerprint this many paths at once (0: one per CPU core).")
@layers_option("'all' also sends the sketch layer, so that fine-tunes, merges, casts and LoRAs "
               "of flagged models match; 'exact' sends only the file and content hashes "
               "(faster).")
@click.option("--offline", is_flag=True,
              help="Answer from the offline cache that 'modelhash sync' keeps; never contact "
              "the registry. Exact matching only: the cache has no sketches, so derivatives "
              "are not found.")
@cache_option
@click.option("--max-age", type=click.FloatRange(min=0),
              help="With --offline: fail (exit 3) when the cache was synced longer ago than "
              "this many hours.")
@registry_options
@progress_option
def check(paths: tuple[Path, ...], as_json: bool, recursive: bool, workers: int, layers: str,
          offline: bool, cache: Path | None, max_age: float | None, registry: str | None,
          api_key: str | None, progress: bool) -> None:
    """Fingerprint each PATH on this machine and check it against the list of flagged models.

    Only fingerprints leave the machine, never the weights. A folder that holds several
    separate models gives one result per model file; a sharded or diffusers folder is
    one model. Results come in the order of the paths.

    By default the sketch layer goes along, so the registry also finds derivatives
    of flagged models (match types near-duplicate, derived, lora, lora-baked), with
    --recursive too. --offline and --layers exact match the exact and content
    hashes only, and say so (a note line; "layers": "exact" and "note" in --json).

    Exit codes, first that applies: 3 the registry (or offline cache) could not answer,
    with no results printed (with --json, stdout has only {"error": ...}); 1 at least
    one model matched a flag; 2 at least one
    path could not be read (one line each on stderr; the others are still checked); 0
    nothing matched.
    """
    checker: Checker
    client = None
    try:
        if offline:
            hours = timedelta(hours=max_age) if max_age is not None else None
            checker = guarded(lambda: OfflineCache(cache).load(max_age=hours))
        else:
            client = client_for(registry, api_key)
            checker = client
        results = guarded(lambda: check_paths(
            list(paths),
            checker,
            recursive=recursive,
            workers=workers or (os.cpu_count() or 1),
            progress=make_progress(progress),
            layers="exact" if offline else as_layers(layers),
        ))
    finally:
        if client is not None:
            client.close()
    exact_only = offline or any(r.layers == "exact" for r in results)
    note = OFFLINE_NOTE if offline else EXACT_NOTE if exact_only else ""
    print_results(results, as_json, note)
    raise SystemExit(int(exit_for(results)))


__all__ = [
    "EXACT_NOTE",
    "OFFLINE_NOTE",
    "cache_option",
    "check",
    "exit_for",
    "print_errors",
    "print_results",
]
