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

:class:`SketchWork` accumulates ``S += A[:, rows] @ (W[rows] @ Bᵀ)`` over blocks of
whole rows as the chunks arrive; a row cut by a block boundary is carried as its
partial product ``W[r, :c] @ Bᵀ[:c]`` (K numbers), never as bytes. What a tensor
holds between chunks is therefore K x K + K numbers and less than one quantisation
block of bytes, whatever its size. The sign matrices of a dimension up to
:data:`FULL_DIM` are kept (in a cache of at most :data:`CACHE_BYTES`); longer ones
are generated slice by slice from the XOF, which can seek. Memory of the sketch
layer is thus bounded by a constant plus O(K²) per sketched tensor.
"""

from __future__ import annotations

import functools
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

__all__ = [
    "MIN_ELEMENTS",
    "K",
    "Projection",
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
FULL_DIM = 1 << 16
"""Sign matrices up to this many columns are kept whole (K x 65536 float32: 4 MiB)."""
CACHE_BYTES = 64 * 1024 * 1024
"""The most memory the kept sign matrices take together."""
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


def _seed(tag: bytes, m: int, n: int) -> bytes:
    return _DOMAIN + tag + struct.pack("<QQQ", K, m, n)


def _signs(tag: bytes, m: int, n: int, length: int) -> F32:
    """K x length random signs, from BLAKE3 XOF output of the seed."""
    raw = blake3.blake3(_seed(tag, m, n)).digest(length=(K * length + 7) // 8)
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")[: K * length]
    out: F32 = (1.0 - 2.0 * bits.astype(np.float32)).reshape(K, length)
    return out


def _sign_slice(tag: bytes, m: int, n: int, length: int, j0: int, j1: int) -> F32:
    """Columns ``j0:j1`` of ``_signs(tag, m, n, length)``, without computing the rest.

    Sign (k, j) is bit ``k * length + j`` of the XOF output, so each row of the
    slice is one seek into the stream.
    """
    xof = blake3.blake3(_seed(tag, m, n))
    w = j1 - j0
    out: F32 = np.empty((K, w), dtype=np.float32)
    for k in range(K):
        b0 = k * length + j0
        first = b0 // 8
        raw = xof.digest(length=(b0 + w + 7) // 8 - first, seek=first)
        bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")
        out[k] = 1.0 - 2.0 * bits[b0 - first * 8 : b0 - first * 8 + w].astype(np.float32)
    return out


class _SideCache:
    """Whole sign matrices by (side, m, n), least recently used out past CACHE_BYTES."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._items: OrderedDict[tuple[bytes, int, int], F32] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, tag: bytes, m: int, n: int) -> F32:
        key = (tag, m, n)
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit
        made = _signs(tag, m, n, m if tag == b"rows" else n)
        if tag == b"cols":
            made = np.ascontiguousarray(made.T)
        made.flags.writeable = False
        with self._lock:
            if key not in self._items:
                self._items[key] = made
                self._bytes += made.nbytes
            while self._bytes > self._limit and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.nbytes
        return made


_SIDES = _SideCache(CACHE_BYTES)


class Projection:
    """A (K x m) and Bᵀ (n x K) for one shape, handed out in slices.

    A side of at most :data:`FULL_DIM` is taken from the shared cache; a longer one
    is generated per slice, so no hostile shape can make it allocate K x 10⁹ signs.
    """

    def __init__(self, m: int, n: int) -> None:
        self.m, self.n = m, n
        self._a = _SIDES.get(b"rows", m, n) if m <= FULL_DIM else None
        self._bt = _SIDES.get(b"cols", m, n) if n <= FULL_DIM else None

    def rows(self, r0: int, r1: int) -> F32:
        """``A[:, r0:r1]``."""
        if self._a is not None:
            return self._a[:, r0:r1]
        return _sign_slice(b"rows", self.m, self.n, self.m, r0, r1)

    def cols(self, c0: int, c1: int) -> F32:
        """``Bᵀ[c0:c1, :]``."""
        if self._bt is not None:
            return self._bt[c0:c1]
        return np.ascontiguousarray(_sign_slice(b"cols", self.m, self.n, self.n, c0, c1).T)


@functools.lru_cache(maxsize=128)
def projections(m: int, n: int) -> tuple[F32, F32]:
    """A (K x m) and Bᵀ (n x K) for matrices of shape (m, n); cached per shape.

    For matrices already in memory (an adapter's factors); the read pass uses
    :class:`Projection`, which bounds memory for any shape.
    """
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
    """One tensor to sketch: where its bytes are, how to decode them, its matrix shape.

    Bytes may arrive in pieces of any size; the result does not depend on the cuts
    (up to float rounding).
    """

    index: int
    start: int
    length: int
    decoder: Decoder
    shape: tuple[int, int]
    acc: F64 = field(default_factory=lambda: np.zeros((K, K)))
    done: int = 0
    """Elements consumed so far."""
    row: F32 = field(default_factory=lambda: np.zeros(K, dtype=np.float32))
    """``W[r, :c] @ Bᵀ[:c]`` for the row ``r`` in progress, ``c`` elements in."""
    carry: bytearray = field(default_factory=bytearray)
    """The bytes of a quantisation block not yet complete (< ``decoder.size``)."""
    _proj: Projection | None = None

    def feed(self, piece: memoryview) -> None:
        """Take the next bytes of the tensor; fold every complete block into the sketch."""
        size = self.decoder.size
        if self.carry:
            need = size - len(self.carry)
            self.carry += piece[:need]
            piece = piece[need:]
            if len(self.carry) < size:
                return
            self._elements(memoryview(bytes(self.carry)))
            self.carry.clear()
        whole = len(piece) // size * size
        # Blocks small enough to stay in cache between decoding and projecting.
        step = max(1, BLOCK_ELEMENTS // self.decoder.block) * size
        for i in range(0, whole, step):
            self._elements(piece[i : min(whole, i + step)])
        if whole < len(piece):
            self.carry += piece[whole:]

    def _elements(self, raw: memoryview) -> None:
        m, n = self.shape
        if self._proj is None:
            self._proj = Projection(m, n)
        p = self._proj
        # Hostile or corrupt bytes may decode to inf/NaN; result() rejects those.
        with np.errstate(all="ignore"):
            x = self.decoder.fn(np.frombuffer(raw, dtype=np.uint8))
            total = len(x)
            r, c = divmod(self.done, n)
            pos = 0
            if c:
                k = min(total, n - c)
                self.row += x[:k] @ p.cols(c, c + k)
                pos = k
                if c + k == n:
                    self.acc += np.outer(p.rows(r, r + 1)[:, 0], self.row)
                    self.row[:] = 0
                    r += 1
            rows = (total - pos) // n
            if rows:
                block = x[pos : pos + rows * n].reshape(rows, n)
                self.acc += p.rows(r, r + rows) @ (block @ p.cols(0, n))
                pos += rows * n
            if pos < total:
                self.row += x[pos:] @ p.cols(0, total - pos)
        self.done += total

    def result(self) -> F64 | None:
        """The finished sketch, or None if elements are missing or a value is not finite."""
        m, n = self.shape
        if self.done != m * n or self.carry:
            return None
        if not np.all(np.isfinite(self.acc)):
            return None
        out: F64 = self.acc / math.sqrt(m * n)
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
