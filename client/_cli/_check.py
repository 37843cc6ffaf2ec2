"""``modelhash check``: fingerprint paths locally and ask the registry (or the offline cache)."""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Annotated

import typer

from modelhash._cache import OfflineCache
from modelhash._cli._app import app, exit_code_for, fail
from modelhash._cli._common import ApiKeyOption, JsonOption, RegistryOption, client_for, print_json
from modelhash._cli._exit import Exit
from modelhash._cli._fingerprint import Layers as LayersChoice
from modelhash._cli._progress import make_progress
from modelhash._scan import Checker, PathResult, check_paths
from modelhash.errors import ModelhashError

CacheOption = Annotated[
    Path | None,
    typer.Option(
        "--cache",
        envvar="MODELHASH_CACHE",
        show_envvar=True,
        help="Folder of the offline cache (default: the user cache folder, "
        "e.g. ~/.cache/modelhash).",
    ),
]


def exit_for(results: list[PathResult]) -> Exit:
    """1 if anything matched, else 2 if any path could not be read, else 0."""
    if any(r.verdict == "match" for r in results):
        return Exit.MATCH
    if any(r.error is not None for r in results):
        return Exit.BAD_INPUT
    return Exit.OK


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
        return f"clean  {r.path}" + (f" (revoked flag {', '.join(revoked)})" if revoked else "")
    return f"error  {r.path}"


@app.command()
def check(
    paths: Annotated[
        list[Path],
        typer.Argument(metavar="PATH", help="Weight files or model folders to check.",
                       show_default=False),
    ],
    as_json: JsonOption = False,
    recursive: Annotated[
        bool,
        typer.Option("--recursive", "-r", help="Walk folders: every weight file and model "
                     "folder below them is checked."),
    ] = False,
    workers: Annotated[
        int,
        typer.Option("--workers", "-j", min=0, help="Fingerprint this many paths at once "
                     "(0: one per CPU core)."),
    ] = 1,
    layers: Annotated[
        LayersChoice,
        typer.Option("--layers", help="'all' also sends the sketch layer, so that fine-tunes, "
                     "merges, casts and LoRAs of flagged models match; 'exact' sends only the "
                     "file and content hashes (faster)."),
    ] = LayersChoice.all,
    offline: Annotated[
        bool,
        typer.Option("--offline", help="Answer from the offline cache that 'modelhash sync' "
                     "keeps; never contact the registry. Exact matching only: the cache has "
                     "no sketches, so derivatives are not found."),
    ] = False,
    cache: CacheOption = None,
    max_age: Annotated[
        float | None,
        typer.Option("--max-age", min=0, help="With --offline: fail (exit 3) when the cache "
                     "was synced longer ago than this many hours."),
    ] = None,
    registry: RegistryOption = None,
    api_key: ApiKeyOption = None,
    progress: Annotated[
        bool, typer.Option("--progress/--no-progress", help="Progress bar on a terminal.")
    ] = True,
) -> None:
    """Fingerprint each PATH on this machine and check it against the list of flagged models.

    Only fingerprints leave the machine, never the weights. A folder that holds several
    separate models gives one result per model file; a sharded or diffusers folder is
    one model. Results come in the order of the paths.

    By default the sketch layer goes along, so the registry also finds derivatives
    of flagged models (match types near-duplicate, derived, lora, lora-baked).
    --offline and --layers exact match the exact and content hashes only.

    Exit codes, first that applies: 3 the registry (or offline cache) could not answer,
    with nothing printed on stdout; 1 at least one model matched a flag; 2 at least one
    path could not be read (one line each on stderr; the others are still checked); 0
    nothing matched.
    """
    checker: Checker
    client = None
    try:
        if offline:
            hours = timedelta(hours=max_age) if max_age is not None else None
            checker = OfflineCache(cache).load(max_age=hours)
        else:
            client = client_for(registry, api_key)
            checker = client
        results = check_paths(
            paths,
            checker,
            recursive=recursive,
            workers=workers or (os.cpu_count() or 1),
            progress=make_progress(progress),
            layers="exact" if offline else layers.value,
        )
    except ModelhashError as exc:
        fail(exc.diagnostics(), exit_code_for(exc))
    finally:
        if client is not None:
            client.close()
    for r in results:
        if r.error is not None:
            sys.stderr.write(f"modelhash: {r.error}\n")
    if as_json:
        print_json({"results": [r.to_json() for r in results]})
    else:
        for r in results:
            if r.verdict != "error":
                typer.echo(_line(r))
    raise typer.Exit(int(exit_for(results)))


__all__ = ["check", "exit_for"]
