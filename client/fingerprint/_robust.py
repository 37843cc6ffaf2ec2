"""Match on the invariant layer: for uploads whose sketch delta cannot be formed.

A model whose hidden units, heads or residual channels were permuted (or whose
residual stream was rotated, or whose norm scales were moved into the matrices)
computes what the flagged model computes, yet its per-tensor sketches no longer
line up with the base's: :func:`~modelhash.fingerprint._similarity.align` pairs
few tensors, and the ordinary delta covers little of the flagged one. The
invariant layer (:mod:`modelhash.fingerprint._invariant`) does not move under
those changes, and its shift from the base is, to first order, a linear sketch of
the delta. So here:

- matrices are paired by key (same shape, spectra within
  :attr:`InvariantThresholds.pair_distance` of each other), else by spectrum within
  each shape, so renamed or reordered layers pair too;
- each model's **shift** from the base, s(W) - s(W_base), is made orthogonal to
  the base's own spectrum (which removes a uniform rescaling of a matrix, q/k
  scaling inside attention among them, and weight decay);
- a factor of a product (:func:`~modelhash.fingerprint._invariant.exposed`) joins
  a shift only where it moved from the base no more than :data:`EXPOSED_RATIO`
  times what the products and other matrices moved, and the copy rule scores those
  alone (:func:`trusted`): a scale moved between two factors moves them, not the
  product;
- scores are pooled over the matrices both shifts cover, as for the sketch layer:
  ``cosine``, ``coefficient`` ⟨u, f⟩ / ‖f‖² and ``z`` (each matrix's cosine times
  √dof, weighted by the flagged shift's norm).

Fine-tunes of one base move their top singular values in much the same direction
(a sibling sits at cosine 0.8 from a flagged fine-tune). Without known-innocent
references only copies are reported (cosine ≥ :attr:`copy_cosine`, coefficient near
1). With at least :attr:`~modelhash.fingerprint._similarity.Thresholds.shared_min_samples`
references, the direction they share is removed from both shifts first (see
:func:`shared_shift`), and merges are reported too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from modelhash.fingerprint._invariant import INVARIANT_ALGORITHM, Spectra, Spectrum, exposed

__all__ = [
    "INVARIANT_THRESHOLDS",
    "InvariantComparison",
    "InvariantThresholds",
    "base_distance",
    "calibrated_invariant",
    "compare_invariant",
    "match_invariant",
    "pair",
    "shared_shift",
    "spread_pairs",
    "trusted",
    "upper_bar",
]

F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class InvariantThresholds:
    """Decision thresholds for the invariant layer (from ``benchmarks/eval_derivatives.py``)."""

    copy_cosine: float = 0.95
    """Without references: the least cosine of a reported copy."""
    copy_coefficient: tuple[float, float] = (0.8, 1.25)
    """Without references: the coefficients of a copy (all of the flagged shift)."""
    shared_cosine: float = 0.5
    """With the references' shared shift removed: the least cosine of a match."""
    shared_min_coefficient: float = 0.3
    """With it removed: the least coefficient (a 30/70 merge and up)."""
    z: float = 8.0
    """The least z of any match."""
    near_cosine: float = 0.95
    """A match this close, with a coefficient in :attr:`copy_coefficient`, is a
    near-duplicate."""
    pair_distance: float = 0.05
    """Largest relative distance between two spectra that pair as one matrix."""
    base_distance: float = 0.05
    """Largest pooled relative distance of a model's spectra from a base's for the
    model to count as derived from it (fine-tunes: 1e-4 to 1e-2)."""
    raw_distance: float = 2e-4
    """Without a base: the largest pooled relative distance that is a near-duplicate.
    Casting to float16 moves the top singular values of an n-wide matrix by about
    2^-11 / sqrt(n) of themselves, and a product's by up to twice that: up to 1.0e-4
    for 48-wide products (``benchmarks/eval_raw_invariant.py``), and by the same
    law about 1e-5 at n = 4096. A dense fine-tune of relative size 1e-3 moves them
    1.5e-4 (it is derived from the flagged model, and reported as such); siblings of
    one base sit 2.9e-3 and more apart."""
    thin_coverage: float = 0.5
    """The ordinary delta is *thin* when the tensors it compares hold less than this
    share of the flagged delta's energy; the invariant layer then decides."""
    sketch_ratio: float = 4.0
    """The ordinary delta is not trusted either when the upload's sketch distance from
    the base is more than this multiple of its spectral distance: a fine-tune moves
    both by about the same relative amount, while scales moved across a norm or
    between queries and keys leave the tensors aligned but change them by far more
    than the spectra."""
    min_matrices: int = 2
    """Matrices both shifts must cover."""
    distorted_distance: float = math.inf
    """A fully aligned upload whose sketch is at least this far (relative) from the
    base has a *distorted* sketch delta: only then may the merge rule overrule the
    sketch layer; otherwise the sketch layer reads the delta and the invariant layer
    reports copies alone. Calibration sets it from the references (see
    :func:`modelhash.fingerprint._similarity.calibrated`); infinite without them,
    when the merge rule does not apply anyway."""


INVARIANT_THRESHOLDS = InvariantThresholds()


def _rel(a: F64, b: F64) -> tuple[float, float]:
    k = min(len(a), len(b))
    d = a[:k] - b[:k]
    return float(d @ d), float(b[:k] @ b[:k])


def pair(x: Spectra, ref: Spectra, max_distance: float = INVARIANT_THRESHOLDS.pair_distance
         ) -> dict[str, str]:
    """Pair matrices of ``x`` with those of ``ref`` (ref key -> x key): same key and
    shape first, then greedily by relative spectral distance within each shape."""
    out: dict[str, str] = {}
    for k, s in ref.items.items():
        o = x.items.get(k)
        if o is not None and o.shape == s.shape:
            dd, bb = _rel(o.values, s.values)
            if bb > 0 and dd <= max_distance**2 * bb:
                out[k] = k
    used = set(out.values())
    free_x: dict[tuple[int, int], list[Spectrum]] = {}
    for k, s in x.items.items():
        if k not in used:
            free_x.setdefault(s.shape, []).append(s)
    for k, s in ref.items.items():
        if k in out or not free_x.get(s.shape):
            continue
        cands = free_x[s.shape]
        best: tuple[float, int] | None = None
        for i, o in enumerate(cands):
            dd, bb = _rel(o.values, s.values)
            if bb > 0 and dd <= max_distance**2 * bb and (best is None or dd < best[0]):
                best = (dd, i)
        if best is not None:
            out[k] = cands.pop(best[1]).key
    return out


EXPOSED_RATIO = 3.0
"""A factor's spectrum (see :func:`~modelhash.fingerprint._invariant.exposed`) joins a
shift only if it moved from the base by at most this multiple of what the products
and other invariant matrices moved (pooled, relative): a fine-tune moves both alike,
a scale moved between the factors moves the factor by far more."""


def trusted(x: Spectra) -> Spectra:
    """``x`` without the factors of products (:func:`~modelhash.fingerprint._invariant.
    exposed`): what no function-preserving change moves. Where fewer than
    :attr:`InvariantThresholds.min_matrices` others were measured (a large model with
    grouped-query attention may be measured on its keys and values alone), ``x``
    whole: the factors are then all there is to compare."""
    ex = exposed(x.items)
    if not ex:
        return x
    kept = {k: v for k, v in x.items.items() if k not in ex}
    if len(kept) < INVARIANT_THRESHOLDS.min_matrices:
        return x
    return Spectra(kept, algorithm=x.algorithm)


def base_distance(x: Spectra, base: Spectra,
                  max_distance: float = INVARIANT_THRESHOLDS.pair_distance) -> float:
    """Pooled relative distance ‖s(x) - s(base)‖ / ‖s(base)‖ over paired matrices that
    no function-preserving change moves (infinity when none pair)."""
    x, base = trusted(x), trusted(base)
    pairs = pair(x, base, max_distance)
    num = den = 0.0
    for bk, xk in pairs.items():
        dd, bb = _rel(x.items[xk].values, base.items[bk].values)
        num, den = num + dd, den + bb
    return math.sqrt(num / den) if den > 0 else math.inf


def shifts(x: Spectra, base: Spectra) -> dict[str, F64]:
    """``x``'s shift from ``base`` per base key, each orthogonal to the base spectrum;
    a factor of a product only where it moved about as much as the rest
    (:data:`EXPOSED_RATIO`)."""
    out: dict[str, F64] = {}
    pairs = pair(x, base)
    ex = exposed(base.items)
    num = den = 0.0
    for bk, xk in pairs.items():
        if bk not in ex:
            dd, bb = _rel(x.items[xk].values, base.items[bk].values)
            num, den = num + dd, den + bb
    # With nothing but factors measured, there is nothing to hold them against.
    limit = EXPOSED_RATIO**2 * num / den if den > 0 else math.inf
    for bk, xk in pairs.items():
        if bk in ex:
            dd, bb = _rel(x.items[xk].values, base.items[bk].values)
            if dd > limit * bb:
                continue
        b = base.items[bk].values
        k = min(len(b), len(x.items[xk].values))
        b = b[:k]
        d = x.items[xk].values[:k] - b
        bb = float(b @ b)
        if bb > 0:
            out[bk] = d - (float(d @ b) / bb) * b
    return out


def shared_shift(samples: list[Spectra], base: Spectra, min_samples: int,
                 thresholds: InvariantThresholds = INVARIANT_THRESHOLDS) -> Spectra | None:
    """The shift that known-innocent derivatives of ``base`` share: the mean of their
    unit (pooled) shifts, matrix by matrix; None with fewer than ``min_samples``."""
    sums: dict[str, F64] = {}
    counts: dict[str, int] = {}
    used = 0
    for sample in samples:
        dist = base_distance(sample, base)
        if not (0 < dist <= thresholds.base_distance):
            continue
        vecs = shifts(sample, base)
        norm = math.sqrt(sum(float(v @ v) for v in vecs.values()))
        if not vecs or not math.isfinite(norm) or norm == 0:
            continue
        used += 1
        for k, v in vecs.items():
            if k in sums and len(sums[k]) != len(v):
                continue
            sums[k] = sums.get(k, np.zeros(len(v))) + v / norm
            counts[k] = counts.get(k, 0) + 1
    if used < min_samples:
        return None
    return Spectra({k: Spectrum(k, base.items[k].shape, sums[k] / counts[k]) for k in sums})


def calibrated_invariant(
    samples: list[Spectra], base: Spectra, sigmas: float,
    thresholds: InvariantThresholds = INVARIANT_THRESHOLDS, max_pairs: int = 60,
) -> InvariantThresholds:
    """``thresholds`` with the merge rule's cosine and coefficient raised to at least
    the mean plus ``sigmas`` standard deviations of the references' pairwise scores,
    each pair scored with the shared shift of the *other* references removed (the
    invariant twin of :func:`modelhash.fingerprint._similarity.calibrated`; the
    merge rule needs a shared shift, so at least four derivatives of ``base``)."""
    kept = [s for s in samples if 0 < base_distance(s, base) <= thresholds.base_distance]
    if len(kept) < 4:
        return thresholds
    cosines: list[float] = []
    coefficients: list[float] = []
    for i, j in spread_pairs(len(kept), max_pairs):
        others = [s for k, s in enumerate(kept) if k not in (i, j)]
        shared = shared_shift(others, base, 2, thresholds)
        c = compare_invariant(kept[i], kept[j], base, shared=shared, thresholds=thresholds)
        if c.cosine is not None and c.coefficient is not None and c.shared_removed:
            cosines.append(c.cosine)
            coefficients.append(c.coefficient)
    if len(cosines) < 2:
        return thresholds
    cos, coef = upper_bar(cosines, sigmas), upper_bar(coefficients, sigmas)
    return replace(thresholds, shared_cosine=max(thresholds.shared_cosine, cos),
                   shared_min_coefficient=max(thresholds.shared_min_coefficient, coef))


def spread_pairs(n: int, most: int) -> list[tuple[int, int]]:
    """Ordered pairs (i, j), i != j, of ``n`` references for calibration: at most
    about ``most`` of them, taken at an even stride so that every reference is in
    some."""
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    return pairs[:: max(1, -(-len(pairs) // most))]


def upper_bar(scores: list[float], sigmas: float) -> float:
    """The mean of innocent pairs' ``scores`` plus ``sigmas`` standard deviations."""
    return float(np.mean(scores) + sigmas * np.std(scores, ddof=1))


@dataclass(frozen=True)
class Scores:
    """Pooled scores of an upload's shift against a flagged model's over some matrices."""

    cosine: float
    coefficient: float
    z: float
    matrices: int


@dataclass(frozen=True)
class InvariantComparison:
    """Scores of an upload's invariant shift against a flagged model's (None if none)."""

    cosine: float | None = None
    coefficient: float | None = None
    z: float | None = None
    matrices: int = 0
    base_distance: float | None = None
    raw_distance: float | None = None
    shared_removed: bool = False
    strict: Scores | None = None
    """The same scores over the products and other matrices alone, leaving out the
    factors (see :func:`trusted`): the copy rule's, since a factor that moved
    less than :data:`EXPOSED_RATIO` times the rest may still carry a mild scale."""

    def evidence(self) -> dict[str, Any]:
        """The evidence a verdict on this comparison carries."""
        out: dict[str, Any] = {"layer": "invariant", "algorithm": INVARIANT_ALGORITHM,
                               "invariant": True, "matrices_compared": self.matrices}
        if self.cosine is not None:
            out.update(cosine=round(self.cosine, 4), coefficient=round(self.coefficient or 0.0, 4),
                       z=round(self.z or 0.0, 2))
        if self.shared_removed:
            out["shared_direction_removed"] = True
        if self.base_distance is not None:
            out["base_distance"] = round(self.base_distance, 6)
        if self.raw_distance is not None:
            out["raw_distance"] = round(self.raw_distance, 8)
        return out


def compare_invariant(
    upload: Spectra, flagged: Spectra, base: Spectra | None, *,
    shared: Spectra | None = None, thresholds: InvariantThresholds = INVARIANT_THRESHOLDS,
) -> InvariantComparison:
    """Every score of ``upload``'s spectra against ``flagged``'s, relative to ``base``."""
    raw = base_distance(upload, flagged, thresholds.pair_distance)
    kept = trusted(flagged)
    covered = len(pair(trusted(upload), kept, thresholds.pair_distance))
    enough = covered >= max(thresholds.min_matrices, 0.5 * len(kept))
    raw_d = raw if math.isfinite(raw) and enough else None
    if base is None:
        return InvariantComparison(raw_distance=raw_d)
    up_dist = base_distance(upload, base)
    if not up_dist <= thresholds.base_distance:
        return InvariantComparison(base_distance=up_dist if math.isfinite(up_dist) else None,
                                   raw_distance=raw_d)
    us, fs = shifts(upload, base), shifts(flagged, base)
    keys = [k for k in fs if k in us and len(us[k]) == len(fs[k])]
    removed = False
    if shared is not None:
        s = {k: shared.items[k].values for k in keys
             if k in shared.items and len(shared.items[k].values) == len(fs[k])}
        ss = sum(float(v @ v) for v in s.values())
        if ss > 0 and len(s) >= 0.5 * len(keys):
            pu = sum(float(us[k] @ v) for k, v in s.items()) / ss
            pf = sum(float(fs[k] @ v) for k, v in s.items()) / ss
            us = {k: us[k] - pu * s[k] if k in s else us[k] for k in keys}
            fs = {k: fs[k] - pf * s[k] if k in s else fs[k] for k in keys}
            removed = True
    everything = _scores(us, fs, keys)
    if everything is None:
        return InvariantComparison(base_distance=up_dist, raw_distance=raw_d)
    safe = trusted(base).items
    strict = [k for k in keys if k in safe]
    return InvariantComparison(
        cosine=everything.cosine,
        coefficient=everything.coefficient,
        z=everything.z,
        matrices=everything.matrices,
        base_distance=up_dist,
        raw_distance=raw_d,
        shared_removed=removed,
        strict=everything if len(strict) == len(keys) else _scores(us, fs, strict),
    )


def _scores(us: dict[str, F64], fs: dict[str, F64], keys: list[str]) -> Scores | None:
    """Pooled cosine, coefficient and z of shifts ``us`` against ``fs`` over ``keys``."""
    dot = uu = ff = zsum = wsum = 0.0
    n = 0
    for k in keys:
        u, f = us[k], fs[k]
        nu, nf = float(np.linalg.norm(u)), float(np.linalg.norm(f))
        if nf == 0:
            continue
        d = float(u @ f)
        dot, uu, ff = dot + d, uu + nu * nu, ff + nf * nf
        c = d / (nu * nf) if nu > 0 else 0.0
        zsum += nf * c * math.sqrt(max(1, len(f) - 1))
        wsum += nf * nf
        n += 1
    if n == 0:
        return None
    return Scores(dot / math.sqrt(uu * ff) if uu > 0 else 0.0, dot / ff, zsum / math.sqrt(wsum), n)


def match_invariant(
    upload: Spectra, flagged: Spectra, base: Spectra | None, *,
    shared: Spectra | None = None, thresholds: InvariantThresholds = INVARIANT_THRESHOLDS,
) -> tuple[str, float, InvariantComparison] | None:
    """The verdict type, score and comparison when the invariant layer matches."""
    t = thresholds
    c = compare_invariant(upload, flagged, base, shared=shared, thresholds=t)
    lo, hi = t.copy_coefficient
    s = c.strict
    if (s is not None and s.matrices >= t.min_matrices and s.z >= t.z
            and s.cosine >= t.copy_cosine and lo <= s.coefficient <= hi):
        # A copy, on the spectra nothing function-preserving moves.
        near = s.cosine >= t.near_cosine
        c = replace(c, cosine=s.cosine, coefficient=s.coefficient, z=s.z, matrices=s.matrices)
        return ("near-duplicate" if near else "derived"), s.cosine, c
    # A merge, with the references' shared shift removed, on every matrix that moved
    # with the rest (the products and other matrices alone are fewer: scored on them
    # too, merges would need a higher calibrated bar, and more were missed than found).
    if (c.cosine is not None and c.coefficient is not None and c.z is not None
            and c.matrices >= t.min_matrices and c.z >= t.z and c.shared_removed
            and c.cosine >= t.shared_cosine and c.coefficient >= t.shared_min_coefficient):
        near = c.cosine >= t.near_cosine and lo <= c.coefficient <= hi
        return ("near-duplicate" if near else "derived"), c.cosine, c
    if base is None and c.raw_distance is not None and c.raw_distance <= t.raw_distance:
        return "near-duplicate", 1.0 - c.raw_distance, c
    return None
