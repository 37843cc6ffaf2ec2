"""The sketch projection, and the work item that applies it during the one read.

For a weight viewed as an m x n matrix W, the sketch is the K x K matrix
``S(W) = A W Bᵀ / sqrt(m n)``, with A (K x m) and B (K x n) matrices of random
signs. A and B depend on the shape (m, n) alone, so the same layer in a base, a
fine-tune or a LoRA's delta is projected the same way, and S is linear:
S(W - W_base) = S(W) - S(W_base). The signs come from BLAKE3's extendable output
over a domain-separated seed, never from a numpy random stream, so every platform
and library version computes the same projection. Dividing by sqrt(m n) keeps each
value near the weights' RMS, which suits float16 storage.

A tensor is viewed as a matrix by keeping its first dimension and flattening the
rest, after dropping trailing 1s: a 1x1 convolution (out, in, 1, 1) and a linear
layer (out, in) therefore share one projection. One-dimensional tensors (norms,
biases) and tiny ones are not sketched: they carry little identity and make
unrelated models look alike.

:class:`SketchWork` accumulates ``S += A[:, rows] @ (W[rows] @ Bᵀ)`` over the whole
rows of each tensor as the file's chunks arrive, keeping at most one partial row
per tensor, so memory stays bounded whatever the tensor size.
"""

from __future__ import annotations

import math
import struct
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import blake3
import numpy as np
import numpy.typing as npt

from modelhash.fingerprint._dequant import DECODERS, Decoder
from modelhash.fingerprint._limits import MAX_SKETCH_CACHE_BYTES, MAX_SKETCH_SIDE

__all__ = [
    "MIN_ELEMENTS",
    "K",
    "SketchJob",
    "SketchWork",
    "matrix_shape",
    "project",
    "project_factors",
    "projections",
]

K = 16
MIN_ELEMENTS = 256
BLOCK_ELEMENTS = 1 << 16
_DOMAIN = b"modelhash/sketch/rademacher/v1\x00"

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


def matrix_shape(shape: Sequence[int]) -> tuple[int, int] | None:
    """The (m, n) a tensor is sketched as, or None if it is not sketched."""
    dims = list(shape)
    while len(dims) > 2 and dims[-1] == 1:
        dims.pop()
    if len(dims) < 2:
        return None
    m, n = dims[0], math.prod(dims[1:])
    if m < 2 or n < 2 or m * n < MIN_ELEMENTS:
        return None
    return m, n


_SIGN_CHUNK_BITS = 1 << 20
_COLUMN_BLOCK = 1 << 16


def _signs(tag: bytes, m: int, n: int, length: int, *, transposed: bool = False) -> F32:
    """K x length random signs from BLAKE3 XOF output of the seed (length x K if
    ``transposed``), generated a bounded chunk of bits at a time."""
    seed = blake3.blake3(_DOMAIN + tag + struct.pack("<QQQ", K, m, n))
    out: F32 = np.empty((length, K) if transposed else (K, length), dtype=np.float32)
    total = K * length
    for b0 in range(0, total, _SIGN_CHUNK_BITS):
        b1 = min(total, b0 + _SIGN_CHUNK_BITS)
        raw = seed.digest(length=(b1 - b0 + 7) // 8, seek=b0 // 8)
        bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")
        signs = 1.0 - 2.0 * bits[: b1 - b0].astype(np.float32)
        if not transposed:
            out.reshape(-1)[b0:b1] = signs
            continue
        # Bit b belongs to row b // length, column b % length of the K x length matrix.
        pos = b0
        while pos < b1:
            k, j = divmod(pos, length)
            stop = min(b1, (k + 1) * length)
            out[j : j + stop - pos, k] = signs[pos - b0 : stop - b0]
            pos = stop
    return out


class _Cache:
    """Sign matrices by shape, kept up to MAX_SKETCH_CACHE_BYTES (least recent first out)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._items: OrderedDict[tuple[int, int], tuple[F32, F32]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, m: int, n: int) -> tuple[F32, F32]:
        with self._lock:
            found = self._items.get((m, n))
            if found is not None:
                self._items.move_to_end((m, n))
                return found
        a = _signs(b"rows", m, n, m)
        bt = _signs(b"cols", m, n, n, transposed=True)
        a.flags.writeable = False
        bt.flags.writeable = False
        size = a.nbytes + bt.nbytes
        with self._lock:
            while self._items and self._bytes + size > self._limit:
                _, (old_a, old_b) = self._items.popitem(last=False)
                self._bytes -= old_a.nbytes + old_b.nbytes
            if size <= self._limit:
                self._items[(m, n)] = (a, bt)
                self._bytes += size
        return a, bt

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


_CACHE = _Cache(MAX_SKETCH_CACHE_BYTES)


def projections(m: int, n: int) -> tuple[F32, F32]:
    """A (K x m) and Bᵀ (n x K) for matrices of shape (m, n); cached per shape.

    Only shapes with m + n <= MAX_SKETCH_SIDE are projected (see
    :func:`decoder_for`), so one pair takes at most 64 * MAX_SKETCH_SIDE bytes.
    """
    if m + n > MAX_SKETCH_SIDE:
        raise ValueError(f"matrix {m} x {n} is too large to sketch")
    return _CACHE.get(m, n)


def _left(a: F32, x: F64) -> F64:
    """``a @ x`` in float64, a bounded block of a's columns at a time."""
    out: F64 = np.zeros((a.shape[0], x.shape[1]))
    for i in range(0, a.shape[1], _COLUMN_BLOCK):
        out += a[:, i : i + _COLUMN_BLOCK].astype(np.float64) @ x[i : i + _COLUMN_BLOCK]
    return out


def _right(x: F64, bt: F32) -> F64:
    """``x @ bt`` in float64, a bounded block of bt's rows at a time."""
    out: F64 = np.zeros((x.shape[0], bt.shape[1]))
    for i in range(0, bt.shape[0], _COLUMN_BLOCK):
        out += x[:, i : i + _COLUMN_BLOCK] @ bt[i : i + _COLUMN_BLOCK].astype(np.float64)
    return out


def project(w: npt.NDArray[np.floating[Any]]) -> F64:
    """The sketch of one matrix (any float dtype), in float64."""
    m, n = w.shape
    a, bt = projections(m, n)
    s = _left(a, _right(w.astype(np.float64), bt))
    out: F64 = s / math.sqrt(m * n)
    return out


def project_factors(up: F64, down: F64, scale: float) -> F64:
    """The sketch of ``scale * up @ down`` without forming the product."""
    m, n = up.shape[0], down.shape[1]
    a, bt = projections(m, n)
    s = _left(a, up) @ _right(down, bt)
    out: F64 = s * (scale / math.sqrt(m * n))
    return out


@dataclass
class SketchJob:
    """One tensor to sketch: where its bytes are, how to decode them, its matrix shape."""

    index: int
    start: int
    length: int
    decoder: Decoder
    shape: tuple[int, int]
    acc: F64 | None = None  # made at the first row: a job waiting for its bytes holds none
    rows_done: int = 0
    pending: bytearray = field(default_factory=bytearray)

    @property
    def row_bytes(self) -> int:
        return self.shape[1] // self.decoder.block * self.decoder.size

    def feed(self, piece: memoryview) -> None:
        """Take the next bytes of the tensor; sketch every row they complete."""
        rb = self.row_bytes
        if self.pending:
            need = rb - len(self.pending)
            self.pending += piece[:need]
            piece = piece[need:]
            if len(self.pending) < rb:
                return
            self._rows(memoryview(bytes(self.pending)))
            self.pending.clear()
        whole = len(piece) // rb * rb
        if whole:
            self._rows(piece[:whole])
        if whole < len(piece):
            self.pending += piece[whole:]

    def _rows(self, raw: memoryview) -> None:
        m, n = self.shape
        a, bt = projections(m, n)
        r0 = self.rows_done
        rb = self.row_bytes
        rows = len(raw) // rb
        step = max(1, BLOCK_ELEMENTS // n)
        if self.acc is None:
            self.acc = np.zeros((K, K))
        acc = self.acc
        # Blocks small enough to stay in cache between decoding and projecting.
        # Hostile or corrupt bytes may decode to inf/NaN; result() rejects those.
        with np.errstate(all="ignore"):
            for i in range(0, rows, step):
                j = min(rows, i + step)
                x = self.decoder.fn(np.frombuffer(raw[i * rb : j * rb], dtype=np.uint8))
                acc += a[:, r0 + i : r0 + j] @ (x.reshape(-1, n) @ bt)
        self.rows_done += rows

    def result(self) -> F64 | None:
        """The finished sketch, or None if rows are missing or a value is not finite."""
        if self.rows_done != self.shape[0] or self.pending:
            return None
        if self.acc is None or not np.all(np.isfinite(self.acc)):
            return None
        out: F64 = self.acc
        self.acc = None  # the result takes the accumulator over: no second copy
        out /= math.sqrt(self.shape[0] * self.shape[1])
        return out


class SketchWork:
    """Work for the read pass: sketches many tensor spans of one file as chunks arrive."""

    def __init__(self, jobs: Sequence[SketchJob]) -> None:
        self.jobs = list(jobs)
        self._order = sorted(self.jobs, key=lambda j: j.start)
        self._next = 0
        self._active: list[SketchJob] = []

    def __call__(self, off: int, view: memoryview) -> None:
        end = off + len(view)
        while self._next < len(self._order) and self._order[self._next].start < end:
            self._active.append(self._order[self._next])
            self._next += 1
        still: list[SketchJob] = []
        for job in self._active:
            stop = job.start + job.length
            lo, hi = max(job.start, off), min(stop, end)
            if hi > lo:
                job.feed(view[lo - off : hi - off])
            if stop > end:
                still.append(job)
        self._active = still

    def cost(self, size: int) -> float:
        """Relative CPU cost of this work per byte of a file of ``size`` bytes."""
        return sum(j.length * j.decoder.cost for j in self.jobs) / max(1, size)


def decoder_for(dtype: str, shape: Sequence[int]) -> tuple[Decoder, tuple[int, int]] | str:
    """The decoder and matrix shape for a tensor, or the reason it is not sketched."""
    mn = matrix_shape(shape)
    if mn is None:
        return "shape"
    if mn[0] + mn[1] > MAX_SKETCH_SIDE:
        return "too large to sketch"
    dec = DECODERS.get(dtype)
    if dec is None:
        return dtype
    if mn[1] % dec.block:
        return f"{dtype} rows"
    return dec, mn
