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
whole rows as the chunks arrive; a row cut by a chunk boundary (or longer than
:data:`TILE`) is carried as its partial product ``W[r, :c] @ Bᵀ[:c]`` (K numbers),
never as bytes. What a tensor holds between chunks is therefore K x K + K numbers
and less than one quantisation block of bytes, whatever its size. The sign
matrices are generated in tiles of :data:`TILE` columns (the XOF can seek) and
shared through one cache of at most :data:`CACHE_BYTES`. Memory of the sketch
layer is thus bounded by that cache, one decoded row block (at most
``max(BLOCK_ELEMENTS, MIN_ROWS * TILE)`` float32 values) per lane, and O(K²) per
sketched tensor.

A job may hold only some rows of the matrix it sketches, in any order: a row piece
of a fused matrix, or rows a converter permuted (``targets`` says which row each
stored row is; A's columns for them are gathered from the tiles). It may also scale
each decoded element by its row's (or block's) factor first (scaled fp8), so the
sketch is of the real weights whatever the cuts.
"""

from __future__ import annotations

import math
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import blake3
import numpy as np
import numpy.typing as npt

from modelhash.fingerprint._dequant import DECODERS, Decoder
from modelhash.fingerprint._limits import MAX_SKETCH_CACHE_BYTES, MAX_SKETCH_SIDE

__all__ = [
    "MIN_ELEMENTS",
    "MIN_ROWS",
    "TILE",
    "K",
    "Projection",
    "SketchJob",
    "SketchWork",
    "matrix_shape",
    "merged",
    "project",
    "project_factors",
    "projections",
]

K = 16
MIN_ELEMENTS = 256
BLOCK_ELEMENTS = 1 << 18
"""Elements per row block when rows are short (1 MiB of float32, decoded and projected
while in cache; larger blocks cost less interpreter time per byte)."""
MIN_ROWS = 32
"""Rows per block at least (for rows up to :data:`TILE`), so reading Bᵀ is amortised."""
TILE = 1 << 16
"""Columns per generated tile of a sign matrix (K x 65536 float32: 4 MiB)."""
CACHE_BYTES = 64 * 1024 * 1024
"""The most memory the sign tiles take together."""
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


_SIGN_CHUNK_BITS = 1 << 20
_COLUMN_BLOCK = 1 << 16


def _signs(tag: bytes, m: int, n: int, length: int, *, transposed: bool = False) -> F32:
    """K x length random signs from BLAKE3 XOF output of the seed (length x K if
    ``transposed``), generated a bounded chunk of bits at a time."""
    seed = blake3.blake3(_seed(tag, m, n))
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


class _TileCache:
    """Sign tiles by (side, m, n, tile), least recently used out past CACHE_BYTES.

    Holders never keep a tile beyond one block, so the limit bounds the memory even
    for a hostile file with thousands of distinct shapes (it then only costs time).
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._items: OrderedDict[tuple[bytes, int, int, int], F32] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, tag: bytes, m: int, n: int, tile: int) -> F32:
        """Tile ``tile`` of A (``rows``: K x w) or of Bᵀ (``cols``: w x K)."""
        key = (tag, m, n, tile)
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit
        length = m if tag == b"rows" else n
        if length <= TILE:
            made = _signs(tag, m, n, length)
        else:
            made = _sign_slice(tag, m, n, length, tile * TILE, min(length, (tile + 1) * TILE))
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


_TILES = _TileCache(CACHE_BYTES)


class Projection:
    """A (K x m) and Bᵀ (n x K) for one shape, handed out in slices from shared tiles.

    Nothing is held between calls, so no shape, hostile or not, makes it keep more
    than the tile cache's limit.
    """

    def __init__(self, m: int, n: int) -> None:
        self.m, self.n = m, n

    def _side(self, tag: bytes, j0: int, j1: int) -> F32:
        t0, t1 = j0 // TILE, (j1 - 1) // TILE
        axis = 1 if tag == b"rows" else 0
        if t0 == t1:  # the usual case, once per row block: one slice of one tile
            tile = _TILES.get(tag, self.m, self.n, t0)
            lo, hi = j0 - t0 * TILE, j1 - t0 * TILE
            return tile[:, lo:hi] if axis == 1 else tile[lo:hi]
        pieces = []
        for t in range(t0, t1 + 1):
            tile = _TILES.get(tag, self.m, self.n, t)
            lo, hi = max(j0, t * TILE) - t * TILE, min(j1, (t + 1) * TILE) - t * TILE
            pieces.append(tile[:, lo:hi] if axis == 1 else tile[lo:hi])
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=axis)

    def rows(self, r0: int, r1: int) -> F32:
        """``A[:, r0:r1]``."""
        return self._side(b"rows", r0, r1)

    def cols(self, c0: int, c1: int) -> F32:
        """``Bᵀ[c0:c1, :]``."""
        return self._side(b"cols", c0, c1)

    def take(self, index: npt.NDArray[np.intp]) -> F32:
        """``A[:, index]`` for any rows (a fused matrix's row block, permuted rows),
        gathered tile by tile so no more than the touched tiles are made."""
        out: F32 = np.empty((K, len(index)), dtype=np.float32)
        tiles = index // TILE
        for t in np.unique(tiles):
            sel = tiles == t
            out[:, sel] = _TILES.get(b"rows", self.m, self.n, int(t))[:, index[sel] - t * TILE]
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

    For matrices already in memory (an adapter's factors); the read pass uses
    :class:`Projection`, which bounds memory for any shape.

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
    """One tensor (or one stripe of it) to sketch: where its bytes are, how to decode
    them, its matrix shape.

    The tensor is cut into *row blocks* of about :data:`BLOCK_ELEMENTS` elements,
    always whole rows (one row when a row is longer). A job sees the bytes of every
    block, or, when it is stripe ``s`` of ``S``, of the blocks ``b`` with
    ``b % S == s`` only; the stripes of a tensor run on different lanes of the pass
    and their sums add up (:func:`merged`), since S is linear. Bytes may arrive in
    pieces of any size; the result does not depend on the cuts (up to rounding).
    """

    index: int
    start: int
    length: int
    decoder: Decoder
    shape: tuple[int, int]
    stripe: int = 0
    stripes: int = 1
    acc: F64 | None = None
    """The sum so far; made with the first data, so a stripe or a tensor that never
    gets bytes costs no array."""
    done: int = 0
    """Elements folded in so far."""
    pos: int = 0
    """The element the next byte belongs to."""
    row: F32 | None = None
    """``W[r, :c] @ Bᵀ[:c]`` for the row ``r`` in progress, ``c`` elements in."""
    carry: bytearray = field(default_factory=bytearray)
    """The bytes of a quantisation block not yet complete (< ``decoder.size``)."""
    targets: npt.NDArray[np.intp] | None = None
    """Row of ``shape`` that each stored row is (a row block of a fused matrix, or
    rows stored permuted); None when stored row i is row i of the whole matrix."""
    scale: Callable[[int, int], F32] | None = None
    """Factor for this job's stored rows ``i:i+count``, broadcastable to (count, n)
    (scaled fp8), or None."""
    transposed: bool = False
    """The stored matrix is the transpose of the module it sketches (``shape`` is
    the stored one): stored rows take B's signs and stored columns A's, and the
    result is transposed back, so S is the module's own, S(Wᵀᵀ) = A W Bᵀ."""
    _proj: Projection | None = None

    @property
    def stored_rows(self) -> int:
        """Rows of the matrix whose bytes this job (all its stripes) takes."""
        return self.shape[0] if self.targets is None else len(self.targets)

    @property
    def canonical_shape(self) -> tuple[int, int]:
        """The shape of the module sketched (the stored shape, or its transpose)."""
        m, n = self.shape
        return (n, m) if self.transposed else (m, n)

    def _b(self, c0: int, c1: int) -> F32:
        """The rows of Bᵀ for stored columns ``c0:c1``."""
        assert self._proj is not None
        return self._proj.rows(c0, c1).T if self.transposed else self._proj.cols(c0, c1)

    def _a(self, r0: int, r1: int) -> F32:
        """The columns of A for stored rows ``r0:r1``."""
        assert self._proj is not None
        if self.transposed:
            return self._proj.cols(r0, r1).T
        if self.targets is None:
            return self._proj.rows(r0, r1)
        return self._proj.take(self.targets[r0:r1])

    def _scaled(self, x: F32, r: int, count: int, c0: int = 0) -> F32:
        """Elements of stored rows ``r:r+count`` from column ``c0`` (``x`` is
        (count, w)), times their scale factors."""
        if self.scale is None:
            return x
        n = self.shape[1]
        f = np.broadcast_to(self.scale(r, count), (count, n))[:, c0 : c0 + x.shape[1]]
        out: F32 = (x * f).astype(np.float32)
        return out

    @property
    def block_rows(self) -> int:
        """Rows per row block."""
        n = self.shape[1]
        return max(BLOCK_ELEMENTS // n, MIN_ROWS) if n <= TILE else 1

    @property
    def block_bytes(self) -> int:
        """Bytes of one row block."""
        return self.block_rows * self.shape[1] // self.decoder.block * self.decoder.size

    @property
    def share(self) -> int:
        """Bytes of the tensor this job is fed: all of them, or its stripe's blocks."""
        if self.stripes == 1:
            return self.length
        bb = self.block_bytes
        full, rest = divmod(self.length, bb)
        count = (full - self.stripe + self.stripes - 1) // self.stripes if full > self.stripe else 0
        last = rest if rest and full % self.stripes == self.stripe else 0
        return count * bb + last

    def _segment(self) -> int:
        """Elements from ``pos`` to the next cut: the end of the row block, or for a
        row longer than :data:`TILE`, the end of the current tile of the row."""
        n = self.shape[1]
        if n <= TILE:
            per = self.block_rows * n
            return per - self.pos % per
        c = self.pos % n
        return min(n, (c // TILE + 1) * TILE) - c

    def feed(self, piece: memoryview, at: int | None = None) -> None:
        """Take bytes of the tensor starting at byte ``at`` of it (default: where the
        last piece ended); fold every complete quantisation block into the sketch."""
        # Hostile or corrupt bytes may decode to inf/NaN; merged() rejects those.
        with np.errstate(all="ignore"):
            self._feed(piece, at)

    def _feed(self, piece: memoryview, at: int | None = None) -> None:
        """:meth:`feed`, with numpy's floating-point warnings already off."""
        size, block = self.decoder.size, self.decoder.block
        if at is not None and not self.carry:
            self.pos = at // size * block
        if self.carry:
            need = size - len(self.carry)
            self.carry += piece[:need]
            piece = piece[need:]
            if len(self.carry) < size:
                return
            self._elements(memoryview(bytes(self.carry)))
            self.carry.clear()
        whole = len(piece) // size * size
        # Cut at row-block (or tile) boundaries: a block stays in cache between
        # decoding and projecting, and holds whole rows except where a piece ends.
        i = 0
        while i < whole:
            j = min(whole, i + self._segment() // block * size)
            self._elements(piece[i:j])
            i = j
        if whole < len(piece):
            self.carry += piece[whole:]

    def _elements(self, raw: memoryview) -> None:
        """Fold decoded elements lying within one segment (see :meth:`_segment`)."""
        n = self.shape[1]
        if self._proj is None:
            self._proj = Projection(*self.canonical_shape)
        if self.acc is None or self.row is None:
            self.acc, self.row = np.zeros((K, K)), np.zeros(K, dtype=np.float32)
        x = self.decoder.fn(np.frombuffer(raw, dtype=np.uint8))
        total = len(x)
        r, c = divmod(self.pos, n)
        at = 0
        if c or total < n:
            k = min(total, n - c)
            self.row += self._scaled(x[None, :k], r, 1, c)[0] @ self._b(c, c + k)
            at = k
            if c + k == n:
                self.acc += np.outer(self._a(r, r + 1)[:, 0], self.row)
                self.row[:] = 0
                r += 1
        rows = (total - at) // n
        if rows:
            block = x[at : at + rows * n].reshape(rows, n)
            if self.scale is not None:
                block = self._scaled(block, r, rows)
            self.acc += self._a(r, r + rows) @ (block @ self._b(0, n))
            at += rows * n
            r += rows
        if at < total:
            self.row += self._scaled(x[None, at:], r, 1)[0] @ self._b(0, total - at)
        self.pos += total
        self.done += total
        if self.pos >= self.stored_rows * n:
            self._proj = None

    def result(self) -> F64 | None:
        """The finished sketch of an unstriped job (see :func:`merged`)."""
        return merged([self])


def merged(parts: Sequence[SketchJob]) -> F64 | None:
    """The sketch of a tensor (or of its stored rows) from its stripes' jobs, or None
    if elements are missing or a value is not finite."""
    m, n = parts[0].shape
    if sum(j.done for j in parts) != parts[0].stored_rows * n or any(j.carry for j in parts):
        return None
    acc = np.zeros((K, K))
    for j in parts:
        if j.acc is not None:
            acc += j.acc
    if not np.all(np.isfinite(acc)):
        return None
    out: F64 = acc / math.sqrt(m * n)
    return np.ascontiguousarray(out.T) if parts[0].transposed else out


class SketchWork:
    """Work for the read pass: sketches many tensor spans of one file as chunks arrive.

    Jobs that are stripes (``stripes > 1``) take only the row blocks of their stripe.
    ``before`` sees each chunk first (it keeps bytes that jobs read back, such as a
    weight's scale, within the same lane).
    """

    def __init__(
        self, jobs: Sequence[SketchJob], before: Callable[[int, memoryview], None] | None = None
    ) -> None:
        self.jobs = list(jobs)
        self._before = before
        self._order = sorted(self.jobs, key=lambda j: j.start)
        self._next = 0
        self._active: list[SketchJob] = []

    def __call__(self, off: int, view: memoryview) -> None:
        if self._before is not None:
            self._before(off, view)
        # Hostile or corrupt bytes may decode to inf/NaN; merged() rejects those.
        with np.errstate(all="ignore"):
            self._call(off, view)

    def _call(self, off: int, view: memoryview) -> None:
        end = off + len(view)
        while self._next < len(self._order) and self._order[self._next].start < end:
            self._active.append(self._order[self._next])
            self._next += 1
        still: list[SketchJob] = []
        for job in self._active:
            stop = job.start + job.length
            lo, hi = max(job.start, off), min(stop, end)
            if hi > lo:
                if job.stripes == 1:
                    job._feed(view[lo - off : hi - off])
                else:
                    _feed_stripe(job, view, off, lo, hi)
            if stop > end:
                still.append(job)
        self._active = still

    def cost(self, size: int) -> float:
        """Relative CPU cost of this work per byte of a file of ``size`` bytes."""
        return sum(j.share * j.decoder.cost for j in self.jobs) / max(1, size)


def _feed_stripe(job: SketchJob, view: memoryview, off: int, lo: int, hi: int) -> None:
    """Feed ``job`` the parts of file bytes ``lo:hi`` that lie in its stripe's blocks."""
    bb = job.block_bytes
    first = (lo - job.start) // bb
    b = first + (job.stripe - first) % job.stripes
    while True:
        s = max(lo, job.start + b * bb)
        e = min(hi, job.start + (b + 1) * bb)
        if s >= hi:
            return
        if e > s:
            job._feed(view[s - off : e - off], at=s - job.start)
        b += job.stripes


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
