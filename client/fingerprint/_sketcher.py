"""Build a model's sketch layer alongside the exact layers, in the same read.

:class:`Sketcher` is given each parsed file before its pass and returns a
:class:`~modelhash.fingerprint._pass.Work` item for it. A checkpoint's eligible
tensors are projected as their bytes stream by (see
:class:`~modelhash.fingerprint._project.SketchWork`); an adapter's factor tensors are
read back one module at a time after the pass (from the page cache, for a file
just read), so memory holds one module's factors, never the whole adapter.
Tensors whose bytes are not one span of the file are decoded from their
``materialize`` stream afterwards. Whatever is skipped is counted in notes.

The layout layer decides what is sketched under which canonical name: a fused matrix
becomes one job set per row piece (their sketches add up per module), a scaled fp8
weight's scale is read before the pass (a stream's is kept as it passes, by every
stripe's work), and an embedding's vectors are viewed as rows.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from modelhash.errors import MalformedFileError, ModelhashError, ResourceLimitError
from modelhash.fingerprint._dequant import DECODERS
from modelhash.fingerprint._keys import module_key, tensor_module
from modelhash.fingerprint._layouts import embedding_view, pieces, split_adapter
from modelhash.fingerprint._limits import MAX_SKETCHED, open_regular, read_sidecar
from modelhash.fingerprint._lora import (
    MAX_CONFIG_BYTES,
    TOO_LARGE,
    FactorError,
    LoraGroup,
    adapter_configs,
    group_lora,
    sketch_group,
)
from modelhash.fingerprint._measure import Measurer
from modelhash.fingerprint._model import ParsedFile, TensorRecord, materialized, numel
from modelhash.fingerprint._pass import SpanCopier, Work
from modelhash.fingerprint._project import F32, SketchJob, SketchWork, decoder_for, merged
from modelhash.fingerprint._scaled import (
    MAX_SCALE_ELEMENTS,
    MAX_SCALES_PER_FILE,
    Scale,
    scale_for,
    scale_names,
)
from modelhash.fingerprint._sketch import Sketch, TensorSketch

__all__ = ["MAX_ADAPTER_BYTES", "Sketcher"]

MAX_ADAPTER_BYTES = 4 * 1024**3
MAX_STRIPES = 8
MAX_MODULE_ELEMENTS = 32 * 1024 * 1024
"""Factor elements of one adapter module, decoded as float64 (256 MiB) to sketch it."""
SIDECAR = "adapter_config.json"


class _Collect:
    """Work that keeps the bytes of some spans (a streamed adapter's factors)."""

    def __init__(self, spans: Mapping[str, tuple[int, int]]) -> None:
        self.spans = dict(spans)
        self.data = {name: bytearray() for name in spans}

    def __call__(self, off: int, view: memoryview) -> None:
        end = off + len(view)
        for name, (start, length) in self.spans.items():
            lo, hi = max(start, off), min(start + length, end)
            if hi > lo:
                self.data[name] += view[lo - off : hi - off]


class _Kept(SpanCopier):
    """Bytes of a few small spans (weight scales) kept as a stream passes.

    Every stripe's work writes the spans it sees, before it feeds its jobs: the
    copies are the same bytes, and each lane has written every span that ends
    before the bytes it is sketching, whichever lane the pass gave it.
    """


class _Lazy:
    """A stream's weight scale, decoded from :class:`_Kept` the first time it is used
    (its bytes all precede the weight's, so they have passed by then)."""

    def __init__(self, t: TensorRecord, kept: _Kept, name: str, m: int, n: int) -> None:
        self._args = (t, kept, name, m, n)
        self._made = False
        self.value: Scale | None = None

    def get(self) -> Scale | None:
        if not self._made:
            t, kept, name, m, n = self._args
            raw = bytes(kept.data[name])
            self.value = scale_for(t, Path(name), m, n, lambda _p, _t: iter([raw]))
            self._made = True
        return self.value


class Sketcher:
    """Accumulates the sketch of one model (a file or a folder read as one model)."""

    def __init__(self, kind: str, metadata: Mapping[str, str]) -> None:
        self.adapter = kind == "lora"
        self.embedding = kind == "embedding"
        self.metadata = dict(metadata)
        self.tensors: dict[str, TensorSketch] = {}
        self.skipped: Counter[str] = Counter()
        self._jobs: list[tuple[str, list[SketchJob]]] = []
        self._parts: dict[str, tuple[TensorRecord, Path]] = {}
        self._later: list[tuple[str, TensorRecord, SketchJob]] = []
        # Rows each canonical module needs, and how many its pieces have filled.
        self._expected: dict[str, int] = {}
        self._rows: dict[str, int] = {}
        self._lazy: list[_Lazy] = []
        self._kept: dict[str, bytearray] = {}
        self._adapter_bytes = 0
        self._sidecar: bytes | None = None
        # The invariant layer, measured in the same read (checkpoints only).
        self.measurer = None if self.adapter or self.embedding else Measurer(self.metadata)

    def plan(self, files: list[tuple[ParsedFile, list[str], str]]) -> None:
        """Every file of the model (parsed file, canonical names, prefix), before the
        first pass: the invariant layer's matrices are chosen for the whole model."""
        if self.measurer is None:
            return
        planned = []
        for pf, names, prefix in files:
            named = scale_names(dict(zip(names, pf.tensors, strict=True)))
            planned.append((pf, names, prefix, set(named) | set(named.values())))
        self.measurer.plan(planned)

    def work(
        self, pf: ParsedFile, names: list[str], prefix: str, folder: Path | None = None
    ) -> list[Work]:
        """The work items for ``pf``'s pass; ``names`` are its canonical tensor names.

        A checkpoint's projections are the costliest work of the pass, so they are
        split into one stripe per core (alternate row blocks of every tensor): the
        pass can then spread them over its lanes evenly, chunk by chunk. ``folder``
        is where an adapter's config may sit beside it (None for a stream, which has
        no neighbours).
        """
        if self.adapter:
            one = self._adapter_work(pf, names, prefix, folder)
            return [one] if one is not None else []
        stripes = max(1, min(MAX_STRIPES, os.cpu_count() or 1))
        jobs: list[list[SketchJob]] = [[] for _ in range(stripes)]
        loads = [0.0] * stripes
        by_name = dict(zip(names, pf.tensors, strict=True))
        named = scale_names(by_name)
        scales = self._budgeted(named, by_name)
        scale_tensors = set(named.values())
        kept = _Kept({
            s: span for s in scales.values()
            if folder is None and (span := by_name[s].span) is not None
        })
        for name, t in zip(names, pf.tensors, strict=True):
            if name in scale_tensors:
                continue
            view = embedding_view(name, t.shape) if self.embedding else None
            plan = decoder_for(t.dtype, view[1] if view else t.shape)
            if isinstance(plan, str):
                if plan != "shape":
                    self.skipped[plan] += 1
                continue
            if len(self.tensors) + len(self._jobs) + len(self._later) >= MAX_SKETCHED:
                self.skipped[f"past {MAX_SKETCHED:,} matrices"] += 1
                continue
            decoder, (m, n) = plan
            key = view[0] if view else module_key(prefix + tensor_module(name))
            row_bytes = n // decoder.block * decoder.size
            scale = self._scale(scales.get(name), by_name, pf, kept, t, m, n)
            for p in pieces(key, m, n, self.metadata):
                whole = p.rows == m and p.count == m and p.at == 0 and p.order is None
                targets = None if whole or p.transposed else p.targets()
                self._expected[p.key] = p.rows
                start, length = p.start * row_bytes, p.count * row_bytes
                shape = (m, n) if p.transposed else (p.rows, n)
                if t.span is None:
                    job = SketchJob(0, start, length, decoder, shape, targets=targets,
                                    scale=_rows_of(scale, p.start, n), transposed=p.transposed)
                    self._later.append((p.key, t, job))
                    continue
                parts = [
                    SketchJob(len(self._jobs), t.span[0] + start, length, decoder, shape,
                              s, stripes, targets=targets, scale=_rows_of(scale, p.start, n),
                              transposed=p.transposed)
                    for s in range(stripes)
                ]
                self._jobs.append((p.key, parts))
                # Stripe 0 takes the most blocks (a tensor of one block: all of it), so
                # the stripes go to the works with the least work so far, the largest
                # first: with many small tensors the lanes would otherwise differ by a
                # tensor's share each. ``parts`` keeps stripe order, so merged() adds
                # the stripes in the same order whichever work computed each.
                least = sorted(range(stripes), key=lambda i: loads[i])
                for job, i in zip(parts, least, strict=True):
                    jobs[i].append(job)
                    loads[i] += job.share * decoder.cost
        before = kept if kept.spans else None
        works = [SketchWork(js, before) for js in jobs if js]
        out = [Work(w, w.cost(pf.size)) for w in works]
        if self.measurer is not None:
            measure = self.measurer.work(pf, names, prefix, set(named) | scale_tensors)
            out.extend([measure] if measure is not None else [])
        return out

    def _budgeted(
        self, scales: dict[str, str], by_name: Mapping[str, TensorRecord]
    ) -> dict[str, str]:
        """The weights whose scales are held during the pass, up to MAX_SCALES_PER_FILE
        elements in all (their tensors are then small enough to keep from a stream)."""
        out: dict[str, str] = {}
        total = 0
        for weight, scale in scales.items():
            n = numel(by_name[scale].shape)
            if n > MAX_SCALE_ELEMENTS or total + n > MAX_SCALES_PER_FILE:
                self.skipped["weight scales too large"] += 1
                continue
            total += n
            out[weight] = scale
        return out

    def _scale(
        self, scale_name: str | None, by_name: Mapping[str, TensorRecord], pf: ParsedFile,
        kept: _Kept, t: TensorRecord, m: int, n: int,
    ) -> Callable[[], Scale | None] | None:
        """How to get a weight's scale, or None if it has none: a file's is read now
        (a small random-access read), a stream's is taken from the bytes as they pass."""
        if scale_name is None:
            return None
        st = by_name[scale_name]
        if scale_name not in kept.spans:
            got = scale_for(st, pf.path, m, n, lambda path, rec: iter([_tensor_bytes(path, rec)]))
            if got is None:
                self.skipped["unreadable weight scales"] += 1
                return None
            return lambda: got
        assert st.span is not None
        if t.span is None or st.span[0] + st.span[1] > t.span[0]:
            # The scale comes after its weight: a stream cannot go back for it.
            self.skipped["weight scales after their weights in a stream"] += 1
            return None
        lazy = _Lazy(st, kept, scale_name, m, n)
        self._lazy.append(lazy)
        return lazy.get

    def after_pass(self, pf: ParsedFile) -> None:
        """Finish ``pf``: collect the pass's sketches and decode materialised tensors."""
        if self.adapter:
            return
        if self.measurer is not None:
            self.measurer.after_pass(pf)
        for key, parts in self._jobs:
            self._add(key, parts)
        self._jobs.clear()
        for key, t, job in self._later:
            stop = job.start + job.length
            at = 0
            for piece in materialized(pf.path, t):
                lo, hi = max(job.start, at), min(stop, at + len(piece))
                if hi > lo:
                    job.feed(memoryview(piece)[lo - at : hi - at])
                at += len(piece)
            self._add(key, [job])
        self._later.clear()
        for lazy in self._lazy:
            if lazy.get() is None:  # the weight went unscaled, as for a file
                self.skipped["unreadable weight scales"] += 1
        self._lazy.clear()

    def _add(self, key: str, parts: list[SketchJob]) -> None:
        """Add a tensor's (or row piece's) sketch; the row pieces of one canonical
        module add up to its sketch."""
        values = merged(parts)
        job = parts[0]
        shape = job.canonical_shape
        rows = shape[0] if job.transposed else job.stored_rows
        if values is None:
            self.skipped["non-finite values"] += 1
            return
        have = self._rows.get(key, 0)
        if key in self.tensors and have >= self._expected.get(key, shape[0]):
            self.skipped["duplicate module keys"] += 1
        elif key in self.tensors:
            old = self.tensors[key]
            if old.shape != shape:
                self.skipped["duplicate module keys"] += 1
                return
            self.tensors[key] = TensorSketch(key, shape, old.values + values)
            self._rows[key] = have + rows
        else:
            self.tensors[key] = TensorSketch(key, shape, values)
            self._rows[key] = rows

    def _adapter_work(
        self, pf: ParsedFile, names: list[str], prefix: str, folder: Path | None
    ) -> Work | None:
        """Note an adapter's factors; a stream's are kept as they pass, a file's are
        read back one module at a time after the pass."""
        sidecar = folder / SIDECAR if folder is not None else None
        if self._sidecar is None and sidecar is not None and sidecar.exists():
            try:
                self._sidecar = read_sidecar(sidecar, MAX_CONFIG_BYTES)
            except ModelhashError:
                self._sidecar = None
        spans: dict[str, tuple[int, int]] = {}
        for name, t in zip(names, pf.tensors, strict=True):
            if t.dtype not in DECODERS and t.dtype not in ("I64", "I32"):
                continue
            self._adapter_bytes += t.nbytes
            if self._adapter_bytes > MAX_ADAPTER_BYTES:
                raise ResourceLimitError(
                    pf.path, f"adapter tensors exceed {MAX_ADAPTER_BYTES} bytes for sketching"
                )
            self._parts[prefix + name] = (t, pf.path)
            if folder is None and t.span is not None:  # a stream: its bytes go by once
                spans[prefix + name] = t.span
        if not spans:
            return None
        collect = _Collect(spans)
        self._kept.update(collect.data)
        return Work(collect, 0.05)

    def _factor_bytes(self, name: str, t: TensorRecord, path: Path) -> bytes | bytearray:
        """A factor's bytes: kept from a stream, else read back from its file."""
        kept = self._kept.pop(name, None)
        return kept if kept is not None else _tensor_bytes(path, t)

    def finish(self) -> Sketch:
        """The sketch layer, with a note for whatever was skipped."""
        notes: list[str] = []
        if self.adapter:
            self._finish_adapter(notes)
        for key, want in self._expected.items():
            if key in self.tensors and self._rows.get(key, 0) != want:
                del self.tensors[key]
                self.skipped["incomplete fused pieces"] += 1
        if self.skipped:
            what = ", ".join(f"{n} ({why})" for why, n in sorted(self.skipped.items()))
            notes.append(f"sketch: tensors skipped: {what}")
        invariant = None
        if self.measurer is not None:
            invariant, more = self.measurer.finish()
            notes.extend(more)
        return Sketch("lora" if self.adapter else "model", self.tensors, notes=notes,
                      invariant=invariant or None)

    def _finish_adapter(self, notes: list[str]) -> None:
        groups, _ = group_lora(list(self._parts))
        configs = adapter_configs(self.metadata, self._sidecar)
        needs_config = False
        for key, g in groups.items():
            parts = {role: self._parts[name] for role, name in g.parts.items()}
            elements = sum(numel(t.shape) for t, _ in parts.values())
            if elements > MAX_MODULE_ELEMENTS:
                self.skipped[TOO_LARGE] += 1
                continue
            arrays = {
                role: _decode(t, self._factor_bytes(g.parts[role], t, path))
                for role, (t, path) in parts.items()
            }
            if "alpha" not in arrays and not configs and "down" in arrays:
                needs_config = True
            if "dora" in arrays:
                self.skipped["DoRA magnitudes ignored"] += 1
            for sub_key, sub_arrays in split_adapter(key, arrays, self.metadata):
                sub = LoraGroup(sub_key, g.module, g.parts)
                try:
                    with np.errstate(all="ignore"):
                        out = sketch_group(sub, sub_arrays, configs)
                except FactorError as exc:
                    path = next(iter(parts.values()))[1]
                    raise MalformedFileError(
                        path, f"adapter module {g.module!r}: {exc}"
                    ) from None
                if isinstance(out, str) or not np.all(np.isfinite(out.values)):
                    self.skipped[out if isinstance(out, str) else "non-finite values"] += 1
                elif sub_key in self.tensors:
                    self.skipped["duplicate module keys"] += 1
                else:
                    self.tensors[sub_key] = out
        if needs_config:
            notes.append("sketch: adapter alpha unknown (no alpha tensors or config); scale 1")


def _rows_of(
    scale: Callable[[], Scale | None] | None, first: int, cols: int
) -> Callable[[int, int], F32] | None:
    """The scale of a piece whose first stored row is ``first``, as SketchJob takes it."""
    if scale is None:
        return None

    def rows(row: int, count: int) -> F32:
        got = scale()
        if got is None:
            return np.ones((1, 1), dtype=np.float32)
        return got.rows(first + row, count, cols)

    return rows


def _tensor_bytes(path: Path, t: TensorRecord) -> bytes:
    """One factor's bytes: read back from its span, or from its materialize stream."""
    if t.span is None:
        return b"".join(materialized(path, t))
    fh, _ = open_regular(path)
    with fh:
        fh.seek(t.span[0])
        data = fh.read(t.span[1])
    if len(data) != t.span[1]:
        raise MalformedFileError(path, f"tensor {t.name!r}: file changed while reading")
    return data


def _decode(t: TensorRecord, raw: bytes | bytearray) -> np.ndarray:
    with np.errstate(all="ignore"):
        return _decode_values(t, raw)


def _decode_values(t: TensorRecord, raw: bytes | bytearray) -> np.ndarray:
    if t.dtype in ("I64", "I32"):
        kind = "<i8" if t.dtype == "I64" else "<i4"
        return np.frombuffer(raw, dtype=kind).astype(np.float64).reshape(t.shape)
    values = DECODERS[t.dtype].fn(np.frombuffer(raw, dtype=np.uint8))
    return values.astype(np.float64).reshape(t.shape)
