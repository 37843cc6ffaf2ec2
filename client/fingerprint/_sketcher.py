"""Build a model's sketch layer alongside the exact layers, in the same read.

:class:`Sketcher` is given each parsed file before its pass and returns a
:class:`~modelhash.fingerprint._pass.Work` item for it. A checkpoint's eligible
tensors are projected as their bytes stream by (see
:class:`~modelhash.fingerprint._project.SketchWork`); an adapter's factor tensors are
small, so their bytes are kept and each module's delta is sketched after the pass.
Tensors whose bytes are not one span of the file are decoded from their
``materialize`` stream afterwards. Whatever is skipped is counted in notes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np

from modelhash.errors import MalformedFileError, ResourceLimitError
from modelhash.fingerprint._dequant import DECODERS
from modelhash.fingerprint._keys import module_key, tensor_module
from modelhash.fingerprint._layouts import embedding_view, pieces, split_adapter
from modelhash.fingerprint._lora import LoraGroup, adapter_configs, group_lora, sketch_group
from modelhash.fingerprint._model import ParsedFile, TensorRecord
from modelhash.fingerprint._pass import Work
from modelhash.fingerprint._project import F32, SketchJob, SketchWork, decoder_for
from modelhash.fingerprint._scaled import Scale, scale_for, scale_names
from modelhash.fingerprint._sketch import Sketch, TensorSketch

__all__ = ["MAX_ADAPTER_BYTES", "Sketcher"]

MAX_ADAPTER_BYTES = 4 * 1024**3
SIDECAR = "adapter_config.json"


class _Collect:
    """Work that keeps the bytes of some spans of the file (an adapter's factors)."""

    def __init__(self, spans: Mapping[str, tuple[int, int]]) -> None:
        self.spans = dict(spans)
        self.data = {name: bytearray() for name in spans}

    def __call__(self, off: int, view: memoryview) -> None:
        end = off + len(view)
        for name, (start, length) in self.spans.items():
            lo, hi = max(start, off), min(start + length, end)
            if hi > lo:
                self.data[name] += view[lo - off : hi - off]


class Sketcher:
    """Accumulates the sketch of one model (a file or a folder read as one model)."""

    def __init__(self, kind: str, metadata: Mapping[str, str]) -> None:
        self.adapter = kind == "lora"
        self.embedding = kind == "embedding"
        self.metadata = dict(metadata)
        self.tensors: dict[str, TensorSketch] = {}
        self.skipped: Counter[str] = Counter()
        self._jobs: list[tuple[str, SketchJob]] = []
        self._parts: dict[str, tuple[TensorRecord, Path]] = {}
        self._collectors: list[_Collect] = []
        self._later: list[tuple[str, TensorRecord, SketchJob]] = []
        # Rows each canonical module needs, and how many its pieces have filled.
        self._expected: dict[str, int] = {}
        self._rows: dict[str, int] = {}
        self._adapter_bytes = 0
        self._sidecar: bytes | None = None

    def work(self, pf: ParsedFile, names: list[str], prefix: str) -> Work | None:
        """The work item for ``pf``'s pass; ``names`` are its canonical tensor names."""
        if self.adapter:
            return self._adapter_work(pf, names, prefix)
        jobs: list[SketchJob] = []
        by_name = dict(zip(names, pf.tensors, strict=True))
        scales = scale_names(by_name)
        scale_tensors = set(scales.values())
        for name, t in zip(names, pf.tensors, strict=True):
            if name in scale_tensors:
                continue
            view = embedding_view(name, t.shape) if self.embedding else None
            plan = decoder_for(t.dtype, view[1] if view else t.shape)
            if isinstance(plan, str):
                if plan != "shape":
                    self.skipped[plan] += 1
                continue
            decoder, (m, n) = plan
            key = view[0] if view else module_key(prefix + tensor_module(name))
            row_bytes = n // decoder.block * decoder.size
            scale = None
            if name in scales:
                scale = scale_for(by_name[scales[name]], pf.path, m, n, _read_tensor)
                if scale is None:
                    self.skipped["unreadable weight scales"] += 1
            for p in pieces(key, m, n, self.metadata):
                whole = p.rows == m and p.count == m and p.at == 0 and p.order is None
                job = SketchJob(
                    len(self._jobs), p.start * row_bytes, p.count * row_bytes, decoder,
                    (p.rows, n), targets=None if whole else p.targets(),
                    scale=_rows_of(scale, p.start, n),
                )
                self._expected[p.key] = p.rows
                if t.span is None:
                    self._later.append((p.key, t, job))
                    continue
                job.start += t.span[0]
                self._jobs.append((p.key, job))
                jobs.append(job)
        if not jobs:
            return None
        w = SketchWork(jobs)
        return Work(w, w.cost(pf.size))

    def after_pass(self, pf: ParsedFile) -> None:
        """Finish ``pf``: collect the pass's sketches and decode materialised tensors."""
        if self.adapter:
            return
        for key, job in self._jobs:
            self._add(key, job)
        self._jobs.clear()
        for key, t, job in self._later:
            stop = job.start + job.length
            at = 0
            for piece in _materialized(pf.path, t):
                lo, hi = max(job.start, at), min(stop, at + len(piece))
                if hi > lo:
                    job.feed(memoryview(piece)[lo - at : hi - at])
                at += len(piece)
            self._add(key, job)
        self._later.clear()

    def _add(self, key: str, job: SketchJob) -> None:
        """Add a job's sketch; row pieces of one canonical module add up to its sketch."""
        values = job.result()
        rows = job.shape[0] if job.targets is None else len(job.targets)
        if values is None:
            self.skipped["non-finite values"] += 1
            return
        have = self._rows.get(key, 0)
        if key in self.tensors and have >= self._expected.get(key, job.shape[0]):
            self.skipped["duplicate module keys"] += 1
        elif key in self.tensors:
            old = self.tensors[key]
            if old.shape != job.shape:
                self.skipped["duplicate module keys"] += 1
                return
            self.tensors[key] = TensorSketch(key, job.shape, old.values + values)
            self._rows[key] = have + rows
        else:
            self.tensors[key] = TensorSketch(key, job.shape, values)
            self._rows[key] = rows

    def _adapter_work(self, pf: ParsedFile, names: list[str], prefix: str) -> Work | None:
        sidecar = pf.path.parent / SIDECAR
        if self._sidecar is None and sidecar.is_file():
            try:
                if sidecar.stat().st_size <= 1024 * 1024:
                    self._sidecar = sidecar.read_bytes()
            except OSError:
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
            if t.span is not None:
                spans[prefix + name] = t.span
        if not spans:
            return None
        collect = _Collect(spans)
        self._collectors.append(collect)
        return Work(collect, 0.05)

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
        return Sketch("lora" if self.adapter else "model", self.tensors, notes=notes)

    def _finish_adapter(self, notes: list[str]) -> None:
        data: dict[str, bytes | bytearray] = {}
        for c in self._collectors:
            data.update(c.data)
        groups, _ = group_lora(list(self._parts))
        configs = adapter_configs(self.metadata, self._sidecar)
        needs_config = False
        for key, g in groups.items():
            arrays: dict[str, np.ndarray] = {}
            for role, name in g.parts.items():
                t, path = self._parts[name]
                raw = data.get(name)
                if raw is None:
                    raw = b"".join(_materialized(path, t))
                arrays[role] = _decode(t, raw)
            if "alpha" not in arrays and not configs and "down" in arrays:
                needs_config = True
            if "dora" in arrays:
                self.skipped["DoRA magnitudes ignored"] += 1
            for sub_key, sub_arrays in split_adapter(key, arrays, self.metadata):
                sub = LoraGroup(sub_key, g.module, g.parts)
                with np.errstate(all="ignore"):
                    out = sketch_group(sub, sub_arrays, configs)
                if isinstance(out, str) or not np.all(np.isfinite(out.values)):
                    self.skipped[out if isinstance(out, str) else "non-finite values"] += 1
                elif sub_key in self.tensors:
                    self.skipped["duplicate module keys"] += 1
                else:
                    self.tensors[sub_key] = out
        if needs_config:
            notes.append("sketch: adapter alpha unknown (no alpha tensors or config); scale 1")


def _rows_of(scale: Scale | None, first: int, cols: int) -> Callable[[int, int], F32] | None:
    """The scale of a piece whose first stored row is ``first``, as SketchJob takes it."""
    if scale is None:
        return None
    return lambda row, count: scale.rows(first + row, count, cols)


def _read_tensor(path: Path, t: TensorRecord) -> Iterator[bytes]:
    """A small tensor's bytes, read on their own (weight scales, before the pass)."""
    if t.span is None:
        yield from _materialized(path, t)
        return
    try:
        with path.open("rb") as fh:
            fh.seek(t.span[0])
            yield fh.read(t.span[1])
    except OSError as exc:
        raise MalformedFileError(path, f"cannot read {t.name!r}: {exc.strerror or exc}") from None


def _decode(t: TensorRecord, raw: bytes | bytearray) -> np.ndarray:
    with np.errstate(all="ignore"):
        return _decode_values(t, raw)


def _decode_values(t: TensorRecord, raw: bytes | bytearray) -> np.ndarray:
    if t.dtype in ("I64", "I32"):
        kind = "<i8" if t.dtype == "I64" else "<i4"
        return np.frombuffer(raw, dtype=kind).astype(np.float64).reshape(t.shape)
    values = DECODERS[t.dtype].fn(np.frombuffer(raw, dtype=np.uint8))
    return values.astype(np.float64).reshape(t.shape)


def _materialized(path: Path, t: TensorRecord) -> Iterator[bytes]:
    assert t.materialize is not None
    n = 0
    for piece in t.materialize():
        n += len(piece)
        yield piece
    if n != t.nbytes:
        raise MalformedFileError(path, f"tensor {t.name!r}: got {n} bytes, expected {t.nbytes}")
