"""The fingerprint engine: parse, read each file once, and assemble every layer.

The bytes of a file come either from disk or from an upload as it arrives
(:func:`fingerprint_source`); both go through the same read pass and the same work
items, so a streamed model gets every layer, the sketch included, and the same
answer as the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import blake3

from modelhash.errors import MalformedFileError, ModelhashError, UnsupportedFormatError
from modelhash.fingerprint._content import canonical_unit_names, content_digest
from modelhash.fingerprint._describe import describe
from modelhash.fingerprint._folder import Unit, resolve
from modelhash.fingerprint._formats import parse_file
from modelhash.fingerprint._guard import as_error, guarded
from modelhash.fingerprint._limits import MAX_TENSORS_PER_MODEL, check_tensor_count, open_regular
from modelhash.fingerprint._model import ParsedFile, TensorRecord, materialized
from modelhash.fingerprint._pass import (
    CHUNK,
    Source,
    SpanHasher,
    Work,
    file_layer_work,
    relative_costs,
    run_pass,
)
from modelhash.fingerprint._result import FileHashes, ModelFingerprint, TensorDigest

if TYPE_CHECKING:
    from modelhash.fingerprint._sketcher import Sketcher

__all__ = [
    "Layers",
    "Outcome",
    "Progress",
    "fingerprint_file",
    "fingerprint_path",
    "fingerprint_source",
    "hash_source",
]

Layers = Literal["exact", "all"]
"""``exact``: the file and content layers; ``all``: the sketch layer too."""


class Progress(Protocol):
    """Receives progress of long reads; the CLI draws it, libraries may ignore it."""

    def start(self, description: str, total: int) -> None:
        """A read of ``total`` bytes begins."""

    def advance(self, n: int) -> None:
        """``n`` more bytes were read."""

    def finish(self) -> None:
        """The read ended (normally or not)."""


@dataclass
class Outcome:
    """The result for one model found under a path: a fingerprint or an error.

    Even when a model cannot be read safely, ``files`` carries the file layer of
    whatever files could be hashed: a hostile file's SHA-256 is worth reporting.
    """

    path: str
    fingerprint: ModelFingerprint | None = None
    error: ModelhashError | None = None
    files: list[FileHashes] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None and self.fingerprint is not None


@dataclass
class _Part:
    """One file of a model as the pass reads it: from disk, or from a stream.

    ``verify`` judges a stream's length once it has ended (a file's is known), and
    raises the error a file of that length would have given.
    """

    prefix: str
    pf: ParsedFile
    label: str
    source: Source | None = None
    verify: Callable[[int], None] | None = None
    folder: Path | None = None
    """Where an adapter's ``adapter_config.json`` may sit; None for a stream."""


def fingerprint_file(
    path: str | os.PathLike[str],
    *,
    progress: Progress | None = None,
    chunk: int = CHUNK,
    layers: Layers = "all",
) -> ModelFingerprint:
    """Fingerprint one file or model folder; raise a ModelhashError if it fails.

    A folder that is a collection of several models is an error here; use
    :func:`fingerprint_path` for those.
    """
    outcomes = fingerprint_path(path, progress=progress, chunk=chunk, layers=layers)
    if len(outcomes) != 1:
        raise UnsupportedFormatError(
            Path(path), f"holds {len(outcomes)} separate models; fingerprint them one by one"
        )
    (out,) = outcomes
    if out.error is not None:
        raise out.error
    assert out.fingerprint is not None
    return out.fingerprint


def fingerprint_path(
    path: str | os.PathLike[str],
    *,
    progress: Progress | None = None,
    chunk: int = CHUNK,
    layers: Layers = "all",
) -> list[Outcome]:
    """Fingerprint every model at ``path``; errors are returned, never raised."""
    outcomes: list[Outcome] = []
    try:
        units = guarded(path, lambda: resolve(Path(path)))
    except ModelhashError as exc:
        return [Outcome(path=str(path), error=as_error(path, exc))]
    for unit in units:
        if isinstance(unit, ModelhashError):
            outcomes.append(Outcome(path=unit.path, error=unit))
            continue
        outcomes.append(_guarded_unit(unit, progress, chunk, layers))
    return outcomes


def fingerprint_source(
    name: str,
    pf: ParsedFile,
    source: Source,
    verify: Callable[[int], None],
    *,
    progress: Progress | None = None,
    chunk: int = CHUNK,
    layers: Layers = "all",
) -> Outcome:
    """Fingerprint one file whose structure ``pf`` is known (from its header) and whose
    bytes, from the first, come from ``source``: an upload as it arrives.

    The same pass and work items as for a file on disk, so every layer comes out
    equal to ``fingerprint_path`` on the same bytes. ``verify(n)`` is called with
    the number of bytes the source gave and raises if that is not a valid file.
    Errors are returned in the outcome, with the file layer of the bytes seen.
    """
    unit = Unit(Path(name), None, [("", Path(name))])
    out = Outcome(path=name)
    part = _Part("", pf, name, source=source, verify=verify)
    try:
        out.fingerprint = guarded(
            name, lambda: _assemble(unit, [part], out, progress, chunk, layers)
        )
    except ModelhashError as exc:
        out.error = as_error(name, exc)
    return out


def hash_source(
    name: str, source: Source, *, progress: Progress | None = None, chunk: int = CHUNK
) -> FileHashes:
    """The file layer alone of the bytes ``source`` gives (an unreadable upload)."""
    works, finish = file_layer_work(name, None, None)
    _read(name, None, source, works, progress, chunk)
    return finish()


def _guarded_unit(unit: Unit, progress: Progress | None, chunk: int, layers: Layers) -> Outcome:
    """The per-file boundary: nothing that goes wrong with one model escapes it."""
    try:
        out = guarded(unit.path, lambda: _fingerprint_unit(unit, progress, chunk, layers))
    except ModelhashError as exc:
        return Outcome(path=str(unit.path), error=as_error(unit.path, exc))
    if out.error is not None:  # kept with the result: drop the frames it was raised in
        out.error = as_error(unit.path, out.error)
    return out


def _fingerprint_unit(
    unit: Unit, progress: Progress | None, chunk: int, layers: Layers
) -> Outcome:
    out = Outcome(path=str(unit.path))
    parsed: list[tuple[str, ParsedFile]] = []
    total = 0
    try:
        for prefix, f in unit.files:
            pf = parse_file(f)
            total += len(pf.tensors)
            check_tensor_count(f, total, MAX_TENSORS_PER_MODEL)  # before the next shard
            parsed.append((prefix, pf))
    except ModelhashError as exc:
        out.error = exc
        # Still hash the file that failed: its exact bytes are a useful signal.
        failed = unit.files[len(parsed)][1]
        with contextlib.suppress(ModelhashError):
            out.files.append(guarded(failed, lambda: _hash_file_only(failed, progress, chunk)))
        return out
    parts = [_Part(prefix, pf, str(pf.path), folder=pf.path.parent) for prefix, pf in parsed]
    try:
        out.fingerprint = guarded(
            unit.path, lambda: _assemble(unit, parts, out, progress, chunk, layers)
        )
    except ModelhashError as exc:
        out.error = exc
    return out


def _hash_file_only(path: Path, progress: Progress | None, chunk: int) -> FileHashes:
    fh, size = open_regular(path)  # never a FIFO or device
    fh.close()
    works, finish = file_layer_work(path, size, None)
    _read(path.name, size, path, works, progress, chunk)
    return finish()


def _read(
    label: str,
    size: int | None,
    source: Source | Path,
    works: list[Work],
    progress: Progress | None,
    chunk: int,
) -> int:
    if progress is not None:
        progress.start(label, size or 0)
    try:
        return run_pass(
            source, size, works, chunk=chunk, advance=progress.advance if progress else None
        )
    finally:
        if progress is not None:
            progress.finish()


def _hash_tensors(
    part: _Part, out: Outcome, progress: Progress | None, chunk: int, extra: list[Work]
) -> tuple[FileHashes, list[str]]:
    """One pass over the file for the file layer, every spanned tensor, and ``extra``.

    A stream that turns out not to be the file its header described still leaves
    its file layer in ``out.files`` before the error is raised.
    """
    pf = part.pf
    spanned = [t for t in pf.tensors if t.span is not None]
    spans = SpanHasher([t.span for t in spanned if t.span is not None])
    works, finish = file_layer_work(part.label, pf.size, pf.autov3_offset)
    covered = sum(t.nbytes for t in spanned) / max(1, pf.size)
    works.append(Work(spans, relative_costs()[0] * covered))
    works.extend(extra)
    if part.source is None:
        _read(pf.path.name, pf.size, pf.path, works, progress, chunk)
    else:
        got = _read(part.label, None, part.source, works, progress, chunk)
        assert part.verify is not None
        try:
            part.verify(got)
        except ModelhashError:
            out.files.append(dataclasses.replace(finish(), autov3=None))
            raise
    by_span = iter(spans.hexdigests())
    digests = [
        next(by_span) if t.span is not None else _materialized(pf.path, t) for t in pf.tensors
    ]
    return finish(), digests


def _materialized(path: Path, t: TensorRecord) -> str:
    """The BLAKE3 of a tensor read through its ``materialize``."""
    h = blake3.blake3()
    for piece in materialized(path, t):
        h.update(piece)
    return h.hexdigest()


def _assemble(
    unit: Unit,
    parts: list[_Part],
    out: Outcome,
    progress: Progress | None,
    chunk: int,
    layers: Layers,
) -> ModelFingerprint:
    tensors: list[TensorDigest] = []
    notes = list(unit.notes)
    metadata: dict[str, str] = dict(parts[0].pf.metadata) if len(parts) == 1 else {}
    formats: set[str] = set()
    names = canonical_unit_names([[t.name for t in p.pf.tensors] for p in parts])
    model = describe(
        [
            (p.prefix + n, t.dtype, t.shape)
            for p, ns in zip(parts, names, strict=True)
            for n, t in zip(ns, p.pf.tensors, strict=True)
        ],
        metadata,
    )
    sketcher: Sketcher | None = None
    if layers == "all":
        # Imported here so that exact-only runs do not load numpy's sketch code.
        from modelhash.fingerprint._sketcher import Sketcher

        sketcher = Sketcher(model.kind, metadata)
        sketcher.plan([(p.pf, ns, p.prefix) for p, ns in zip(parts, names, strict=True)])
    for part, pf_names in zip(parts, names, strict=True):
        pf, prefix = part.pf, part.prefix
        formats.add(pf.format)
        if unit.weight_map is not None:
            _check_shard(unit, pf)
        extra = sketcher.work(pf, pf_names, prefix, part.folder) if sketcher is not None else []
        file_hashes, digests = _hash_tensors(part, out, progress, chunk, extra)
        if sketcher is not None:
            sketcher.after_pass(pf)
        out.files.append(file_hashes)
        for name, t, d in zip(pf_names, pf.tensors, digests, strict=True):
            tensors.append(TensorDigest(prefix + name, t.dtype, t.shape, d))
        notes.extend(pf.notes)
    if not tensors:
        raise MalformedFileError(unit.path, "holds no tensors")
    sketch = sketcher.finish() if sketcher is not None else None
    if sketch is not None:
        notes.extend(sketch.notes)
    dupes = [n for n, c in Counter(t.name for t in tensors).items() if c > 1]
    if dupes:
        raise MalformedFileError(unit.path, f"tensor {dupes[0]!r} appears more than once")
    fmt = unit.format or parts[0].pf.format
    if unit.format and len(formats) > 1:
        notes.append(f"mixed containers: {', '.join(sorted(formats))}")
    return ModelFingerprint(
        path=str(unit.path),
        format=fmt,
        files=list(out.files),
        content=content_digest(tensors),
        tensors=tensors,
        model=model,
        metadata=metadata,
        notes=notes,
        sketch=sketch,
    )


def _check_shard(unit: Unit, pf: ParsedFile) -> None:
    """A shard must hold exactly the tensors its index assigns to it."""
    assert unit.weight_map is not None
    want = {n for n, f in unit.weight_map.items() if f == pf.path.name}
    have = {t.name for t in pf.tensors}
    if want != have:
        extra = sorted(have - want)
        missing = sorted(want - have)
        what = f"index lists {missing[0]!r}, shard lacks it" if missing else (
            f"shard holds {extra[0]!r}, index does not list it"
        )
        raise MalformedFileError(pf.path, f"shard disagrees with its index: {what}")
