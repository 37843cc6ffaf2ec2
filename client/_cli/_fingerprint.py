"""``modelhash fingerprint``: print every layer of each path."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import click

from modelhash._cli._app import error_json, safe_text
from modelhash._cli._exit import Exit
from modelhash._cli._options import json_option, path_argument, progress_option
from modelhash._cli._progress import make_progress
from modelhash.fingerprint import Outcome, fingerprint_path

__all__ = ["LAYERS", "as_layers", "fingerprint", "layers_option", "outcome_json"]

LAYERS = ("all", "exact")
Layers = Literal["all", "exact"]
F = TypeVar("F", bound=Callable[..., Any])


def layers_option(help_text: str) -> Callable[[F], F]:
    """``--layers all|exact``, default all."""
    return click.option("--layers", type=click.Choice(LAYERS), default="all",
                        show_default=True, help=help_text)


def as_layers(value: str) -> Layers:
    """The ``--layers`` value, typed (click has already refused anything else)."""
    return cast(Layers, value)


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
    click.echo(safe_text(fp.path))
    click.echo(f"  format        {fp.format}")
    click.echo(f"  model         {m.kind}{flavour}, {m.architecture}, "
               f"{m.tensors} tensors, {m.parameters:,} parameters [{dtypes}]")
    click.echo(f"  content       {fp.content.algorithm}:{fp.content.hex}")
    for f in fp.files:
        if len(fp.files) > 1:
            click.echo(f"  file          {safe_text(f.path)} ({f.size:,} bytes)")
        click.echo(f"  sha256        {f.sha256}")
        click.echo(f"  autov2        {f.autov2}")
        if f.autov1:
            click.echo(f"  autov1        {f.autov1}")
        if f.autov3:
            click.echo(f"  autov3        {f.autov3}")
        click.echo(f"  blake3        {f.blake3}")
        click.echo(f"  crc32         {f.crc32.upper()}")
    if fp.sketch is not None:
        sk = fp.sketch
        click.echo(f"  sketch        {sk.algorithm}, {sk.kind}, {len(sk)} tensors, "
                   f"{len(sk.to_bytes()):,} bytes")
        if sk.invariant is not None:
            products = sk.invariant.products()
            click.echo(f"  invariant     {sk.invariant.algorithm}, {len(sk.invariant)} spectra"
                       + (f" ({products} of products of two matrices)" if products else ""))
    for note in fp.notes:
        click.echo(f"  note          {safe_text(note)}")


@click.command()
@path_argument("paths", nargs=-1, metavar="PATH...")
@json_option
@layers_option("exact: file and content layers; all: every layer.")
@click.option("--tensors", is_flag=True, help="With --json, include per-tensor digests.")
@progress_option
def fingerprint(paths: tuple[Path, ...], as_json: bool, layers: str, tensors: bool,
                progress: bool) -> None:
    """Fingerprint weight files and model folders (safetensors, PyTorch, GGUF).

    Exit 0 when every path was fingerprinted, 2 when any could not be (each such
    path gets one line on stderr; the others are still printed).
    """
    bar = make_progress(progress)
    results: list[dict[str, Any]] = []
    failed = False
    for path in paths:
        for o in fingerprint_path(path, progress=bar, layers=as_layers(layers)):
            if o.error is not None:
                failed = True
                sys.stderr.write(f"modelhash: {safe_text(o.error.diagnostics())}\n")
            if as_json:
                results.append(outcome_json(o, include_tensors=tensors))
            elif o.error is None:
                _print_human(o)
    if as_json:
        sys.stdout.write(json.dumps({"results": results}, indent=2) + "\n")
    raise SystemExit(int(Exit.BAD_INPUT if failed else Exit.OK))
