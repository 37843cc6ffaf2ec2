"""Measure the invariant layer during the one read of a model.

:class:`Measurer` is given each parsed file before its pass, like the sketcher,
and returns one :class:`~modelhash.fingerprint._pass.Work` item that keeps the
bytes of the matrices :func:`~modelhash.fingerprint._invariant.select` picks (and
of the norms folded into them) as they pass; a stream's bytes go by once, so the
same item serves files and uploads. Their spectra are computed when the whole
model has passed (a norm may sit in another shard, or after its matrix). A fused
matrix is measured per canonical module, from its row pieces
(:func:`~modelhash.fingerprint._layouts.pieces`); the order of a module's rows
does not change its singular values.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from modelhash.fingerprint._dequant import DECODERS
from modelhash.fingerprint._invariant import (
    MAX_KEPT_BYTES,
    Candidate,
    Spectra,
    Spectrum,
    Unit,
    is_norm,
    measure,
    select,
)
from modelhash.fingerprint._keys import module_key, tensor_module
from modelhash.fingerprint._layouts import Piece, pieces
from modelhash.fingerprint._model import ParsedFile, TensorRecord, materialized
from modelhash.fingerprint._pass import SpanCopier, Work
from modelhash.fingerprint._project import matrix_shape

__all__ = ["Measurer"]


_Plan = tuple[str, TensorRecord, tuple[int, int], list[Piece]]
"""A measurable matrix: its full name, record, matrix shape and canonical pieces."""


@dataclass
class _Part:
    """Rows ``piece.start : piece.start + piece.count`` of a kept tensor, for a module."""

    tensor: str
    piece: Piece


def _candidates(
    plans: list[_Plan],
) -> list[Candidate]:
    """The canonical modules of planned matrices, with their canonical shapes."""
    return [Candidate(p.key, p.rows, mn[0] if p.transposed else mn[1])
            for _, _, mn, ps in plans for p in ps]


class Measurer:
    """Accumulates the invariant layer of one model (a file or a folder read as one)."""

    def __init__(self, metadata: Mapping[str, str]) -> None:
        self.metadata = dict(metadata)
        self.skipped: Counter[str] = Counter()
        self._records: dict[str, tuple[TensorRecord, tuple[int, int]]] = {}
        self._bytes: dict[str, bytes | bytearray] = {}
        self._parts: dict[str, list[_Part]] = {}
        self._rows: dict[str, int] = {}
        self._norms: dict[str, str] = {}
        self._keep: SpanCopier | None = None
        self._later: list[str] = []
        self._kept = 0
        self._chosen: list[Unit] | None = None
        self._units: dict[str, Unit] = {}
        self._decoded: dict[str, np.ndarray | None] = {}
        # Each file's plan, made by plan() and taken by work().
        self._planned: dict[int, tuple[ParsedFile, list[_Plan], int]] = {}

    def plan(self, files: list[tuple[ParsedFile, list[str], str, set[str]]]) -> None:
        """Choose the measured matrices for the whole model before its first pass:
        ``files`` are every file's (parsed file, canonical names, prefix, skipped
        names). A sharded model then measures the same matrices as the single file
        it was split from (one budget for the model, not one per shard)."""
        candidates: list[Candidate] = []
        elements = 0
        for pf, names, prefix, skip in files:
            plans, n = self._plans(pf, names, prefix, skip)
            self._planned[id(pf)] = (pf, plans, n)  # pf held: its id stays its own
            candidates += _candidates(plans)
            elements += n
        self._chosen = select(candidates, elements)

    def _plans(
        self, pf: ParsedFile, names: list[str], prefix: str, skip: set[str]
    ) -> tuple[list[_Plan], int]:
        """The measurable matrices of ``pf`` with their pieces, and their element count."""
        plans: list[_Plan] = []
        elements = 0
        for name, t in zip(names, pf.tensors, strict=True):
            dec = DECODERS.get(t.dtype)
            if name in skip or dec is None:
                continue
            mn = matrix_shape(t.shape)
            if mn is None:
                continue
            m, n = mn
            if n % dec.block:
                continue
            elements += m * n
            key = module_key(prefix + tensor_module(name))
            plans.append((prefix + name, t, mn, pieces(key, m, n, self.metadata)))
        return plans, elements

    def work(
        self, pf: ParsedFile, names: list[str], prefix: str, skip: set[str]
    ) -> Work | None:
        """The work item for ``pf``'s pass (None if nothing is measured in it);
        ``skip`` names tensors that are not measured (scaled fp8 weights and their
        scales, whose values are not the stored ones)."""
        spans: dict[str, tuple[int, int]] = {}
        for name, t in zip(names, pf.tensors, strict=True):
            dec = DECODERS.get(t.dtype)
            if name in skip or dec is None or matrix_shape(t.shape) is not None:
                continue
            nk = module_key(prefix + tensor_module(name))
            if (len(t.shape) == 1 and t.shape[0] % dec.block == 0 and is_norm(nk)
                    and nk not in self._norms):
                # Kept whichever file its matrices are in (a shard, a folder).
                self._take(prefix + name, t, (t.shape[0], 1), spans)
                self._norms[nk] = prefix + name
        planned = self._planned.pop(id(pf), None)
        plans, elements = (
            planned[1:] if planned is not None and planned[0] is pf
            else self._plans(pf, names, prefix, skip)
        )
        chosen = self._chosen
        if chosen is None:  # no plan for the whole model: this file alone decides
            chosen = select(_candidates(plans), elements)
        for u in chosen:
            self._units.setdefault(u.key, u)
        needed = {f.key for u in chosen for f in (u.a, u.b) if f is not None}
        for full, t, mn, ps in plans:
            mine = [p for p in ps if p.key in needed]
            if not mine:
                continue
            if self._kept + t.nbytes > MAX_KEPT_BYTES:
                self.skipped["past the kept-bytes limit"] += 1
                continue
            self._kept += t.nbytes
            self._take(full, t, mn, spans)
            for p in mine:
                self._parts.setdefault(p.key, []).append(_Part(full, p))
                self._rows[p.key] = p.rows
        if not spans:
            return None
        self._keep = SpanCopier(spans)
        return Work(self._keep, 0.02)

    def _take(self, full: str, t: TensorRecord, mn: tuple[int, int],
              spans: dict[str, tuple[int, int]]) -> None:
        self._records[full] = (t, mn)
        if t.span is not None:
            spans[full] = t.span
        else:
            self._later.append(full)

    def after_pass(self, pf: ParsedFile) -> None:
        """Take the kept bytes of ``pf``'s pass, and decode its materialised tensors."""
        if self._keep is not None:
            self._bytes.update(self._keep.data)
            self._keep = None
        for full in self._later:
            t, _ = self._records[full]
            self._bytes[full] = b"".join(materialized(pf.path, t))
        self._later.clear()

    def _values(self, full: str) -> np.ndarray | None:
        t, (m, n) = self._records[full]
        raw = self._bytes.get(full)
        if raw is None or len(raw) != t.nbytes:
            return None
        with np.errstate(all="ignore"):
            x = DECODERS[t.dtype].fn(np.frombuffer(raw, dtype=np.uint8))
        return x.reshape(m, n) if x.size == m * n else None

    def _matrix(self, key: str) -> np.ndarray | None:
        """Canonical matrix ``key`` from its kept pieces (None, and a note, if a piece
        is missing or a value is not finite)."""
        parts = self._parts.get(key)
        if not parts:
            return None
        blocks = []
        for part in parts:
            if part.tensor not in self._decoded:  # one stored tensor at a time
                self._decoded = {part.tensor: self._values(part.tensor)}
            w = self._decoded[part.tensor]
            if w is not None and part.piece.transposed:
                blocks.append(w.T)  # always the whole stored matrix
            elif w is not None:
                blocks.append(w[part.piece.start : part.piece.start + part.piece.count])
        if sum(len(b) for b in blocks) != self._rows[key]:
            self.skipped["incomplete fused pieces"] += 1
            return None
        w = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
        if not np.all(np.isfinite(w)):
            self.skipped["non-finite values"] += 1
            return None
        return w

    def finish(self) -> tuple[Spectra, list[str]]:
        """The invariant layer, and a note for whatever was skipped."""
        # One BLAS thread: the matrices are small, and on a busy machine extra BLAS
        # threads spin for more CPU than they save.
        with threadpool_limits(limits=1, user_api="blas"):
            return self._finish()

    def _finish(self) -> tuple[Spectra, list[str]]:
        norms: dict[str, np.ndarray] = {}
        for nk, full in self._norms.items():
            v = self._values(full)
            if v is not None and np.all(np.isfinite(v)):
                norms[nk] = v.reshape(-1).astype(np.float64)
        out = Spectra()
        ordered = sorted(self._units.values(), key=lambda u: u.key)
        last: dict[str, int] = {}
        for i, u in enumerate(ordered):
            for f in (u.a, u.b):
                if f is not None:
                    last[f.key] = i
        matrices: dict[str, np.ndarray] = {}
        built: set[str] = set()
        for i, u in enumerate(ordered):
            for f in (u.a, u.b):
                if f is not None and f.key not in built:
                    built.add(f.key)
                    w = self._matrix(f.key)
                    if w is not None:
                        matrices[f.key] = w
            if all(f.key in matrices for f in (u.a, u.b) if f is not None):
                with np.errstate(all="ignore"):
                    vals = measure(u, matrices, norms)
                if vals is None or not np.all(np.isfinite(vals)):
                    self.skipped["non-finite values"] += 1
                else:
                    out.items[u.key] = Spectrum(u.key, u.shape, vals)
            for f in (u.a, u.b):
                if f is not None and last[f.key] == i:
                    matrices.pop(f.key, None)
        self._bytes.clear()
        self._decoded.clear()
        notes = []
        if self.skipped:
            what = ", ".join(f"{n} ({why})" for why, n in sorted(self.skipped.items()))
            notes.append(f"invariant: matrices skipped: {what}")
        return out, notes
