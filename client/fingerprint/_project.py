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

import functools
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import blake3
import numpy as np
import numpy.typing as npt

from modelhash.fingerprint._dequant import DECODERS, Decoder

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


def _signs(tag: bytes, m: int, n: int, length: int) -> F32:
    """K x length random signs, from BLAKE3 XOF output of the seed."""
    seed = _DOMAIN + tag + struct.pack("<QQQ", K, m, n)
    raw = blake3.blake3(seed).digest(length=(K * length + 7) // 8)
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")[: K * length]
    out: F32 = (1.0 - 2.0 * bits.astype(np.float32)).reshape(K, length)
    return out


@functools.lru_cache(maxsize=128)
def projections(m: int, n: int) -> tuple[F32, F32]:
    """A (K x m) and Bᵀ (n x K) for matrices of shape (m, n); cached per shape."""
    a = _signs(b"rows", m, n, m)
    bt = np.ascontiguousarray(_signs(b"cols", m, n, n).T)
    a.flags.writeable = False
    bt.flags.writeable = False
    return a, bt


def project(w: npt.NDArray[np.floating[Any]]) -> F64:
    """The sketch of one matrix (any float dtype), in float64."""
    m, n = w.shape
    a, bt = projections(m, n)
    s = a.astype(np.float64) @ (w.astype(np.float64) @ bt.astype(np.float64))
    out: F64 = s / math.sqrt(m * n)
    return out


def project_factors(up: F64, down: F64, scale: float) -> F64:
    """The sketch of ``scale * up @ down`` without forming the product."""
    m, n = up.shape[0], down.shape[1]
    a, bt = projections(m, n)
    s = (a.astype(np.float64) @ up) @ (down @ bt.astype(np.float64))
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
    acc: F64 = field(default_factory=lambda: np.zeros((K, K)))
    rows_done: int = 0
    pending: bytearray = field(default_factory=bytearray)
    targets: npt.NDArray[np.intp] | None = None
    """Row of ``shape`` that each stored row is (a row block of a fused matrix, or
    rows stored permuted); None when stored row i is row i of the whole matrix."""
    scale: Callable[[int, int], F32] | None = None
    """Factor for this job's stored rows ``i:i+count`` (scaled fp8), or None."""

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
        # Blocks small enough to stay in cache between decoding and projecting.
        # Hostile or corrupt bytes may decode to inf/NaN; result() rejects those.
        with np.errstate(all="ignore"):
            for i in range(0, rows, step):
                j = min(rows, i + step)
                x = self.decoder.fn(np.frombuffer(raw[i * rb : j * rb], dtype=np.uint8))
                if self.scale is not None:
                    x = (x.reshape(-1, n) * self.scale(r0 + i, j - i)).astype(np.float32)
                cols = a[:, r0 + i : r0 + j] if self.targets is None else a[
                    :, self.targets[r0 + i : r0 + j]
                ]
                self.acc += cols @ (x.reshape(-1, n) @ bt)
        self.rows_done += rows

    def result(self) -> F64 | None:
        """The finished sketch, or None if rows are missing or a value is not finite."""
        rows = self.shape[0] if self.targets is None else len(self.targets)
        if self.rows_done != rows or self.pending:
            return None
        if not np.all(np.isfinite(self.acc)):
            return None
        out: F64 = self.acc / math.sqrt(self.shape[0] * self.shape[1])
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
    dec = DECODERS.get(dtype)
    if dec is None:
        return dtype
    if mn[1] % dec.block:
        return f"{dtype} rows"
    return dec, mn
