"""The fingerprint engine: parse, read each file once, and assemble every layer."""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import blake3

from modelhash.errors import MalformedFileError, ModelhashError, UnsupportedFormatError
from modelhash.fingerprint._content import canonical_unit_names, content_digest
from modelhash.fingerprint._describe import describe
from modelhash.fingerprint._folder import Unit, resolve
from modelhash.fingerprint._formats import parse_file
from modelhash.fingerprint._model import ParsedFile, TensorRecord
from modelhash.fingerprint._pass import (
    CHUNK,
    COST_BLAKE3,
    SpanHasher,
    Work,
    file_layer_work,
    run_pass,
)
from modelhash.fingerprint._result import FileHashes, ModelFingerprint, TensorDigest

if TYPE_CHECKING:
    from modelhash.fingerprint._sketcher import Sketcher

__all__ = ["Layers", "Outcome", "Progress", "fingerprint_file", "fingerprint_path"]

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
    for unit in resolve(Path(path)):
        if isinstance(unit, ModelhashError):
            outcomes.append(Outcome(path=unit.path, error=unit))
            continue
        outcomes.append(_fingerprint_unit(unit, progress, chunk, layers))
    return outcomes


def _fingerprint_unit(
    unit: Unit, progress: Progress | None, chunk: int, layers: Layers
) -> Outcome:
    out = Outcome(path=str(unit.path))
    parsed: list[tuple[str, ParsedFile]] = []
    try:
        for prefix, f in unit.files:
            parsed.append((prefix, parse_file(f)))
    except ModelhashError as exc:
        out.error = exc
        # Still hash the file that failed: its exact bytes are a useful signal.
        failed = unit.files[len(parsed)][1]
        with contextlib.suppress(ModelhashError, OSError):
            out.files.append(_hash_file_only(failed, progress, chunk))
        return out
    try:
        out.fingerprint = _assemble(unit, parsed, out, progress, chunk, layers)
    except ModelhashError as exc:
        out.error = exc
    return out


def _hash_file_only(path: Path, progress: Progress | None, chunk: int) -> FileHashes:
    size = path.stat().st_size
    works, finish = file_layer_work(path, size, None)
    _read(path, size, works, progress, chunk)
    return finish()


def _read(
    path: Path,
    size: int,
    works: list[Work],
    progress: Progress | None,
    chunk: int,
) -> None:
    if progress is not None:
        progress.start(path.name, size)
    try:
        run_pass(path, size, works, chunk=chunk, advance=progress.advance if progress else None)
    finally:
        if progress is not None:
            progress.finish()


def _hash_tensors(
    pf: ParsedFile, progress: Progress | None, chunk: int, extra: Work | None = None
) -> tuple[FileHashes, list[str]]:
    """One pass over the file for the file layer, every spanned tensor, and ``extra``."""
    spanned = [t for t in pf.tensors if t.span is not None]
    spans = SpanHasher([t.span for t in spanned if t.span is not None])
    works, finish = file_layer_work(pf.path, pf.size, pf.autov3_offset)
    covered = sum(t.nbytes for t in spanned) / max(1, pf.size)
    works.append(Work(spans, COST_BLAKE3 * covered))
    if extra is not None:
        works.append(extra)
    _read(pf.path, pf.size, works, progress, chunk)
    by_span = iter(spans.hexdigests())
    digests = [
        next(by_span) if t.span is not None else _materialized(pf.path, t) for t in pf.tensors
    ]
    return finish(), digests


def _materialized(path: Path, t: TensorRecord) -> str:
    assert t.materialize is not None
    h = blake3.blake3()
    n = 0
    for piece in t.materialize():
        h.update(piece)
        n += len(piece)
    if n != t.nbytes:
        raise MalformedFileError(path, f"tensor {t.name!r}: got {n} bytes, expected {t.nbytes}")
    return h.hexdigest()


def _assemble(
    unit: Unit,
    parsed: list[tuple[str, ParsedFile]],
    out: Outcome,
    progress: Progress | None,
    chunk: int,
    layers: Layers,
) -> ModelFingerprint:
    tensors: list[TensorDigest] = []
    notes = list(unit.notes)
    metadata: dict[str, str] = dict(parsed[0][1].metadata) if len(parsed) == 1 else {}
    formats: set[str] = set()
    names = canonical_unit_names([[t.name for t in pf.tensors] for _, pf in parsed])
    model = describe(
        [
            (prefix + n, t.dtype, t.shape)
            for (prefix, pf), ns in zip(parsed, names, strict=True)
            for n, t in zip(ns, pf.tensors, strict=True)
        ],
        metadata,
    )
    sketcher: Sketcher | None = None
    if layers == "all":
        # Imported here so that exact-only runs do not load numpy's sketch code.
        from modelhash.fingerprint._sketcher import Sketcher

        sketcher = Sketcher(model.kind, metadata)
    for (prefix, pf), pf_names in zip(parsed, names, strict=True):
        formats.add(pf.format)
        if unit.weight_map is not None:
            _check_shard(unit, pf)
        extra = sketcher.work(pf, pf_names, prefix) if sketcher is not None else None
        file_hashes, digests = _hash_tensors(pf, progress, chunk, extra)
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
    fmt = unit.format or parsed[0][1].format
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
