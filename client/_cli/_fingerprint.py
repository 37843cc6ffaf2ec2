"""``modelhash fingerprint``: print every layer of each path."""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from modelhash._cli._app import app
from modelhash._cli._exit import Exit
from modelhash._cli._progress import make_progress
from modelhash.errors import ModelhashError, UnsafeFileError
from modelhash.fingerprint import Outcome, fingerprint_path


class Layers(StrEnum):
    """Which layers to compute."""

    exact = "exact"
    all = "all"


def error_json(err: ModelhashError) -> dict[str, Any]:
    """The JSON form of an error: a one-line reason, its kind, and unsafe globals."""
    out: dict[str, Any] = {"message": err.diagnostics(), "kind": _kind(err)}
    if isinstance(err, UnsafeFileError):
        out["globals"] = err.globals
    return out


def _kind(err: ModelhashError) -> str:
    name = type(err).__name__.removesuffix("Error")
    return {"UnsupportedFormat": "unsupported", "MalformedFile": "malformed",
            "ResourceLimit": "limit", "UnsafeFile": "unsafe"}.get(name, name.lower())


def outcome_json(o: Outcome, *, include_tensors: bool) -> dict[str, Any]:
    """One result of ``fingerprint --json``."""
    if o.fingerprint is not None and o.error is None:
        out = o.fingerprint.to_json(include_tensors=include_tensors)
        out["error"] = None
        return out
    assert o.error is not None
    return {
        "path": o.path,
        "files": [f.to_json() for f in o.files],
        "error": error_json(o.error),
    }


def _print_human(o: Outcome) -> None:
    fp = o.fingerprint
    assert fp is not None
    m = fp.model
    flavour = f" ({m.flavour})" if m.flavour else ""
    dtypes = ", ".join(f"{k}: {v}" for k, v in sorted(m.dtypes.items()))
    typer.echo(f"{fp.path}")
    typer.echo(f"  format        {fp.format}")
    typer.echo(f"  model         {m.kind}{flavour}, {m.architecture}, "
               f"{m.tensors} tensors, {m.parameters:,} parameters [{dtypes}]")
    typer.echo(f"  content       {fp.content.algorithm}:{fp.content.hex}")
    for f in fp.files:
        if len(fp.files) > 1:
            typer.echo(f"  file          {f.path} ({f.size:,} bytes)")
        typer.echo(f"  sha256        {f.sha256}")
        typer.echo(f"  autov2        {f.autov2}")
        if f.autov1:
            typer.echo(f"  autov1        {f.autov1}")
        if f.autov3:
            typer.echo(f"  autov3        {f.autov3}")
        typer.echo(f"  blake3        {f.blake3}")
        typer.echo(f"  crc32         {f.crc32.upper()}")
    if fp.sketch is not None:
        sk = fp.sketch
        typer.echo(f"  sketch        {sk.algorithm}, {sk.kind}, {len(sk)} tensors, "
                   f"{len(sk.to_bytes()):,} bytes")
    for note in fp.notes:
        typer.echo(f"  note          {note}")


@app.command()
def fingerprint(
    paths: Annotated[list[Path], typer.Argument(help="Weight files or model folders.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
    layers: Annotated[
        Layers, typer.Option(help="exact: file and content layers; all: every layer.")
    ] = Layers.all,
    tensors: Annotated[
        bool, typer.Option("--tensors", help="With --json, include per-tensor digests.")
    ] = False,
    progress: Annotated[
        bool, typer.Option("--progress/--no-progress", help="Progress bar on a terminal.")
    ] = True,
) -> None:
    """Fingerprint weight files and model folders (safetensors, PyTorch, GGUF).

    Exit 0 when every path was fingerprinted, 2 when any could not be (each such
    path gets one line on stderr; the others are still printed).
    """
    bar = make_progress(progress)
    results: list[dict[str, Any]] = []
    failed = False
    for path in paths:
        for o in fingerprint_path(path, progress=bar, layers=layers.value):
            if o.error is not None:
                failed = True
                sys.stderr.write(f"modelhash: {o.error.diagnostics()}\n")
            if as_json:
                results.append(outcome_json(o, include_tensors=tensors))
            elif o.error is None:
                _print_human(o)
    if as_json:
        sys.stdout.write(json.dumps({"results": results}, indent=2) + "\n")
    raise typer.Exit(int(Exit.BAD_INPUT if failed else Exit.OK))
