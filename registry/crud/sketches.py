"""The sketch layer on the registry side: store flag and base sketches, find matches.

Storage. A reference base keeps its raw (``model``) sketch. A flagged model's sketch
is stored as its **delta** from the nearest base (``kind = delta``, ``base_id``
set), found with :func:`~modelhash.fingerprint._similarity.delta_sketch`, if one is
within ``THRESHOLDS.base_distance``; otherwise raw. An adapter (``lora``) is stored
as sent, with ``base_id`` the base whose modules it covers, if any.

Retrieval, two paths, then verification:

- **Signature bank (delta and adapter flags).** Each stored sketch that has a base
  also stores a :func:`signature`: its per-tensor deltas, made orthogonal to the
  base's tensor (as the verifier does), count-sketched into :data:`SIG_BITS`
  buckets, mixed by a Walsh-Hadamard transform, and kept as sign bits (SimHash,
  512 bytes) with the projected norm. Adapters are signed over the base modules
  they cover, and adapters covering the same modules share a bank, so an upload is
  compared with them on those modules only, as the verifier does; otherwise the
  upload's changes elsewhere would dilute the score of a LoRA baked into a
  fine-tune. An adapter is not tied to the base it was filed under: a checkpoint
  is compared with it relative to the checkpoint's own nearest base, when that
  base has the adapter's modules. Each process keeps every bank in memory
  (refreshed from the table when its max id or row count changes), computes the
  upload's signature once per bank and scans the bank with XOR and popcount: the
  Hamming distance gives the cosine (standard error about 0.025), the norms the
  coefficient. It keeps the :data:`TOP_K` best cosines, and the best among rows
  whose coefficient says the upload could carry all of their delta
  (:data:`CARRIED_WINDOW`).

  The scan is linear in the flags on a base, by design. Matches worth reporting
  sit at delta cosines of 0.1-0.4 from the flag, and unrelated flags at 0 ± the
  noise: at such low similarity every known index (LSH banding, IVF, graphs)
  must probe a large share of the rows to keep recall near 1. A simulation with
  100k random signatures (Voronoi LSH, 16 tables, multi-probe) needed 75 % of the
  rows as candidates for 99 % recall at cosine 0.3. 512 bytes of bits per row and
  a popcount make the scan about 13 ms per 100k flags on one core, which is
  cheaper than the candidate lists such an index would produce.
- **LSH bands (raw and adapter flags).** :meth:`Sketch.band_keys` rows in
  ``sketch_band``, indexed: the flags sharing a band with the upload, most bands
  first. Sign bits only keep pairs at high cosine, which is what a raw
  near-duplicate (or the same adapter re-saved) is.
- **Invariant layer.** For a model upload whose sketch delta from its base is thin
  (units permuted, residual stream rotated, scales moved), the base is found by
  spectra and every delta flag on it that carries the invariant layer is verified
  (:func:`_invariant_scan`, linear in that base's flags). Raw model flags (filed
  with no base near them, and not re-based since) are in no bank, and a disguised
  copy shares no band with them: the index keeps their spectra, grouped by the
  matrices they measure (:class:`RawSpectra`, about 11 KB per SD-sized model, read
  from ``sketch_spectra``, where each is stored beside its blob), and
  a model upload carrying the layer is compared with all of them at once (float32,
  3-7 ms per 1000 SD-sized flags); the few within
  :data:`RAW_SPECTRAL_MARGIN` times the copy rule's distance are verified
  (:func:`_raw_invariant_scan`). A flag re-based on a base registered after it
  leaves that index: its delta row, which keeps the invariant layer, takes over.

Each candidate is then verified with :func:`modelhash.fingerprint._similarity.match`,
the code the client ships. A stored blob that does not parse, or a verifier that
raises, is logged and skipped: it never fails a check.
"""

from __future__ import annotations

import functools
import logging
import math
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import blake3
import numpy as np
import numpy.typing as npt
from sqlalchemy import ColumnElement, Engine, func
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from modelhash.fingerprint._invariant import Spectra, comparable
from modelhash.fingerprint._robust import INVARIANT_THRESHOLDS, trusted
from modelhash.fingerprint._robust import base_distance as spectral_distance
from modelhash.fingerprint._similarity import (
    THRESHOLDS,
    Thresholds,
    calibrated,
    compare,
    delta_sketch,
    scored,
    shared_direction,
    storage_copy,
)
from modelhash.fingerprint._similarity import Match as Verdict
from modelhash.fingerprint._similarity import match as verify
from modelhash.fingerprint._sketch import (
    Sketch,
    TensorSketch,
    blob_spectra,
)
from modelhash.registry.crud._stacked import Stacked, pooled_cosine, stack_blob, stack_sketch
from modelhash.registry.errors import ReferenceBaseConflict
from modelhash.registry.models import (
    Flag,
    ReferenceBase,
    SketchBand,
    SketchRow,
    SketchSignature,
    SketchSpectra,
)

__all__ = [
    "CARRIED_WINDOW",
    "FLOOR",
    "RAW_MODEL_FLAG",
    "RAW_SPECTRAL_MARGIN",
    "SIG_BITS",
    "SIG_BYTES",
    "TOP_K",
    "BankView",
    "PreparedSketch",
    "RawSpectra",
    "SharedDirections",
    "Signature",
    "SketchHit",
    "SketchIndex",
    "Snapshot",
    "blob_spectra",
    "estimate",
    "find_matches",
    "index_for",
    "is_raw_model_flag",
    "keys_digest",
    "lora_keys",
    "prepare_flag_sketch",
    "raw_model_flag",
    "rebase_flag_sketches",
    "retrieve",
    "signature",
    "spectra_fields",
    "store_base_sketch",
    "store_flag_sketch",
]

_log = logging.getLogger("modelhash.registry")

SIG_BITS = 4096
"""Bits in a stored signature: 512 bytes per flag sketch."""
SIG_BYTES = SIG_BITS // 8
TOP_K = 16
"""Candidates kept per bank by cosine, and again among plausible carriers (see below)."""
FLOOR = 0.05
"""Lowest estimated cosine still worth verifying. Near cosine 0 the estimate's
standard error is about π / (2√SIG_BITS) ≈ 0.025, so a delta at the lowest cosine
any verdict accepts (0.1, for a carrier of the whole flagged delta) clears it with
probability about 0.98, and one at the cosine threshold (0.3) always does."""
CARRIED_WINDOW = (0.4, 2.5)
"""Estimated coefficients of a possible carrier of the whole flagged delta.

The carried rule accepts coefficients 0.7-1.5 at cosines down to 0.1; there the
estimate is rough (its error is the cosine's error times ‖upload‖/‖flag‖), so the
window is wide. Flags inside it get their own top-k, so a carrier at cosine 0.15
is not crowded out by many unrelated flags at 0.2 with the wrong coefficient."""
RECOUNT_SECONDS = 5.0
"""How stale the row count behind the in-memory index may get (see ``refresh``)."""
PREFILTER_MARGIN = 0.5
"""A delta candidate whose exact pooled cosine is below this share of the lowest
cosine any delta verdict accepts is not sent to the full verifier."""
LORA_COVERAGE = 0.5
"""Share of an adapter's modules a base must have (same key and shape) to be its base."""
RAW_SPECTRAL_MARGIN = 2.0
"""A raw flag is verified on its invariant layer when the upload's spectra are within
this multiple of the copy rule's raw distance
(:attr:`~modelhash.fingerprint._robust.InvariantThresholds.raw_distance`) of its
own, measured over the matrices that pair by key. The distance is exact over those
matrices; the margin covers the matrices the verifier goes on to pair by spectrum
within a shape (those whose keys did not pair), which move its pooled distance."""

_SIG_DOMAIN = b"modelhash/registry/signature/v2\x00"
_SCAN_ROWS = 4096
_RAW_BATCH = 512
F32 = npt.NDArray[np.float32]
U64 = npt.NDArray[np.uint64]


@functools.lru_cache(maxsize=8192)
def _plan(key: str, shape: tuple[int, int], size: int) -> tuple[npt.NDArray[np.intp], F32]:
    """Bucket and sign of each of a tensor's ``size`` sketch values, seeded by key and shape."""
    seed = _SIG_DOMAIN + struct.pack("<QQQ", size, *shape) + key.encode("utf-8")
    raw = np.frombuffer(blake3.blake3(seed).digest(length=3 * size), dtype=np.uint8)
    buckets = (raw[:size].astype(np.intp) * 256 + raw[size : 2 * size]) % SIG_BITS
    signs = (1.0 - 2.0 * (raw[2 * size :] & 1)).astype(np.float32)
    return buckets, signs


@functools.cache
def _mix_signs() -> npt.NDArray[np.float64]:
    raw = np.frombuffer(blake3.blake3(_SIG_DOMAIN + b"mix").digest(length=SIG_BITS), np.uint8)
    out: npt.NDArray[np.float64] = (1.0 - 2.0 * (raw & 1)).astype(np.float64)
    return out


def _hadamard(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Orthonormal Walsh-Hadamard transform of a vector whose length is a power of 2."""
    n = len(x)
    h = 1
    while h < n:
        y = x.reshape(-1, 2, h)
        x = np.stack((y[:, 0] + y[:, 1], y[:, 0] - y[:, 1]), axis=1).reshape(n)
        h *= 2
    out: npt.NDArray[np.float64] = x / math.sqrt(n)
    return out


def _orthogonal(d: npt.NDArray[np.float64], b: TensorSketch | None) -> npt.NDArray[np.float64]:
    if b is None or b.values.size != d.size:
        return d
    bv = b.values.reshape(-1)
    nb = float(bv @ bv)
    if nb == 0:
        return d
    out: npt.NDArray[np.float64] = d - (float(d @ bv) / nb) * bv
    return out


@dataclass(frozen=True)
class Signature:
    """A retrieval signature: SimHash sign bits of a projected delta, and its norm."""

    bits: bytes
    norm: float

    def words(self) -> U64:
        return np.frombuffer(self.bits, dtype="<u8").astype(np.uint64)


def signature(delta: Sketch, base: Sketch, keys: frozenset[str] | None = None) -> Signature | None:
    """The retrieval signature of a ``delta`` or ``lora`` sketch relative to ``base``.

    Per scored tensor (only those in ``keys``, if given; never the VAE, see
    :data:`~modelhash.fingerprint._similarity.NOT_SCORED`): the delta minus its projection on
    the base's tensor of the same key, as the verifier computes it; each value added
    with a seeded sign into one of :data:`SIG_BITS` buckets (a count sketch, which
    keeps inner products), then mixed by seeded signs and a Walsh-Hadamard
    transform, so each coordinate is a sum over the whole delta and close to normal.
    The bits are the coordinates' signs: two signatures that differ in h bits
    estimate the cosine of the two deltas as cos(πh / SIG_BITS) (SimHash), and the
    norm, with it, the coefficient. None when the delta is zero or empty.
    """
    parts: list[npt.NDArray[np.float64]] = []
    idx: list[npt.NDArray[np.intp]] = []
    sgn: list[F32] = []
    for key, t in delta.tensors.items():
        if (keys is not None and key not in keys) or not scored(key):
            continue
        v = _orthogonal(t.values.reshape(-1), base.tensors.get(key))
        b, s = _plan(key, t.shape, v.size)
        parts.append(v)
        idx.append(b)
        sgn.append(s)
    if not parts:
        return None
    vec = np.bincount(
        np.concatenate(idx), weights=np.concatenate(parts) * np.concatenate(sgn),
        minlength=SIG_BITS,
    )
    norm = float(np.linalg.norm(vec))
    if not np.isfinite(norm) or norm == 0:
        return None
    mixed = _hadamard(vec * _mix_signs())
    bits = np.packbits(mixed > 0, bitorder="little").tobytes()
    return Signature(bits, norm)


def lora_keys(lora: Sketch, base: Sketch) -> frozenset[str]:
    """The modules of an adapter that ``base`` has (same key and shape)."""
    return frozenset(
        k for k, t in lora.tensors.items()
        if (b := base.tensors.get(k)) is not None and b.shape == t.shape
    )


def keys_digest(keys: frozenset[str]) -> str:
    """A short name for a set of module keys (a bank of adapters covering the same ones)."""
    return blake3.blake3("\n".join(sorted(keys)).encode("utf-8")).hexdigest(length=16)


def estimate(bits: U64, query: Signature) -> F32:
    """Estimated cosines of every row of ``bits`` with ``query`` (chunked SimHash)."""
    q = query.words()
    h = np.empty(len(bits), dtype=np.int32)
    for start in range(0, len(bits), _SCAN_ROWS):
        block = bits[start : start + _SCAN_ROWS]
        h[start : start + len(block)] = np.bitwise_count(block ^ q).sum(axis=1, dtype=np.int32)
    out: F32 = np.cos(h.astype(np.float32) * np.float32(math.pi / SIG_BITS))
    return out


def _lora_coverage(lora: Sketch, base: Sketch) -> float:
    return len(lora_keys(lora, base)) / len(lora) if len(lora) else 0.0


def _covers(base: Sketch, keys: frozenset[str], like: Sketch) -> bool:
    """Whether ``base`` has enough of ``keys`` with the shapes they have in ``like``."""
    hits = sum(
        1 for k in keys
        if (b := base.tensors.get(k)) is not None and (t := like.tensors.get(k)) is not None
        and b.shape == t.shape
    )
    return hits >= LORA_COVERAGE * len(keys)


class _Bank:
    """Growable signature rows (bits and norms) and the sketch id of each row."""

    def __init__(self) -> None:
        self.bits: U64 = np.zeros((0, SIG_BITS // 64), dtype=np.uint64)
        self.norms: F32 = np.zeros(0, dtype=np.float32)
        self.ids: npt.NDArray[np.int64] = np.zeros(0, dtype=np.int64)
        self.n = 0

    def extend(self, ids: npt.NDArray[np.int64], bits: U64, norms: F32) -> None:
        need = self.n + len(ids)
        if need > len(self.ids):
            cap = max(need, 2 * len(self.ids), 1024)
            b = np.zeros((cap, SIG_BITS // 64), dtype=np.uint64)
            b[: self.n] = self.bits[: self.n]
            m = np.zeros(cap, dtype=np.float32)
            m[: self.n] = self.norms[: self.n]
            i = np.zeros(cap, dtype=np.int64)
            i[: self.n] = self.ids[: self.n]
            self.bits, self.norms, self.ids = b, m, i
        if len(ids):
            self.bits[self.n : need] = bits
            self.norms[self.n : need] = norms
            self.ids[self.n : need] = ids
        self.n = need

    def view(self) -> BankView:
        return BankView(self.bits[: self.n], self.norms[: self.n], self.ids[: self.n])


@dataclass(frozen=True)
class BankView:
    """A consistent read-only view of one bank."""

    bits: U64
    norms: F32
    ids: npt.NDArray[np.int64]


RawKey = tuple[str, tuple[tuple[str, int, int, int], ...]]
"""(invariant algorithm, per measured matrix its key, rows, columns and values kept)."""


def raw_layout(spectra: Spectra) -> tuple[tuple[str, int, int, int], ...]:
    """The matrices a raw flag's spectra are indexed by: all but the factors of its
    products (:func:`~modelhash.fingerprint._robust.trusted`), as the copy rule
    compares them."""
    return tuple(sorted((k, *sp.shape, len(sp.values))
                        for k, sp in trusted(spectra).items.items()))


RAW_MODEL_FLAG: Final = (("owner_type", "flag"), ("kind", "model"), ("base_id", None))
"""What makes a sketch row a raw model flag: a flag's model sketch stored with no base
(filed with no base near it), whose spectra the index keeps (:class:`RawSpectra`).
The one definition: the index selects such rows with :func:`raw_model_flag`,
:func:`store_flag_sketch` writes their ``sketch_spectra`` row when
:func:`is_raw_model_flag`, and the migration that made that table backfilled it with
the same clauses."""
SPECTRA_ALGORITHM_CHARS = 64
"""Longest invariant algorithm name ``sketch_spectra`` holds (its column's width)."""


def raw_model_flag(columns: Any = None) -> list[ColumnElement[bool]]:
    """SQL conditions selecting the raw model flag rows (:data:`RAW_MODEL_FLAG`) of
    ``columns``: the ``sketch`` table's columns by name, those of :class:`SketchRow`
    by default (a migration passes its own view of the table)."""
    c = columns if columns is not None else {
        name: col(getattr(SketchRow, name)) for name, _ in RAW_MODEL_FLAG
    }
    return [c[name].is_(None) if value is None else c[name] == value
            for name, value in RAW_MODEL_FLAG]


def is_raw_model_flag(row: SketchRow) -> bool:
    """Whether a sketch row is a raw model flag (:data:`RAW_MODEL_FLAG`)."""
    return all(getattr(row, name) == value for name, value in RAW_MODEL_FLAG)


def spectra_fields(spectra: Spectra) -> dict[str, Any] | None:
    """The ``algorithm`` and ``section`` of a ``sketch_spectra`` row holding ``spectra``:
    the section is byte for byte the one that ends the sketch's blob. None (logged)
    when the algorithm name is longer than the column holds: the client writes no
    such name, and the verifier compares no spectra under one
    (:func:`~modelhash.fingerprint._invariant.comparable`)."""
    if len(spectra.algorithm) > SPECTRA_ALGORITHM_CHARS:
        _log.warning("invariant algorithm %r is too long to store; its spectra are "
                     "not indexed", spectra.algorithm[:80])
        return None
    return {"algorithm": spectra.algorithm, "section": spectra.to_section()}


class RawSpectra:
    """The invariant layers of raw model flags that measure the same matrices.

    Row i holds one stored sketch's singular values, one matrix per ``layout``
    entry, zero-padded to the longest (float32, as stored), and each matrix's
    squared norm.
    """

    def __init__(self, layout: tuple[tuple[str, int, int, int], ...]) -> None:
        self.layout = layout
        self.width = max((n for *_, n in layout), default=0)
        self.values: F32 = np.zeros((0, len(layout), self.width), dtype=np.float32)
        self.norms: npt.NDArray[np.float64] = np.zeros((0, len(layout)))
        self.ids: npt.NDArray[np.int64] = np.zeros(0, dtype=np.int64)
        self.flags: list[str] = []
        self.n = 0

    def add(self, sid: int, flag_id: str, spectra: Spectra) -> None:
        if self.n == len(self.ids):
            cap = max(2 * self.n, 64)
            values = np.zeros((cap, len(self.layout), self.width), dtype=np.float32)
            values[: self.n] = self.values[: self.n]
            norms = np.zeros((cap, len(self.layout)))
            norms[: self.n] = self.norms[: self.n]
            ids = np.zeros(cap, dtype=np.int64)
            ids[: self.n] = self.ids[: self.n]
            self.values, self.norms, self.ids = values, norms, ids
        for m, (key, *_shape, n) in enumerate(self.layout):
            v = spectra.items[key].values
            self.values[self.n, m, :n] = v
            self.norms[self.n, m] = float(v @ v)
        self.ids[self.n] = sid
        self.flags.append(flag_id)
        self.n += 1

    def drop(self, flag_ids: set[str]) -> None:
        """Remove the rows of ``flag_ids`` (into new arrays: views stay valid)."""
        keep = np.array([f not in flag_ids for f in self.flags[: self.n]], dtype=bool)
        self.values = self.values[: self.n][keep]
        self.norms = self.norms[: self.n][keep]
        self.ids = self.ids[: self.n][keep]
        self.flags = [f for f, k in zip(self.flags, keep, strict=True) if k]
        self.n = len(self.flags)

    def view(self) -> RawSpectraView:
        return RawSpectraView(self.layout, self.values[: self.n], self.norms[: self.n],
                              self.ids[: self.n])


@dataclass(frozen=True)
class RawSpectraView:
    """A consistent read-only view of one :class:`RawSpectra`."""

    layout: tuple[tuple[str, int, int, int], ...]
    values: F32
    norms: npt.NDArray[np.float64]
    ids: npt.NDArray[np.int64]

    def near(self, upload: Spectra, *, radius: float, top_k: int = TOP_K) -> list[int]:
        """Sketch ids of the rows whose spectra are within ``radius`` of the upload's,
        nearest first, at most ``top_k``.

        Measured as :func:`~modelhash.fingerprint._robust.base_distance` measures it,
        over the matrices that pair by key (same key and shape, within the pair
        distance); a row qualifies only if as many pair as the copy rule needs (half
        its matrices, and at least ``min_matrices``). Differences are taken in
        float32, in which both sides are stored, so a copy's tiny distance keeps
        its relative precision.
        """
        t = INVARIANT_THRESHOLDS
        present: list[int] = []
        u = np.zeros((len(self.layout), self.values.shape[2]), dtype=np.float32)
        for m, (key, rows, columns, n) in enumerate(self.layout):
            s = upload.items.get(key)
            if s is not None and s.shape == (rows, columns) and len(s.values) == n and n:
                present.append(m)
                u[m, :n] = s.values
        need = max(t.min_matrices, 0.5 * len(self.layout))
        if not len(self.ids) or len(present) < need:
            return []
        everything = len(present) == len(self.layout)
        pm = np.asarray(present)
        if not everything:
            u = u[pm]
        dist = np.full(len(self.ids), np.inf)
        limit = t.pair_distance**2
        for lo in range(0, len(self.ids), _SCAN_ROWS // 16):
            block = self.values[lo : lo + _SCAN_ROWS // 16]
            d = (block if everything else block[:, pm]) - u
            dd = np.einsum("nml,nml->nm", d, d).astype(np.float64)
            bb = self.norms[lo : lo + len(block)]
            if not everything:
                bb = bb[:, pm]
            paired = (bb > 0) & (dd <= limit * bb)
            num = np.where(paired, dd, 0.0).sum(axis=1)
            den = np.where(paired, bb, 0.0).sum(axis=1)
            ok = (paired.sum(axis=1) >= need) & (den > 0)
            dist[lo : lo + len(block)] = np.where(ok, np.sqrt(num / np.where(ok, den, 1.0)),
                                                  np.inf)
        order = np.argsort(dist, kind="stable")[:top_k]
        return [int(self.ids[i]) for i in order if dist[i] <= radius]


BankKey = tuple[str, str | None]
"""(base id, digest of the adapter modules the bank's rows cover, or None for deltas)."""


@dataclass
class SketchIndex:
    """One process's view of the ``sketch`` table: base sketches and signature banks."""

    max_id: int = 0
    count: int = 0
    bases: dict[str, tuple[str, Sketch]] = field(default_factory=dict)
    adapters: dict[str, tuple[str, Sketch]] = field(default_factory=dict)
    banks: dict[BankKey, _Bank] = field(default_factory=dict)
    modules: dict[str, frozenset[str]] = field(default_factory=dict)
    shared: SharedDirections = field(default_factory=lambda: SharedDirections({}, {}))
    raw: dict[RawKey, RawSpectra] = field(default_factory=dict)
    raw_flags: dict[str, set[RawKey]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    counted_at: float = -math.inf

    def refresh(self, session: Session) -> None:
        """Load rows added since the last call; reload all if rows went missing.

        ``max(id)`` (an index hit) is read on every call. ``count(*)``, which scans
        an index, is read when the max changed, and at least every
        :data:`RECOUNT_SECONDS`: it catches a row that committed after a higher id
        had been seen (possible on PostgreSQL) and a table that was recreated.
        """
        top = int(session.execute(
            sa_select(func.coalesce(func.max(SketchRow.id), 0))
        ).scalar_one())
        now = time.monotonic()
        if top == self.max_id and now - self.counted_at < RECOUNT_SECONDS:
            return
        count = int(session.execute(sa_select(func.count(col(SketchRow.id)))).scalar_one())
        self.counted_at = now
        with self.lock:
            if (top, count) == (self.max_id, self.count):
                return
            if top > self.max_id and count > self.count:
                # A row that committed late, below the last max id, forces a reload.
                added = session.execute(
                    sa_select(func.count(col(SketchRow.id))).where(
                        col(SketchRow.id) > self.max_id, col(SketchRow.id) <= top
                    )
                ).scalar_one()
                incremental = added == count - self.count
            else:
                incremental = False
            if not incremental:
                self.max_id = self.count = 0
                self.bases, self.adapters, self.banks, self.modules = {}, {}, {}, {}
                self.raw, self.raw_flags = {}, {}
            known = (len(self.bases), len(self.adapters))
            self._load(session, after=self.max_id, upto=top)
            self.max_id, self.count = top, count
            if not incremental or known != (len(self.bases), len(self.adapters)):
                self.shared = SharedDirections(dict(self.bases), dict(self.adapters))

    def _load(self, session: Session, *, after: int, upto: int) -> None:
        names = dict(session.exec(select(ReferenceBase.id, ReferenceBase.name)).all())
        base_rows = session.exec(
            select(SketchRow.id, SketchRow.owner_id, SketchRow.blob)
            .where(SketchRow.owner_type == "base", col(SketchRow.id) > after,
                   col(SketchRow.id) <= upto)
            .order_by(col(SketchRow.id))
        )
        for _sid, owner, blob in base_rows:
            try:
                sketch = Sketch.from_bytes(blob)
            except Exception:
                _log.warning("reference base %s has an unreadable sketch; skipped", owner)
                continue
            # A public adapter registered as a reference is never a base for deltas:
            # it only teaches the registry what adapters on a base have in common.
            into = self.adapters if sketch.kind == "lora" else self.bases
            into[owner] = (names.get(owner, owner), sketch)
        rows = session.execute(
            sa_select(col(SketchSignature.sketch_id), col(SketchSignature.base_id),
                      col(SketchSignature.signature), col(SketchSignature.norm),
                      col(SketchSignature.modules))
            .where(col(SketchSignature.sketch_id) > after, col(SketchSignature.sketch_id) <= upto)
            .order_by(col(SketchSignature.sketch_id))
        )
        pending: dict[BankKey, tuple[list[int], list[bytes], list[float]]] = {}
        for sid, base_id, sig, norm, modules in rows:
            if (not sig or len(sig) != SIG_BYTES or norm is None
                    or not math.isfinite(norm) or norm <= 0):
                _log.warning("sketch %s has an unusable signature; skipped", sid)
                continue
            if modules is not None and modules not in self.modules:
                keys = self._modules_of(session, int(sid), base_id)
                if keys is None:
                    continue
                self.modules[modules] = keys
            ids, sigs, norms = pending.setdefault((base_id, modules), ([], [], []))
            ids.append(int(sid))
            sigs.append(sig)
            norms.append(float(norm))
        for bank_key, (ids, sigs, norms) in pending.items():
            bits = np.frombuffer(b"".join(sigs), dtype="<u8").reshape(len(ids), SIG_BITS // 64)
            self.banks.setdefault(bank_key, _Bank()).extend(
                np.asarray(ids, dtype=np.int64), bits.astype(np.uint64),
                np.asarray(norms, dtype=np.float32),
            )
        self._load_raw_spectra(session, after=after, upto=upto)

    def _load_raw_spectra(self, session: Session, *, after: int, upto: int) -> None:
        """Add the spectra of raw model flags stored in (after, upto]; drop the flags
        re-based since (a base registered after them: the delta row takes over).

        The spectra are read from ``sketch_spectra`` (a few KB per flag), never from
        the blobs, which would have to be inflated whole for the section at their end.
        """
        raw_ids = session.execute(
            sa_select(col(SketchSpectra.sketch_id))
            .join(SketchRow, col(SketchRow.id) == col(SketchSpectra.sketch_id))
            .where(*raw_model_flag(), col(SketchRow.id) > after, col(SketchRow.id) <= upto)
            .order_by(col(SketchSpectra.sketch_id))
        ).scalars().all()
        # Sections in batches: a full reload never holds many at once.
        for lo in range(0, len(raw_ids), _RAW_BATCH):
            batch = raw_ids[lo : lo + _RAW_BATCH]
            rows = session.execute(
                sa_select(col(SketchSpectra.sketch_id), col(SketchRow.owner_id),
                          col(SketchSpectra.algorithm), col(SketchSpectra.section))
                .join(SketchRow, col(SketchRow.id) == col(SketchSpectra.sketch_id))
                .where(col(SketchSpectra.sketch_id).in_(batch))
                .order_by(col(SketchSpectra.sketch_id))
            )
            for sid, owner, algorithm, section in rows:
                try:
                    spectra = Spectra.from_section(memoryview(bytes(section)))
                    if spectra.algorithm != algorithm:
                        raise ValueError(f"section of algorithm {spectra.algorithm!r}")
                except (ValueError, TypeError) as exc:
                    _log.warning("sketch %s of flag %s has unreadable spectra (%s); skipped",
                                 sid, owner, exc)
                    continue
                if not len(spectra):
                    continue
                layout = raw_layout(spectra)
                key: RawKey = (spectra.algorithm, layout)
                self.raw.setdefault(key, RawSpectra(layout)).add(int(sid), owner, spectra)
                self.raw_flags.setdefault(owner, set()).add(key)
        if not self.raw_flags:
            return
        rebased = set(session.execute(
            sa_select(col(SketchRow.owner_id)).where(
                col(SketchRow.owner_type) == "flag", col(SketchRow.kind) == "delta",
                col(SketchRow.id) > after, col(SketchRow.id) <= upto,
            )
        ).scalars().all()) & self.raw_flags.keys()
        groups: dict[RawKey, set[str]] = {}
        for flag_id in rebased:
            for key in self.raw_flags.pop(flag_id):
                groups.setdefault(key, set()).add(flag_id)
        for key, flags in groups.items():
            self.raw[key].drop(flags)

    def _modules_of(self, session: Session, sid: int, base_id: str) -> frozenset[str] | None:
        """The module keys of an adapter bank, read from one of its sketches."""
        base = self.bases.get(base_id)
        blob = session.execute(
            sa_select(col(SketchRow.blob)).where(col(SketchRow.id) == sid)
        ).scalar_one_or_none()
        if base is None or blob is None:
            _log.warning("sketch %s: its base or its blob is missing; skipped", sid)
            return None
        try:
            return lora_keys(Sketch.from_bytes(blob), base[1])
        except Exception:
            _log.warning("sketch %s has an unreadable blob; skipped", sid)
            return None

    def snapshot(self) -> Snapshot:
        with self.lock:
            return Snapshot(
                dict(self.bases), {b: bank.view() for b, bank in self.banks.items()},
                dict(self.modules), dict(self.adapters), self.shared,
                {k: g.view() for k, g in self.raw.items() if g.n},
            )


class SharedDirections:
    """Per base, the direction its known-innocent derivatives share, computed on first use.

    The samples are the registered references themselves. A reference model's
    *parent* is the nearest base registered before it, within
    ``THRESHOLDS.base_distance`` (register a foundation model before its public
    fine-tunes); the models whose parent a base is (public fine-tunes registered as
    bases) give the direction removed when scoring against its flagged fine-tunes,
    and the reference adapters that cover its modules the one removed when scoring
    against its flagged adapters (see
    :func:`~modelhash.fingerprint._similarity.shared_direction`). A new reference
    replaces the whole object, so a check never sees a half-updated one.
    """

    def __init__(self, bases: dict[str, tuple[str, Sketch]],
                 adapters: dict[str, tuple[str, Sketch]]) -> None:
        self._bases = bases  # in registration order
        self._adapters = adapters
        self._cache: dict[tuple[str, str], tuple[Sketch | None, Thresholds]] = {}
        self._parents: dict[str, str] | None = None
        self._lock = threading.Lock()

    def _children(self, base_id: str) -> list[Sketch]:
        with self._lock:
            if self._parents is None:
                parents: dict[str, str] = {}
                earlier: list[tuple[str, Sketch]] = []
                t = THRESHOLDS
                for bid, (_name, sketch) in self._bases.items():
                    near = []
                    for pid, p in earlier:
                        delta, dist = delta_sketch(sketch, p)
                        if t.raw_distance < dist <= t.base_distance:
                            near.append((base_rank(delta, dist), pid))
                    if near:
                        parents[bid] = min(near)[1]
                    earlier.append((bid, sketch))
                self._parents = parents
            return [self._bases[c][1] for c, p in self._parents.items() if p == base_id]

    def get(self, base_id: str, kind: str) -> Sketch | None:
        """The shared direction for flags of ``kind`` (``lora`` or not) relative to a base."""
        return self._lookup(base_id, kind)[0]

    def thresholds(self, base_id: str | None, kind: str) -> Thresholds:
        """The thresholds for flags of ``kind`` relative to a base, raised where its
        references are more alike than the fixed ones assume (see
        :func:`~modelhash.fingerprint._similarity.calibrated`)."""
        return THRESHOLDS if base_id is None else self._lookup(base_id, kind)[1]

    def _lookup(self, base_id: str, kind: str) -> tuple[Sketch | None, Thresholds]:
        key = (base_id, "lora" if kind == "lora" else "model")
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        base = self._bases.get(base_id)
        found: tuple[Sketch | None, Thresholds] = (None, THRESHOLDS)
        if base is not None:
            try:
                if key[1] == "lora":
                    samples = [a for _n, a in self._adapters.values()
                               if _lora_coverage(a, base[1]) >= LORA_COVERAGE]
                else:
                    samples = self._children(base_id)
                if samples:
                    found = (shared_direction(samples, base[1]), calibrated(samples, base[1]))
            except Exception:
                # Without them the fixed thresholds apply: a check loses nothing.
                _log.exception("shared direction of base %s could not be computed", base_id)
        with self._lock:
            self._cache[key] = found
        return found


@dataclass(frozen=True)
class Snapshot:
    """What a check reads of the index: bases, banks, adapter module sets, references."""

    bases: dict[str, tuple[str, Sketch]]
    banks: dict[BankKey, BankView]
    modules: dict[str, frozenset[str]]
    adapters: dict[str, tuple[str, Sketch]] = field(default_factory=dict)
    shared: SharedDirections = field(default_factory=lambda: SharedDirections({}, {}))
    raw_spectra: dict[RawKey, RawSpectraView] = field(default_factory=dict)


_INDEXES: dict[str, SketchIndex] = {}
_INDEXES_LOCK = threading.Lock()


def index_for(session: Session) -> SketchIndex:
    """This process's index of the session's database, brought up to date."""
    bind = session.get_bind()
    engine = bind if isinstance(bind, Engine) else bind.engine
    key = engine.url.render_as_string(hide_password=True)
    with _INDEXES_LOCK:
        index = _INDEXES.setdefault(key, SketchIndex())
    index.refresh(session)
    return index


@dataclass(frozen=True)
class PreparedSketch:
    """What to store for a flag's sketch, decided before the flag is written."""

    kind: str
    base_id: str | None
    blob: bytes
    tensors: int
    signature: Signature | None
    bands: list[int]
    modules: str | None = None
    near_base: tuple[str, str] | None = None
    base_distance: float | None = None
    invariant: Spectra | None = None
    """The invariant layer the blob carries, if any."""


def prepare_flag_sketch(session: Session, sketch: Sketch) -> PreparedSketch:
    """Choose the stored form of a flag's sketch (see the module docstring).

    ``near_base`` is set when the model is a near-duplicate of a base's sketch.
    """
    snap = index_for(session).snapshot()
    bases = snap.bases
    if sketch.kind == "lora":
        near_adapter = _near_adapter(sketch, snap.adapters)
        best: tuple[float, str] | None = None
        for base_id, (_name, b) in bases.items():
            cov = _lora_coverage(sketch, b)
            if cov >= LORA_COVERAGE and (best is None or cov > best[0]):
                best = (cov, base_id)
        sig = modules = None
        if best is not None:
            keys = lora_keys(sketch, bases[best[1]][1])
            sig = signature(sketch, bases[best[1]][1], keys)
            modules = keys_digest(keys)
        return PreparedSketch(
            kind="lora",
            base_id=best[1] if best is not None and sig is not None else None,
            blob=sketch.to_bytes(),
            tensors=len(sketch),
            signature=sig,
            bands=sketch.band_keys(),
            modules=modules if sig is not None else None,
            near_base=near_adapter,
            invariant=sketch.invariant,
        )
    near: tuple[str, str] | None = None
    nearest: tuple[tuple[int, float], str, Sketch, float] | None = None
    for base_id, (name, b) in bases.items():
        if near is None and storage_copy(sketch, b) is not None:
            near = (base_id, name)
        delta, dist = delta_sketch(sketch, b)
        if dist <= THRESHOLDS.base_distance and len(delta) and (
            nearest is None or base_rank(delta, dist) < nearest[0]
        ):
            nearest = (base_rank(delta, dist), base_id, delta, dist)
    if nearest is not None:
        _rank, base_id, delta, dist = nearest
        delta.invariant = sketch.invariant  # the flag's own spectra, for _invariant_scan
        sig = signature(delta, bases[base_id][1])
        if sig is not None:
            return PreparedSketch(
                kind="delta",
                base_id=base_id,
                blob=delta.to_bytes(),
                tensors=len(delta),
                signature=sig,
                bands=[],
                near_base=near,
                base_distance=dist,
                invariant=sketch.invariant,
            )
    return PreparedSketch(
        kind="model",
        base_id=None,
        blob=sketch.to_bytes(),
        tensors=len(sketch),
        signature=None,
        bands=sketch.band_keys(),
        near_base=near,
        invariant=sketch.invariant,
    )


def base_rank(delta: Sketch, dist: float) -> tuple[int, float]:
    """Sort key of a candidate base for a model: most scored tensors aligned, then nearest.

    Coverage comes first: a base that lacks part of the model (a UNet-only public
    fine-tune, for a full checkpoint) measures its distance over fewer tensors and
    would otherwise win over the model's real ancestor.
    """
    return (-sum(1 for k in delta.tensors if scored(k)), dist)


def _near_adapter(lora: Sketch, adapters: dict[str, tuple[str, Sketch]]) -> tuple[str, str] | None:
    """The reference adapter ``lora`` is a copy of (raw near-duplicate), if any."""
    t = THRESHOLDS
    for ref_id, (name, ref) in adapters.items():
        c = compare(lora, ref)
        if (c.raw_distance is not None and c.raw_distance <= t.raw_distance
                and c.raw_coverage >= t.raw_coverage):
            return ref_id, name
    return None


def refuse_near_base(prepared: PreparedSketch | None, *, force: bool) -> None:
    """409 when the flagged sketch is a near-duplicate of a reference base, unless forced."""
    if prepared is not None and prepared.near_base is not None and not force:
        raise ReferenceBaseConflict(*prepared.near_base)


def store_flag_sketch(session: Session, *, flag_id: str, prepared: PreparedSketch,
                      algorithm: str) -> SketchRow:
    """Insert a flag's sketch row, its signature, band and spectra rows (in the
    caller's transaction). A raw model flag (:func:`is_raw_model_flag`) whose sketch
    carries the invariant layer gets its ``sketch_spectra`` row, which the index of
    raw flags' spectra reads."""
    row = SketchRow(
        owner_type="flag",
        owner_id=flag_id,
        algorithm=algorithm,
        kind=prepared.kind,
        base_id=prepared.base_id,
        tensors=prepared.tensors,
        blob=prepared.blob,
    )
    session.add(row)
    session.flush()
    assert row.id is not None
    if prepared.signature is not None and prepared.base_id is not None:
        session.add(SketchSignature(
            sketch_id=row.id, base_id=prepared.base_id, signature=prepared.signature.bits,
            norm=prepared.signature.norm, modules=prepared.modules,
        ))
    for band in sorted(set(prepared.bands)):
        session.add(SketchBand(band=band, sketch_id=row.id))
    if is_raw_model_flag(row) and prepared.invariant is not None:
        fields = spectra_fields(prepared.invariant)
        if fields is not None:
            session.add(SketchSpectra(sketch_id=row.id, **fields))
    session.flush()
    return row


def rebase_flag_sketches(session: Session, *, base_id: str, base: Sketch) -> int:
    """Store deltas against a new base for the flags whose sketches had no base.

    A flag sketched before its reference base was registered was stored raw (or, for
    an adapter, without a base) and could only find near-duplicates. For each such
    flag within ``THRESHOLDS.base_distance`` of ``base`` (or an adapter covering
    enough of its modules), a new ``delta`` or ``lora`` row relative to ``base`` is
    added next to the raw one, with its signature (sketch rows are append-only).
    However close the flag is to the base: a fine-tune's delta is 1e-4 to 1e-2 of
    the weights, and left raw it would make the base and every sibling look like
    near-duplicates of it. (A flag whose delta is empty has no signature and stays
    raw.) Returns the number of rows added. Runs in the caller's transaction.
    """
    done = set(session.exec(
        select(SketchRow.owner_id).where(SketchRow.owner_type == "flag",
                                         SketchRow.base_id == base_id)
    ).all())
    rows = session.exec(
        select(SketchRow.owner_id, SketchRow.kind, SketchRow.algorithm, SketchRow.blob)
        .where(SketchRow.owner_type == "flag", col(SketchRow.base_id).is_(None),
               col(SketchRow.kind).in_(("model", "lora")))
        .order_by(col(SketchRow.id))
    ).all()
    added = 0
    for flag_id, kind, algorithm, blob in rows:
        if flag_id in done or algorithm != base.algorithm:
            continue
        try:
            sketch = Sketch.from_bytes(blob)
        except Exception:
            _log.warning("flag %s has an unreadable sketch; not re-based", flag_id)
            continue
        prepared: PreparedSketch | None = None
        if kind == "lora":
            keys = lora_keys(sketch, base)
            if len(sketch) and len(keys) >= LORA_COVERAGE * len(sketch):
                sig = signature(sketch, base, keys)
                if sig is not None:
                    prepared = PreparedSketch(kind="lora", base_id=base_id, blob=blob,
                                              tensors=len(sketch), signature=sig, bands=[],
                                              modules=keys_digest(keys))
        else:
            delta, dist = delta_sketch(sketch, base)
            delta.invariant = sketch.invariant
            sig = signature(delta, base) if len(delta) else None
            if dist <= THRESHOLDS.base_distance and sig:
                prepared = PreparedSketch(kind="delta", base_id=base_id,
                                          blob=delta.to_bytes(), tensors=len(delta),
                                          signature=sig, bands=[], base_distance=dist,
                                          invariant=sketch.invariant)
        if prepared is not None:
            store_flag_sketch(session, flag_id=flag_id, prepared=prepared, algorithm=algorithm)
            done.add(flag_id)
            added += 1
    return added


def store_base_sketch(session: Session, *, base_id: str, sketch: Sketch) -> SketchRow:
    """Insert a reference base's raw sketch (in the caller's transaction)."""
    row = SketchRow(
        owner_type="base",
        owner_id=base_id,
        algorithm=sketch.algorithm,
        kind=sketch.kind,
        base_id=None,
        tensors=len(sketch),
        blob=sketch.to_bytes(),
    )
    session.add(row)
    session.flush()
    return row


@dataclass(frozen=True)
class SketchHit:
    """A verified sketch match of one upload against one flag."""

    flag_id: str
    category: str
    severity: str
    status: str
    verdict: Verdict


def _top(scores: F32, ids: npt.NDArray[np.int64], k: int, floor: float) -> list[int]:
    if not len(scores):
        return []
    part = np.argpartition(-scores, k - 1)[:k] if len(scores) > k else np.arange(len(scores))
    return [int(ids[i]) for i in part if scores[i] >= floor]


def retrieve(bank: BankView, query: Signature, *, top_k: int = TOP_K,
             floor: float = FLOOR) -> list[int]:
    """Sketch ids of a bank worth verifying against ``query``.

    The :data:`TOP_K` best estimated cosines at or above ``floor``, and the best
    among rows whose estimated coefficient is in :data:`CARRIED_WINDOW`.
    """
    cos = estimate(bank.bits, query)
    out = _top(cos, bank.ids, top_k, floor)
    coef = cos * np.float32(query.norm) / bank.norms
    lo, hi = CARRIED_WINDOW
    carried = np.where((coef >= lo) & (coef <= hi), cos, np.float32(-1.0))
    out.extend(i for i in _top(carried, bank.ids, top_k, floor) if i not in out)
    return out


class _Decoded:
    """A small LRU of parsed flag sketches by row id (rows never change)."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self.items: OrderedDict[int, Sketch] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, sid: int, blob: bytes) -> Sketch:
        with self.lock:
            hit = self.items.get(sid)
            if hit is not None:
                self.items.move_to_end(sid)
                return hit
        sketch = Sketch.from_bytes(blob)
        with self.lock:
            self.items[sid] = sketch
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return sketch


_DECODED = _Decoded()


class _UploadDeltas:
    """The upload's delta against each base, computed once, on first use."""

    def __init__(self, upload: Sketch, bases: dict[str, tuple[str, Sketch]]) -> None:
        self.upload = upload
        self.bases = bases
        self.deltas: dict[str, tuple[Sketch, float] | None] = {}
        self.stacks: dict[str, tuple[Stacked, Stacked]] = {}
        self.shared_stacks: dict[int, Stacked] = {}
        self._nearest: tuple[str | None] | None = None

    def _compute(self, base_id: str) -> tuple[Sketch, float] | None:
        if base_id not in self.deltas:
            b = self.bases[base_id][1]
            out: tuple[Sketch, float] | None
            if self.upload.kind == "lora":
                covered = _lora_coverage(self.upload, b) >= LORA_COVERAGE
                out = (self.upload, 0.0) if covered else None
            else:
                delta, dist = delta_sketch(self.upload, b)
                out = (delta, dist) if dist <= THRESHOLDS.base_distance and len(delta) else None
            self.deltas[base_id] = out
        return self.deltas[base_id]

    def get(self, base_id: str) -> Sketch | None:
        found = self._compute(base_id)
        return found[0] if found is not None else None

    def nearest(self) -> str | None:
        """The base the upload is nearest to, within ``base_distance`` (computed once)."""
        if self._nearest is None:
            near = [(base_rank(*d), i) for i in self.bases if (d := self._compute(i)) is not None]
            self._nearest = (min(near)[1] if near else None,)
        return self._nearest[0]

    def stacked_shared(self, shared: Sketch | None) -> Stacked | None:
        if shared is None:
            return None
        key = id(shared)
        if key not in self.shared_stacks:
            self.shared_stacks[key] = stack_sketch(shared)
        return self.shared_stacks[key]

    def stacked(self, base_id: str) -> tuple[Stacked, Stacked] | None:
        if base_id not in self.stacks:
            delta = self.get(base_id)
            if delta is None:
                return None
            self.stacks[base_id] = (stack_sketch(delta), stack_sketch(self.bases[base_id][1]))
        return self.stacks[base_id]


def find_matches(
    session: Session,
    upload: Sketch,
    *,
    exclude: Sequence[str] = (),
    top_k: int = TOP_K,
    floor: float = FLOOR,
) -> list[SketchHit]:
    """Verified sketch matches of ``upload`` against unrevoked flags, best first.

    ``exclude`` lists flag ids already matched by an exact or content hash.
    """
    snap = index_for(session).snapshot()
    bases = snap.bases
    candidates: set[int] = set()
    deltas = _UploadDeltas(upload, bases)
    # An adapter is a delta of its own, not tied to one base: a checkpoint it was
    # baked into is compared on the adapter's modules relative to the checkpoint's
    # nearest base (when that base has those modules), whichever base of the same
    # layout the adapter was filed under.
    verify_with: dict[int, str] = {}
    for (bank_base, modules), bank in snap.banks.items():
        if bank_base not in bases or not len(bank.ids):
            continue
        keys = snap.modules.get(modules) if modules is not None else None
        base_id = bank_base
        if keys is not None and upload.kind != "lora":
            nearest = deltas.nearest()
            if nearest is not None and nearest != bank_base and _covers(
                bases[nearest][1], keys, bases[bank_base][1]
            ):
                base_id = nearest
        upload_delta = deltas.get(base_id)
        if upload_delta is None:
            continue
        query = signature(upload_delta, bases[base_id][1], keys)
        if query is not None:
            for sid in retrieve(bank, query, top_k=top_k, floor=floor):
                candidates.add(sid)
                if base_id != bank_base:
                    verify_with[sid] = base_id
    bands = upload.band_keys()
    banded = session.exec(
        select(SketchBand.sketch_id)
        .where(col(SketchBand.band).in_(bands))
        .group_by(col(SketchBand.sketch_id))
        .order_by(func.count().desc(), col(SketchBand.sketch_id))
        .limit(top_k)
    )
    candidates.update(int(s) for s in banded)
    skip = set(exclude)
    best: dict[str, SketchHit] = {}
    if candidates:
        _verify_candidates(session, upload, snap, deltas, candidates, verify_with, skip, best)
    for hit in _invariant_scan(session, upload, snap, deltas, skip | set(best), candidates):
        best[hit.flag_id] = hit
    for hit in _raw_invariant_scan(session, upload, snap, skip | set(best), candidates,
                                   top_k=top_k):
        best[hit.flag_id] = hit
    return sorted(best.values(), key=lambda h: -h.verdict.score)


def _verify_candidates(
    session: Session, upload: Sketch, snap: Snapshot, deltas: _UploadDeltas,
    candidates: set[int], verify_with: dict[int, str], skip: set[str],
    best: dict[str, SketchHit],
) -> None:
    """Verify the retrieved candidates with the client's own verifier, into ``best``."""
    bases = snap.bases
    rows = session.execute(
        sa_select(
            col(SketchRow.id), col(SketchRow.kind), col(SketchRow.base_id),
            col(SketchRow.blob), col(Flag.id), col(Flag.category), col(Flag.severity),
            col(Flag.status),
        )
        .join(Flag, col(Flag.id) == col(SketchRow.owner_id))
        .where(
            col(SketchRow.id).in_(sorted(candidates)),
            col(SketchRow.owner_type) == "flag",
            col(Flag.status) != "revoked",
        )
    )
    # Every delta verdict needs at least this pooled cosine (see Thresholds).
    least = min(THRESHOLDS.cosine, THRESHOLDS.carried_cosine) * PREFILTER_MARGIN
    for sid, kind, row_base, blob, flag_id, category, severity, status in rows:
        if flag_id in skip:
            continue
        # A raw flag is judged relative to the upload's nearest base, so that the
        # near-duplicate rule works in delta terms (see Thresholds).
        row_base = verify_with.get(int(sid), row_base)
        if row_base is None and kind == "model":
            row_base = deltas.nearest()
        base_id = row_base
        base = bases.get(base_id) if base_id is not None else None
        if base_id is not None and base is None:
            _log.warning("sketch %s is relative to base %s, whose sketch is missing", sid,
                         base_id)
            continue
        try:
            mine = deltas.stacked(base_id) if base_id is not None else None
            shared = snap.shared.get(base_id, kind) if base_id is not None else None
            if (
                kind in ("delta", "lora") and mine is not None
                and pooled_cosine(mine[0], stack_blob(blob), mine[1],
                                  deltas.stacked_shared(shared)) < least
            ):
                continue
            flagged = _DECODED.get(int(sid), blob)
            verdict = verify(
                upload, flagged, base[1] if base else None,
                base_name=base[0] if base else None, shared=shared,
                thresholds=snap.shared.thresholds(base_id, kind),
            )
        except Exception:
            _log.exception("sketch %s of flag %s could not be compared; skipped", sid, flag_id)
            continue
        if verdict is None:
            continue
        prev = best.get(flag_id)
        if prev is None or verdict.score > prev.verdict.score:
            best[flag_id] = SketchHit(flag_id, category, severity, status, verdict)


def _invariant_base(upload: Sketch, bases: dict[str, tuple[str, Sketch]]) -> str | None:
    """The base the upload's spectra are nearest to, within the invariant layer's
    ``base_distance``."""
    if upload.invariant is None:
        return None
    near: list[tuple[float, str]] = []
    for base_id, (_name, b) in bases.items():
        if b.invariant is not None and comparable(b.invariant.algorithm,
                                                  upload.invariant.algorithm):
            d = spectral_distance(upload.invariant, b.invariant)
            if d <= INVARIANT_THRESHOLDS.base_distance:
                near.append((d, base_id))
    return min(near)[1] if near else None


def _thin(upload: Sketch, base: Sketch, deltas: _UploadDeltas, base_id: str) -> bool:
    """Whether the upload's sketch delta from ``base`` is missing or thin: few of the
    base's scored tensors aligned, or moved far more than the spectra (see
    :class:`~modelhash.fingerprint._robust.InvariantThresholds`)."""
    found = deltas._compute(base_id)
    if found is None:
        return True
    delta, dist = found
    assert upload.invariant is not None and base.invariant is not None
    aligned = sum(1 for k in delta.tensors if scored(k))
    total = sum(1 for k in base.tensors if scored(k))
    t = INVARIANT_THRESHOLDS
    spectral = spectral_distance(upload.invariant, base.invariant)
    return aligned < t.thin_coverage * total or dist > t.sketch_ratio * spectral


def _invariant_scan(
    session: Session, upload: Sketch, snap: Snapshot, deltas: _UploadDeltas,
    skip: set[str], seen: set[int],
) -> list[SketchHit]:
    """Matches on the invariant layer, for an upload whose sketch delta is thin.

    Its tensors did not line up with any base's (its units were permuted, its
    residual stream rotated, its scales moved), so the signature banks cannot
    retrieve its flags. The base is found from the spectra instead, and every
    unrevoked flag stored as a delta from that base whose blob carries the
    invariant layer is verified. This is linear in the flags on that base, and runs
    only for such uploads.
    """
    if upload.kind != "model" or upload.invariant is None:
        return []
    base_id = _invariant_base(upload, snap.bases)
    if base_id is None:
        return []
    base = snap.bases[base_id][1]
    if not _thin(upload, base, deltas, base_id):
        return []
    rows = _flag_rows(session, col(SketchRow.base_id) == base_id, col(SketchRow.kind) == "delta")
    kept = [r for r in rows if int(r[0]) not in seen and r[1][4:5] == b"\x03"]
    return _invariant_hits(kept, upload, snap, base_id, skip)


def _raw_invariant_scan(
    session: Session, upload: Sketch, snap: Snapshot,
    skip: set[str], seen: set[int], *, top_k: int = TOP_K,
) -> list[SketchHit]:
    """Matches on the invariant layer against flags stored raw (filed with no base
    near them), for a model upload that carries the layer.

    Such a flag is in no signature bank, and a copy of it whose units were permuted,
    whose residual stream was rotated or whose scales were moved shares no band with
    it. Its spectra are retrieved instead: the index keeps them per matrix layout,
    and the rows within :data:`RAW_SPECTRAL_MARGIN` times the copy rule's raw
    distance (at most ``top_k`` per layout, nearest first) are verified, relative
    to the base the upload's spectra are nearest to, if any (without one, copies
    only).
    Rows the ordinary paths already verified (``seen``) and flags already matched
    (``skip``) are left out; revoked flags are dropped here, at verification.
    """
    if upload.kind != "model" or upload.invariant is None or not snap.raw_spectra:
        return []
    radius = RAW_SPECTRAL_MARGIN * INVARIANT_THRESHOLDS.raw_distance
    near: list[int] = []
    for (algorithm, _layout), view in snap.raw_spectra.items():
        if algorithm == upload.invariant.algorithm:
            near.extend(i for i in view.near(upload.invariant, radius=radius, top_k=top_k)
                        if i not in seen)
    if not near:
        return []
    rows = _flag_rows(session, col(SketchRow.id).in_(sorted(near)))
    # Relative to the base the upload's spectra are nearest to, as for delta flags,
    # so that a flag that barely moved from a registered base does not make the
    # base a copy of it; without one, the copy rule on raw spectra.
    return _invariant_hits(rows, upload, snap, _invariant_base(upload, snap.bases), skip)


def _flag_rows(session: Session, *where: ColumnElement[bool]) -> Iterable[Any]:
    """Unrevoked flags' sketch rows matching ``where``, as :func:`_invariant_hits`
    verifies them: (sketch id, blob, flag id, category, severity, status), by id."""
    return session.execute(
        sa_select(
            col(SketchRow.id), col(SketchRow.blob), col(Flag.id), col(Flag.category),
            col(Flag.severity), col(Flag.status),
        )
        .join(Flag, col(Flag.id) == col(SketchRow.owner_id))
        .where(col(SketchRow.owner_type) == "flag", col(Flag.status) != "revoked", *where)
        .order_by(col(SketchRow.id))
    )


def _invariant_hits(
    rows: Iterable[Any], upload: Sketch, snap: Snapshot, base_id: str | None, skip: set[str],
) -> list[SketchHit]:
    """Verify flag rows (sketch id, blob, flag id, category, severity, status) relative
    to ``base_id`` (or none), keeping the matches the invariant layer decided: the
    best one per flag. A row that cannot be compared is logged and skipped."""
    base = snap.bases.get(base_id) if base_id is not None else None
    shared = snap.shared.get(base_id, "model") if base_id is not None else None
    thresholds = snap.shared.thresholds(base_id, "model")
    out: dict[str, SketchHit] = {}
    for sid, blob, flag_id, category, severity, status in rows:
        if flag_id in skip:
            continue
        try:
            flagged = _DECODED.get(int(sid), blob)
            verdict = verify(upload, flagged, base[1] if base else None,
                             base_name=base[0] if base else None, shared=shared,
                             thresholds=thresholds)
        except Exception:
            _log.exception("sketch %s of flag %s could not be compared; skipped", sid, flag_id)
            continue
        if verdict is None or not verdict.evidence.get("invariant"):
            continue
        prev = out.get(flag_id)
        if prev is None or verdict.score > prev.verdict.score:
            out[flag_id] = SketchHit(flag_id, category, severity, status, verdict)
    return list(out.values())
