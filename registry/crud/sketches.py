"""The sketch layer on the registry side: store flag and base sketches, find matches.

Storage. A reference base keeps its raw (``model``) sketch. A flagged model's sketch
is stored as its **delta** from the nearest base (``kind = delta``, ``base_id``
set), found with :func:`~client.fingerprint._similarity.delta_sketch`, if one is
within ``THRESHOLDS.base_distance``; otherwise raw. An adapter (``lora``) is stored
as sent, with ``base_id`` the base whose modules it covers, if any.

Retrieval, two paths, then verification:

- **Signature bank (delta and adapter flags).** Each stored sketch that has a base
  also stores a :data:`SIG_DIM`-float signature: its per-tensor deltas, made
  orthogonal to the base's tensor (as the verifier does), hashed into
  :data:`SIG_DIM` buckets with seeded signs (a count sketch, which keeps inner
  products), then normalised. Each process keeps, per base, a float32 matrix of
  the signatures of every sketch relative to that base, refreshed from the
  ``sketch`` table when its max id or row count changes. A check computes the
  upload's delta against each base whose raw distance is within
  ``base_distance``, scores every flag of that base with one matrix-vector
  product, and keeps the :data:`TOP_K` best above :data:`FLOOR`.
- **LSH bands (raw and adapter flags).** :meth:`Sketch.band_keys` rows in
  ``sketch_band``, indexed: the flags sharing a band with the upload, most bands
  first. Sign bits only keep pairs at high cosine, which is what a raw
  near-duplicate (or the same adapter re-saved) is.

Each candidate is then verified with :func:`client.fingerprint._similarity.match`,
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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import blake3
import numpy as np
import numpy.typing as npt
from sqlalchemy import Engine, func
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from client.fingerprint._similarity import THRESHOLDS, delta_sketch
from client.fingerprint._similarity import Match as Verdict
from client.fingerprint._similarity import match as verify
from client.fingerprint._sketch import Sketch, TensorSketch
from registry.crud._stacked import Stacked, pooled_cosine, stack_blob, stack_sketch
from registry.errors import ReferenceBaseConflict
from registry.models import Flag, ReferenceBase, SketchBand, SketchRow, SketchSignature

__all__ = [
    "FLOOR",
    "SIG_DIM",
    "TOP_K",
    "PreparedSketch",
    "SketchHit",
    "SketchIndex",
    "find_matches",
    "index_for",
    "prepare_flag_sketch",
    "signature",
    "store_base_sketch",
    "store_flag_sketch",
]

_log = logging.getLogger("modelhash.registry")

SIG_DIM = 256
"""Length of a stored signature (float32): 1 KiB per flag sketch."""
TOP_K = 16
"""Candidates kept per base from the signature bank, and from the bands."""
FLOOR = 0.1
"""Lowest signature cosine still worth verifying: the signature's standard error is
about 1/√SIG_DIM ≈ 0.06, so a delta at the verifier's cosine threshold (0.3) clears
it with probability above 0.999, one at 0.15 about 0.8 of the time."""
RECOUNT_SECONDS = 5.0
"""How stale the row count behind the in-memory index may get (see ``refresh``)."""
PREFILTER_MARGIN = 0.5
"""A delta candidate whose exact pooled cosine is below this share of the lowest
cosine any delta verdict accepts is not sent to the full verifier."""
LORA_COVERAGE = 0.5
"""Share of an adapter's modules a base must have (same key and shape) to be its base."""

_SIG_DOMAIN = b"modelhash/registry/signature/v1\x00"
F32 = npt.NDArray[np.float32]


@functools.lru_cache(maxsize=8192)
def _plan(key: str, shape: tuple[int, int], size: int) -> tuple[npt.NDArray[np.intp], F32]:
    """Bucket and sign of each of a tensor's ``size`` sketch values, seeded by key and shape."""
    seed = _SIG_DOMAIN + struct.pack("<QQQ", size, *shape) + key.encode("utf-8")
    raw = np.frombuffer(blake3.blake3(seed).digest(length=3 * size), dtype=np.uint8)
    buckets = (raw[:size].astype(np.intp) * 256 + raw[size : 2 * size]) % SIG_DIM
    signs = (1.0 - 2.0 * (raw[2 * size :] & 1)).astype(np.float32)
    return buckets, signs


def _orthogonal(d: npt.NDArray[np.float64], b: TensorSketch | None) -> npt.NDArray[np.float64]:
    if b is None or b.values.size != d.size:
        return d
    bv = b.values.reshape(-1)
    nb = float(bv @ bv)
    if nb == 0:
        return d
    out: npt.NDArray[np.float64] = d - (float(d @ bv) / nb) * bv
    return out


def signature(delta: Sketch, base: Sketch) -> F32 | None:
    """The unit retrieval vector of a ``delta`` or ``lora`` sketch relative to ``base``.

    Per tensor: the delta minus its projection on the base's tensor of the same key,
    each value added with a seeded sign into one of :data:`SIG_DIM` buckets. The
    dot product of two signatures estimates the pooled cosine the verifier computes
    (standard error about 1/√SIG_DIM). None when the delta is zero or empty.
    """
    parts: list[npt.NDArray[np.float64]] = []
    idx: list[npt.NDArray[np.intp]] = []
    sgn: list[F32] = []
    for key, t in delta.tensors.items():
        v = _orthogonal(t.values.reshape(-1), base.tensors.get(key))
        b, s = _plan(key, t.shape, v.size)
        parts.append(v)
        idx.append(b)
        sgn.append(s)
    if not parts:
        return None
    vec = np.bincount(
        np.concatenate(idx), weights=np.concatenate(parts) * np.concatenate(sgn),
        minlength=SIG_DIM,
    )
    norm = float(np.linalg.norm(vec))
    if not np.isfinite(norm) or norm == 0:
        return None
    out: F32 = (vec / norm).astype(np.float32)
    return out


def _lora_coverage(lora: Sketch, base: Sketch) -> float:
    if not len(lora):
        return 0.0
    hits = sum(
        1 for k, t in lora.tensors.items()
        if (b := base.tensors.get(k)) is not None and b.shape == t.shape
    )
    return hits / len(lora)


class _Bank:
    """A growable float32 matrix of signatures and the sketch id of each row."""

    def __init__(self) -> None:
        self.matrix: F32 = np.zeros((0, SIG_DIM), dtype=np.float32)
        self.ids: npt.NDArray[np.int64] = np.zeros(0, dtype=np.int64)
        self.n = 0

    def extend(self, ids: npt.NDArray[np.int64], rows: npt.NDArray[np.float32]) -> None:
        need = self.n + len(ids)
        if need > len(self.ids):
            cap = max(need, 2 * len(self.ids), 1024)
            m = np.zeros((cap, SIG_DIM), dtype=np.float32)
            m[: self.n] = self.matrix[: self.n]
            i = np.zeros(cap, dtype=np.int64)
            i[: self.n] = self.ids[: self.n]
            self.matrix, self.ids = m, i
        if len(ids):
            self.matrix[self.n : need] = rows
            self.ids[self.n : need] = ids
        self.n = need

    def view(self) -> tuple[F32, npt.NDArray[np.int64]]:
        return self.matrix[: self.n], self.ids[: self.n]


@dataclass
class SketchIndex:
    """One process's view of the ``sketch`` table: base sketches and signature banks."""

    max_id: int = 0
    count: int = 0
    bases: dict[str, tuple[str, Sketch]] = field(default_factory=dict)
    banks: dict[str, _Bank] = field(default_factory=dict)
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
                self.bases, self.banks = {}, {}
            self._load(session, after=self.max_id, upto=top)
            self.max_id, self.count = top, count

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
                self.bases[owner] = (names.get(owner, owner), Sketch.from_bytes(blob))
            except Exception:
                _log.warning("reference base %s has an unreadable sketch; skipped", owner)
        rows = session.exec(
            select(SketchSignature.sketch_id, SketchSignature.base_id, SketchSignature.signature)
            .where(col(SketchSignature.sketch_id) > after, col(SketchSignature.sketch_id) <= upto)
            .order_by(col(SketchSignature.sketch_id))
        )
        pending: dict[str, tuple[list[int], list[bytes]]] = {}
        for sid, base_id, sig in rows:
            if not sig or len(sig) != 4 * SIG_DIM:
                _log.warning("sketch %s has an unusable signature; skipped", sid)
                continue
            ids, sigs = pending.setdefault(base_id, ([], []))
            ids.append(int(sid))
            sigs.append(sig)
        for base_id, (ids, sigs) in pending.items():
            matrix = np.frombuffer(b"".join(sigs), dtype="<f4").reshape(len(ids), SIG_DIM)
            good = np.isfinite(matrix).all(axis=1)
            if not good.all():
                _log.warning("%d signatures are not finite; skipped", int((~good).sum()))
            keep = np.asarray(ids, dtype=np.int64)[good]
            self.banks.setdefault(base_id, _Bank()).extend(keep, matrix[good])

    def snapshot(self) -> tuple[dict[str, tuple[str, Sketch]], dict[str, tuple[F32, Any]]]:
        with self.lock:
            return dict(self.bases), {b: bank.view() for b, bank in self.banks.items()}


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
    signature: bytes | None
    bands: list[int]
    near_base: tuple[str, str] | None = None
    base_distance: float | None = None


def prepare_flag_sketch(session: Session, sketch: Sketch) -> PreparedSketch:
    """Choose the stored form of a flag's sketch (see the module docstring).

    ``near_base`` is set when the model is a near-duplicate of a base's sketch.
    """
    bases, _ = index_for(session).snapshot()
    if sketch.kind == "lora":
        best: tuple[float, str] | None = None
        for base_id, (_name, b) in bases.items():
            cov = _lora_coverage(sketch, b)
            if cov >= LORA_COVERAGE and (best is None or cov > best[0]):
                best = (cov, base_id)
        sig = signature(sketch, bases[best[1]][1]) if best is not None else None
        return PreparedSketch(
            kind="lora",
            base_id=best[1] if best is not None and sig is not None else None,
            blob=sketch.to_bytes(),
            tensors=len(sketch),
            signature=sig.astype("<f4").tobytes() if sig is not None else None,
            bands=sketch.band_keys(),
        )
    near: tuple[str, str] | None = None
    nearest: tuple[float, str, Sketch] | None = None
    for base_id, (name, b) in bases.items():
        if near is None and verify(sketch, b) is not None:
            near = (base_id, name)
        delta, dist = delta_sketch(sketch, b)
        if dist <= THRESHOLDS.base_distance and len(delta) and (
            nearest is None or dist < nearest[0]
        ):
            nearest = (dist, base_id, delta)
    if nearest is not None:
        dist, base_id, delta = nearest
        sig = signature(delta, bases[base_id][1])
        if sig is not None:
            return PreparedSketch(
                kind="delta",
                base_id=base_id,
                blob=delta.to_bytes(),
                tensors=len(delta),
                signature=sig.astype("<f4").tobytes(),
                bands=[],
                near_base=near,
                base_distance=dist,
            )
    return PreparedSketch(
        kind="model",
        base_id=None,
        blob=sketch.to_bytes(),
        tensors=len(sketch),
        signature=None,
        bands=sketch.band_keys(),
        near_base=near,
    )


def refuse_near_base(prepared: PreparedSketch | None, *, force: bool) -> None:
    """409 when the flagged sketch is a near-duplicate of a reference base, unless forced."""
    if prepared is not None and prepared.near_base is not None and not force:
        raise ReferenceBaseConflict(*prepared.near_base)


def store_flag_sketch(session: Session, *, flag_id: str, prepared: PreparedSketch,
                      algorithm: str) -> SketchRow:
    """Insert a flag's sketch row and its band rows (in the caller's transaction)."""
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
            sketch_id=row.id, base_id=prepared.base_id, signature=prepared.signature
        ))
    for band in sorted(set(prepared.bands)):
        session.add(SketchBand(band=band, sketch_id=row.id))
    session.flush()
    return row


def store_base_sketch(session: Session, *, base_id: str, sketch: Sketch) -> SketchRow:
    """Insert a reference base's raw sketch (in the caller's transaction)."""
    row = SketchRow(
        owner_type="base",
        owner_id=base_id,
        algorithm=sketch.algorithm,
        kind="model",
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
    index = index_for(session)
    bases, banks = index.snapshot()
    candidates: set[int] = set()
    upload_deltas: dict[str, tuple[Stacked, Stacked]] = {}
    for base_id, (_name, b) in bases.items():
        bank = banks.get(base_id)
        if bank is None or not len(bank[1]):
            continue
        if upload.kind == "lora":
            if _lora_coverage(upload, b) < LORA_COVERAGE:
                continue
            delta = upload
        else:
            delta, dist = delta_sketch(upload, b)
            if dist > THRESHOLDS.base_distance or not len(delta):
                continue
        vec = signature(delta, b)
        if vec is None:
            continue
        upload_deltas[base_id] = (stack_sketch(delta), stack_sketch(b))
        matrix, ids = bank
        candidates.update(_top(matrix @ vec, ids, top_k, floor))
    bands = upload.band_keys()
    banded = session.exec(
        select(SketchBand.sketch_id)
        .where(col(SketchBand.band).in_(bands))
        .group_by(col(SketchBand.sketch_id))
        .order_by(func.count().desc(), col(SketchBand.sketch_id))
        .limit(top_k)
    )
    candidates.update(int(s) for s in banded)
    if not candidates:
        return []
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
    skip = set(exclude)
    # Every delta verdict needs at least this pooled cosine (see Thresholds).
    least = min(THRESHOLDS.cosine, THRESHOLDS.carried_cosine) * PREFILTER_MARGIN
    best: dict[str, SketchHit] = {}
    for sid, kind, base_id, blob, flag_id, category, severity, status in rows:
        if flag_id in skip:
            continue
        base = bases.get(base_id) if base_id is not None else None
        if base_id is not None and base is None:
            _log.warning("sketch %s is relative to base %s, whose sketch is missing", sid,
                         base_id)
            continue
        try:
            mine = upload_deltas.get(base_id) if base_id is not None else None
            if (
                kind in ("delta", "lora") and mine is not None
                and pooled_cosine(mine[0], stack_blob(blob), mine[1]) < least
            ):
                continue
            flagged = _DECODED.get(int(sid), blob)
            verdict = verify(
                upload, flagged, base[1] if base else None,
                base_name=base[0] if base else None,
            )
        except Exception:
            _log.exception("sketch %s of flag %s could not be compared; skipped", sid, flag_id)
            continue
        if verdict is None:
            continue
        prev = best.get(flag_id)
        if prev is None or verdict.score > prev.verdict.score:
            best[flag_id] = SketchHit(flag_id, category, severity, status, verdict)
    return sorted(best.values(), key=lambda h: -h.verdict.score)
