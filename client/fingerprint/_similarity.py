"""Compare sketches: is an upload a re-upload, derivative or carrier of a flagged item?

Pure numpy on :class:`~modelhash.fingerprint._sketch.Sketch` values, so the registry can
verify its candidates with the exact code the client ships.

Every fine-tune of a base is nearly identical to that base and to its siblings, so
raw similarity cannot tell them apart; the **delta** from a reference base can. The
upload's tensors are first aligned with the base's: by canonical key when the two
agree, otherwise by shape and raw sketch cosine (a derivative's tensor sits at cosine
≈ 0.99 from its base's, unrelated tensors near 0), so ldm and diffusers spellings
line up without a name table. Each delta is then made orthogonal to the base's own
sketch, which removes uniform rescaling and weight decay, a direction every
fine-tune of that base shares. Over the tensors both deltas cover (the VAE left
out, see :data:`NOT_SCORED`):

- ``cosine`` of the pooled deltas (the score);
- ``coefficient`` ⟨u, f⟩ / ‖f‖², the estimated merge fraction or LoRA strength;
- ``z``, which combines per-tensor cosines c_t, each ~N(0, 1/dof_t) for unrelated
  deltas, with weights ‖f_t‖ that depend on the flagged item only:
  z = Σ w_t c_t √dof_t / √Σ w_t².

A match needs ``z`` ≥ :attr:`Thresholds.z` and either ``cosine`` ≥
:attr:`Thresholds.cosine` (against a fine-tune, with a coefficient of at least
:attr:`Thresholds.min_coefficient`: merges of many siblings reach a high cosine
with little of the flagged delta in them; against an adapter, ``cosine`` ≥
:attr:`Thresholds.lora_cosine`, as adapters for similar tasks share a
direction), or a coefficient near 1 with a lower cosine floor: the upload then
carries all of the flagged delta plus unrelated changes (pruning, another LoRA
baked on top, coarse quantisation), which lower the cosine but leave the
coefficient unbiased. z alone would flag siblings, whose
deltas are genuinely (if weakly) correlated, and cosine alone is noisy on small
models. Without a base only near-duplicates can be found, by the relative distance
of the raw sketches.

Deltas of one base share a direction beyond weight decay: every fine-tune or
adapter moves away from what the base learnt in a similar way. Given known-innocent
derivatives of the base (public fine-tunes, public adapters), :func:`shared_direction`
estimates it as the mean of their unit deltas, and ``compare(..., shared=...)``
removes it from both deltas before scoring, so what is left is what makes each
derivative itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from modelhash.fingerprint._blocks import BlockName, block_of
from modelhash.fingerprint._invariant import comparable
from modelhash.fingerprint._robust import (
    INVARIANT_THRESHOLDS,
    InvariantThresholds,
    calibrated_invariant,
    match_invariant,
    shared_shift,
    spread_pairs,
    upper_bar,
)
from modelhash.fingerprint._robust import (
    base_distance as spectral_distance,
)
from modelhash.fingerprint._sketch import Sketch, TensorSketch

__all__ = [
    "NOT_SCORED",
    "THRESHOLDS",
    "BlockScore",
    "Comparison",
    "Match",
    "Thresholds",
    "align",
    "calibrated",
    "compare",
    "delta_sketch",
    "match",
    "scored",
    "shared_direction",
    "storage_copy",
]

F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Thresholds:
    """Decision thresholds, chosen from ``benchmarks/eval_derivatives.py``."""

    cosine: float = 0.3
    """Minimum delta cosine for a delta match on cosine alone."""
    min_coefficient: float = 0.3
    """Minimum coefficient for that match against a fine-tune's delta.

    Fine-tunes of one base share part of their deltas (the coefficient of a sibling
    against the flagged item is that shared fraction, up to 0.24 measured). A merge
    of many innocent siblings averages their own parts away, so its *cosine* with
    the flagged delta rises with the number of ingredients (0.34 for four) while its
    coefficient stays at the shared fraction. Not applied to flagged adapters,
    whose deltas siblings do not share and which are baked at any strength.
    """
    lora_cosine: float = 0.6
    """Minimum delta cosine for a match on cosine alone against a flagged adapter.

    Adapters trained on similar tasks share a direction: in the evaluation, other
    LoRAs on the same tiny Llama reached cosine 0.53 (coefficient 0.47) with a
    flagged one and matched in 4 of 10 cases at the fine-tune threshold of 0.3. No
    coefficient floor separates them: a flagged LoRA baked at half strength into a
    fine-tune with as large a delta sits at cosine 0.45, coefficient 0.5. Such a
    partial carrier is therefore reported only above this cosine, or at strength
    0.7 or more through the carried rule; a false match on an innocent adapter
    costs more than that recall.
    """
    shared_min_coefficient: float = 0.25
    """:attr:`min_coefficient` when the base's shared direction was removed.

    The floor above compensates for the part of their deltas that siblings share.
    Once that part is estimated from known-innocent references and removed (see
    :func:`shared_direction`), siblings' coefficients fall (0.29 to 0.15 in the
    evaluation) and so do true merge fractions, which it had inflated (a 30/70 merge:
    0.41 to 0.33); the floor sits in the middle of the new gap.
    """
    shared_cosine: float = 0.3
    """:attr:`cosine` when the base's shared direction was removed (the same by
    default; :func:`calibrated` may raise the two apart)."""
    shared_lora_cosine: float = 0.5
    """:attr:`lora_cosine` when the base's shared adapter direction was removed
    (other adapters: 0.57 to 0.37; a flagged LoRA mixed with another: 0.77 to 0.64)."""
    shared_min_samples: int = 4
    """Known-innocent references a shared direction needs before it is used.

    With fewer, the mean is mostly the samples' own deltas and removes too little of
    what they share for the lower thresholds above to be safe."""
    carried_cosine: float = 0.1
    """Minimum delta cosine when the coefficient shows the whole flagged delta is present."""
    carried_coefficient: tuple[float, float] = (0.7, 1.5)
    """Coefficients that mean "all of the flagged delta, plus other changes"."""
    z: float = 8.0
    """Minimum z for any delta match (8 sigma: no false positive from sketch noise)."""
    near_cosine: float = 0.9
    """A delta match at least this close, with coefficient near 1, is a near-duplicate."""
    near_coefficient: tuple[float, float] = (0.8, 1.25)
    raw_distance: float = 0.005
    """Without a base: the largest raw relative distance that is a near-duplicate."""
    raw_coverage: float = 0.5
    """Without a base: the share of the flagged tensors the upload must align with."""
    near_delta_ratio: float = 0.5
    """With a base, a raw near-duplicate must also be closer to the flagged model than
    half the flagged model's own distance from the base: a fine-tune's delta is 1e-4
    to 1e-2 of the weights, so the raw distance alone would call the base itself, and
    every sibling, a near-duplicate of it."""
    copy_tolerance: float = 1.5
    """How far (as a factor) a tensor's distance from the base may sit from a storage
    precision's rounding level (:data:`CAST_LEVELS`) and still count as that cast."""
    copy_exact: float = 1e-5
    """Relative distance below which a tensor is the base's own, re-saved."""
    pair_cosine: float = 0.5
    """Minimum raw cosine for two tensors to be aligned across models."""
    base_distance: float = 0.5
    """An upload farther than this (relative) from the base is not derived from it."""
    invariant: InvariantThresholds = INVARIANT_THRESHOLDS
    """The invariant layer's own (see :mod:`modelhash.fingerprint._robust`)."""


THRESHOLDS = Thresholds()

NOT_SCORED = ("vae:",)
"""Key prefixes (components) left out of every delta score.

A checkpoint's VAE says nothing about which fine-tune it is: replacement VAEs are
swapped freely, and a popular one (SD 1.x's ft-MSE, say) is baked into thousands of
unrelated checkpoints. Its delta from the base's VAE is large next to a
fine-tune's own (a long decoder-only training run), so leaving it in would make
every checkpoint with the same baked VAE match a flagged one that has it, and let
a VAE swap hide a flagged fine-tune. Raw near-duplicate matching still uses it.
"""


CAST_LEVELS: dict[str, float] = {
    "float16": 2.1e-4,
    "bfloat16": 1.75e-3,
}
"""Relative sketch distance ‖S(cast(W)) - S(W)‖ / ‖S(W)‖ that storing weights at each
precision causes. Measured on Gaussian, Laplace and Student-t(3) weights of two
shapes: float16 2.0-2.2e-4, bfloat16 1.65-1.90e-3. Floating formats round relative
to each value, so the level hardly depends on the weights. float8 (e4m3 2.4-3.1e-2,
e5m2 5.1-6.0e-2) is left out: its level is where real fine-tunes' deltas lie, so a
uniform fine-tune of that size could not be told from an fp8 copy of its base."""


SHARED_COVERAGE = 0.5
"""Share of the compared tensors a shared direction must cover to be removed."""


def scored(key: str) -> bool:
    """Whether a tensor key takes part in delta scores (see :data:`NOT_SCORED`)."""
    return not key.startswith(NOT_SCORED)


@dataclass(frozen=True)
class BlockScore:
    """The scores of one part of one block: where the flagged delta sits, and whether
    the upload carries it there.

    ``share`` is the block's share of the flagged delta's energy (its squared norm),
    ``upload_share`` the same for the upload's delta; ``cosine`` and ``coefficient``
    are the pooled scores over the block's tensors that both deltas have (None, and
    ``tensors`` 0, where only the upload changed the block).
    """

    component: str
    block: str
    label: str
    part: str
    tensors: int
    cosine: float | None
    coefficient: float | None
    share: float
    upload_share: float

    def to_json(self) -> dict[str, Any]:
        def r(x: float | None) -> float | None:
            return None if x is None else round(x, 4)

        return {
            "component": self.component, "block": self.block, "label": self.label,
            "part": self.part, "tensors": self.tensors, "cosine": r(self.cosine),
            "coefficient": r(self.coefficient), "share": r(self.share),
            "upload_share": r(self.upload_share),
        }


@dataclass(frozen=True)
class Comparison:
    """Scores of one upload against one flagged item (None where not computable)."""

    cosine: float | None = None
    coefficient: float | None = None
    z: float | None = None
    tensors: int = 0
    base: str | None = None
    base_distance: float | None = None
    raw_distance: float | None = None
    raw_coverage: float = 0.0
    shared_removed: bool = False
    flagged_base_distance: float | None = None
    blocks: tuple[BlockScore, ...] = ()
    coverage: float = 0.0
    """Share of the flagged delta's energy on the tensors compared (0 when none)."""


@dataclass(frozen=True)
class Match:
    """A verdict: the match type, its score, and the evidence behind it."""

    match: str
    score: float
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"match": self.match, "score": round(self.score, 4), "evidence": self.evidence}


MAX_GREEDY_PAIRS = 2048 * 2048
"""Most same-shape tensor pairs :func:`align` scores at once (about 100 MB of work)."""


def _flat(t: TensorSketch) -> F64:
    return t.values.reshape(-1)


def align(x: Sketch, ref: Sketch, min_cosine: float = THRESHOLDS.pair_cosine) -> dict[str, str]:
    """Pair tensors of ``x`` with tensors of ``ref`` (ref key -> x key).

    Same key and shape first, kept if their raw cosine is at least ``min_cosine``;
    the rest are paired greedily within each shape by raw cosine, best first. The
    greedy step compares every pair of a shape, so a shape whose unpaired tensors
    would make more than :data:`MAX_GREEDY_PAIRS` pairs is left to the key pass:
    no real model leaves that many same-shape tensors unpaired, and a crafted
    sketch of many tiny tensors would otherwise need gigabytes for one comparison.
    """
    pairs: dict[str, str] = {}
    for k, t in ref.tensors.items():
        other = x.tensors.get(k)
        if other is None or other.shape != t.shape:
            continue
        if _cos(_flat(t), _flat(other)) >= min_cosine:
            pairs[k] = k
    used = set(pairs.values())
    free_ref: dict[tuple[int, int], list[str]] = {}
    free_x: dict[tuple[int, int], list[str]] = {}
    for k, t in ref.tensors.items():
        if k not in pairs:
            free_ref.setdefault(t.shape, []).append(k)
    for k, t in x.tensors.items():
        if k not in used:
            free_x.setdefault(t.shape, []).append(k)
    for shape, rkeys in free_ref.items():
        xkeys = free_x.get(shape)
        if not xkeys or len(rkeys) * len(xkeys) > MAX_GREEDY_PAIRS:
            continue
        r = _unit_rows([ref.tensors[k] for k in rkeys])
        c = _unit_rows([x.tensors[k] for k in xkeys])
        sims = r @ c.T
        taken_r: set[int] = set()
        taken_c: set[int] = set()
        for flat in np.argsort(-sims, axis=None):
            i, j = divmod(int(flat), len(xkeys))
            if sims[i, j] < min_cosine:
                break
            if i in taken_r or j in taken_c:
                continue
            taken_r.add(i)
            taken_c.add(j)
            pairs[rkeys[i]] = xkeys[j]
    return pairs


def _unit_rows(ts: list[TensorSketch]) -> F64:
    m = np.stack([_flat(t) for t in ts])
    norms = np.linalg.norm(m, axis=1, keepdims=True)
    out: F64 = m / np.where(norms > 0, norms, 1.0)
    return out


def _cos(a: F64, b: F64) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return float(a @ b) / (na * nb) if na > 0 and nb > 0 else 0.0


def delta_sketch(model: Sketch, base: Sketch) -> tuple[Sketch, float]:
    """``model`` minus ``base`` on aligned tensors, keyed by the base's keys.

    Also returns the relative distance ‖model - base‖ / ‖base‖ over the aligned
    tensors that are scored (never the VAE, see :data:`NOT_SCORED`: a swapped VAE
    must not change which base a model is nearest to); an empty delta and infinity
    when nothing aligns.
    """
    pairs = align(model, base)
    out: dict[str, TensorSketch] = {}
    num = den = 0.0
    for bk, mk in pairs.items():
        b = base.tensors[bk]
        d = model.tensors[mk].values - b.values
        out[bk] = TensorSketch(bk, b.shape, d)
        if scored(bk):
            num += float(np.sum(d * d))
            den += float(np.sum(b.values * b.values))
    dist = math.sqrt(num / den) if den > 0 else math.inf
    return Sketch("delta", out), dist


def _orthogonal(d: F64, b: TensorSketch | None, shape: tuple[int, int]) -> F64:
    if b is None or b.shape != shape:
        return d
    bv = _flat(b)
    nb = float(bv @ bv)
    if nb == 0:
        return d
    out: F64 = d - (float(d @ bv) / nb) * bv
    return out


def _deltas(s: Sketch, base: Sketch | None) -> tuple[Sketch | None, float | None]:
    if s.kind != "model":
        return s, None
    if base is None:
        return None, None
    return delta_sketch(s, base)


def _pooled(delta: Sketch, base: Sketch) -> dict[str, F64]:
    """A delta's scored tensors, each made orthogonal to the base's tensor of its key."""
    out: dict[str, F64] = {}
    for key, t in delta.tensors.items():
        b = base.tensors.get(key)
        if scored(key) and b is not None and b.shape == t.shape:
            out[key] = _orthogonal(_flat(t), b, t.shape)
    return out


def _unit_deltas(
    samples: list[Sketch], base: Sketch, thresholds: Thresholds
) -> list[tuple[Sketch, dict[str, F64]]]:
    """The samples that are derivatives of ``base``, each with its unit pooled delta."""
    out: list[tuple[Sketch, dict[str, F64]]] = []
    for sample in samples:
        if sample.kind == "model":
            delta, dist = delta_sketch(sample, base)
            if not (thresholds.raw_distance < dist <= thresholds.base_distance):
                continue
        elif sample.kind == "lora":
            delta = sample
        else:
            continue
        vecs = _pooled(delta, base)
        norm = math.sqrt(sum(float(v @ v) for v in vecs.values()))
        if not vecs or not math.isfinite(norm) or norm == 0:
            continue
        out.append((sample, {k: v / norm for k, v in vecs.items()}))
    return out


def _mean_direction(units: list[dict[str, F64]], base: Sketch) -> Sketch:
    """The tensor-by-tensor mean of unit deltas (over the units that cover a tensor)."""
    sums: dict[str, F64] = {}
    counts: dict[str, int] = {}
    for vecs in units:
        for key, v in vecs.items():
            sums[key] = sums.get(key, 0.0) + v
            counts[key] = counts.get(key, 0) + 1
    return Sketch("delta", {
        k: TensorSketch(k, base.tensors[k].shape, (sums[k] / counts[k]).reshape(
            base.tensors[k].values.shape
        ))
        for k in sums
    })


def shared_direction(
    samples: list[Sketch], base: Sketch, *, thresholds: Thresholds = THRESHOLDS
) -> Sketch | None:
    """The direction that known-innocent derivatives of ``base`` share, or None.

    ``samples`` are raw sketches of fine-tunes of ``base`` (kind ``model``) or
    adapters on it (kind ``lora``). Each sample's delta, made orthogonal to the base
    tensor by tensor as :func:`compare` does, is scaled to unit norm over its scored
    tensors, and the result is their mean, tensor by tensor (a tensor's mean is over
    the samples that cover it). Samples that are not derivatives of ``base`` (too
    far, or the base itself) are skipped; None with fewer than
    :attr:`Thresholds.shared_min_samples` left. Unrelated deltas of a base are close to
    orthogonal, so the mean keeps only what they have in common; in the evaluation
    one such direction carried most of the similarity between innocent adapters.
    The result is a ``delta`` sketch keyed by the base's keys.
    """
    units = _unit_deltas(samples, base, thresholds)
    invariant = None
    if base.invariant is not None:
        invariant = shared_shift(
            [s.invariant for s in samples if s.kind == "model" and s.invariant is not None],
            base.invariant, thresholds.shared_min_samples,
        )
    if len(units) < thresholds.shared_min_samples:
        return Sketch("delta", {}, invariant=invariant) if invariant is not None else None
    found = _mean_direction([u for _s, u in units], base)
    found.invariant = invariant
    return found


CALIBRATION_SIGMAS = 3.0
"""How far above the mean of the references' pairwise scores a base's thresholds sit."""
DISTORTED_FACTOR = 2.5
"""An aligned upload's sketch delta is distorted (scales moved across a norm or
between queries and keys) when it is this many times farther from the base than the
farthest known-innocent fine-tune (see :attr:`InvariantThresholds.distorted_distance`)."""
CALIBRATION_MIN_SAMPLES = 3
"""References a calibration needs (six ordered pairs)."""
CALIBRATION_MAX_PAIRS = 60
"""Most ordered reference pairs scored for one calibration (evenly spaced over all
of them): enough to estimate a spread, bounded in cost (about 2 s for an SD-sized
base with 24 references, once per base and reference set)."""


def calibrated(
    samples: list[Sketch], base: Sketch, *, thresholds: Thresholds = THRESHOLDS
) -> Thresholds:
    """``thresholds``, raised where known-innocent derivatives of ``base`` are more
    alike than the fixed thresholds assume.

    How much two innocent fine-tunes of one base share depends on the base and on
    what people train on it: in the evaluation's Flux family two innocent fine-tunes
    reached delta cosine 0.32, coefficient 0.30 with the shared direction removed,
    where the SD family's stayed under 0.17. The references registered for a base
    (``samples``, as for :func:`shared_direction`) are a sample of that similarity:
    each ordered pair of them is scored as :func:`compare` would score an innocent
    upload against an innocent flag, with the shared direction estimated from the
    *other* references (so neither member of the pair is in it, as neither an
    upload nor a flag is among the references). The thresholds that decide a delta
    match without the whole flagged delta present (the cosine, the coefficient
    floor, and the adapter cosine, with or without the shared direction) are then
    raised to at least the pairs' mean plus :data:`CALIBRATION_SIGMAS` standard
    deviations; they are never lowered. Near-duplicates and the carried rule
    (coefficient near 1) are unaffected. With fewer than
    :data:`CALIBRATION_MIN_SAMPLES` references the fixed thresholds apply.
    """
    units = _unit_deltas(samples, base, thresholds)
    if len(units) < CALIBRATION_MIN_SAMPLES:
        return thresholds
    pairs = spread_pairs(len(units), CALIBRATION_MAX_PAIRS)
    # Each sample's delta once: compare() takes a delta as it is.
    deltas = [delta_sketch(u, base)[0] if u.kind == "model" else u for u, _v in units]

    def level(removed: bool) -> tuple[float, float] | None:
        cosines: list[float] = []
        coefficients: list[float] = []
        for i, j in pairs:
            shared = _mean_direction(
                [u for k, (_s, u) in enumerate(units) if k not in (i, j)], base
            ) if removed else None
            c = compare(deltas[i], deltas[j], base, thresholds=thresholds, shared=shared)
            if c.cosine is not None and c.coefficient is not None and c.tensors:
                cosines.append(c.cosine)
                coefficients.append(c.coefficient)
        if len(cosines) < 2:
            return None
        return upper_bar(cosines, CALIBRATION_SIGMAS), upper_bar(coefficients, CALIBRATION_SIGMAS)

    t = thresholds
    if base.invariant is not None:
        spectra = [s.invariant for s, _u in units if s.kind == "model" and s.invariant is not None]
        t = replace(t, invariant=calibrated_invariant(
            spectra, base.invariant, CALIBRATION_SIGMAS, t.invariant, CALIBRATION_MAX_PAIRS))
    farthest = [delta_sketch(s, base)[1] for s, _u in units if s.kind == "model"]
    if farthest:
        t = replace(t, invariant=replace(
            t.invariant, distorted_distance=min(t.invariant.distorted_distance,
                                                DISTORTED_FACTOR * max(farthest))))
    raw = level(False)
    if raw is not None:
        t = replace(t, cosine=max(t.cosine, raw[0]), min_coefficient=max(t.min_coefficient, raw[1]),
                    lora_cosine=max(t.lora_cosine, raw[0]))
    # The shared direction of the other references (at least two) stands in for
    # the one a check removes.
    removed = level(True) if len(units) >= 4 else None
    if removed is not None:
        t = replace(t, shared_cosine=max(t.shared_cosine, removed[0]),
                    shared_min_coefficient=max(t.shared_min_coefficient, removed[1]),
                    shared_lora_cosine=max(t.shared_lora_cosine, removed[0]))
    return t


def _without(vecs: dict[str, F64], shared: Sketch, keys: list[str]) -> dict[str, F64]:
    """``vecs`` (on ``keys``) minus their projection on the shared direction over those keys."""
    s = {k: _flat(t) for k in keys if (t := shared.tensors.get(k)) is not None
         and t.values.size == vecs[k].size}
    ss = sum(float(v @ v) for v in s.values())
    if ss == 0:
        return vecs
    proj = sum(float(vecs[k] @ v) for k, v in s.items()) / ss
    return {k: (vecs[k] - proj * s[k]) if k in s else vecs[k] for k in keys}


def compare(
    upload: Sketch,
    flagged: Sketch,
    base: Sketch | None = None,
    *,
    base_name: str | None = None,
    thresholds: Thresholds = THRESHOLDS,
    shared: Sketch | None = None,
) -> Comparison:
    """Every score of ``upload`` against ``flagged``, relative to ``base`` if given.

    ``flagged`` is a raw model sketch, a ``delta`` against ``base``, or a ``lora``;
    ``upload`` is a raw model sketch or a ``lora``. ``shared``, from
    :func:`shared_direction`, is removed from both deltas before scoring.
    """
    raw_distance, coverage = _raw(upload, flagged)
    du, up_dist = _deltas(upload, base)
    df, flag_dist = _deltas(flagged, base)
    if du is None or df is None or (up_dist is not None and up_dist > thresholds.base_distance):
        return Comparison(
            base_distance=up_dist, raw_distance=raw_distance, raw_coverage=coverage,
            flagged_base_distance=flag_dist,
        )
    fvs: dict[str, F64] = {}
    uvs: dict[str, F64] = {}
    dofs: dict[str, float] = {}
    energy = covered = 0.0
    for key, f in df.tensors.items():
        if not scored(key):
            continue
        b = base.tensors.get(key) if base is not None else None
        fv = _orthogonal(_flat(f), b, f.shape)
        energy += float(fv @ fv)
        u = du.tensors.get(key)
        if u is None or u.shape != f.shape:
            continue
        covered += float(fv @ fv)
        fvs[key] = fv
        uvs[key] = _orthogonal(_flat(u), b, f.shape)
        dofs[key] = f.dof
    # The shared direction is removed only where it covers most of the compared
    # tensors: the lower thresholds that follow assume it is gone.
    removed = shared is not None and bool(fvs) and (
        sum(1 for k in fvs if k in shared.tensors) >= SHARED_COVERAGE * len(fvs)
    )
    if removed:
        assert shared is not None
        keys = list(fvs)
        fvs, uvs = _without(fvs, shared, keys), _without(uvs, shared, keys)
    dot = uu = ff = 0.0
    zsum = wsum = 0.0
    n = 0
    # Per block, in the upload's (model) order: dot, |u|², |f|², tensors, upload |u|².
    per_block: dict[BlockName, list[float]] = {}
    for key, t in du.tensors.items():
        if scored(key):
            b = base.tensors.get(key) if base is not None else None
            uv = uvs[key] if key in uvs else _orthogonal(_flat(t), b, t.shape)
            per_block.setdefault(block_of(key), [0.0] * 5)[4] += float(uv @ uv)
    for key, fv in fvs.items():
        uv = uvs[key]
        nf, nu = float(np.linalg.norm(fv)), float(np.linalg.norm(uv))
        if nf == 0:
            continue
        d = float(uv @ fv)
        dot, uu, ff = dot + d, uu + nu * nu, ff + nf * nf
        sums = per_block.setdefault(block_of(key), [0.0] * 5)
        sums[0] += d
        sums[1] += nu * nu
        sums[2] += nf * nf
        sums[3] += 1
        c = d / (nu * nf) if nu > 0 else 0.0
        zsum += nf * c * math.sqrt(dofs[key])
        wsum += nf * nf
        n += 1
    if n == 0:
        return Comparison(
            tensors=0, base=base_name, base_distance=up_dist,
            raw_distance=raw_distance, raw_coverage=coverage, flagged_base_distance=flag_dist,
        )
    return Comparison(
        cosine=dot / math.sqrt(uu * ff) if uu > 0 else 0.0,
        coefficient=dot / ff,
        z=zsum / math.sqrt(wsum),
        tensors=n,
        base=base_name,
        base_distance=up_dist,
        raw_distance=raw_distance,
        raw_coverage=coverage,
        shared_removed=removed,
        flagged_base_distance=flag_dist,
        blocks=_blocks(per_block, ff),
        coverage=covered / energy if energy > 0 else 0.0,
    )


def _blocks(per_block: dict[BlockName, list[float]], ff: float) -> tuple[BlockScore, ...]:
    """The per-block figures, in model order (see :class:`BlockScore`)."""
    total_u = sum(s[4] for s in per_block.values())
    out = []
    for b, (bd, bu, bf, t, ub) in per_block.items():
        compared = t > 0 and bf > 0
        out.append(BlockScore(
            b.component, b.block, b.label, b.part, int(t),
            cosine=(bd / math.sqrt(bu * bf) if bu > 0 else 0.0) if compared else None,
            coefficient=bd / bf if compared else None,
            share=bf / ff if ff > 0 else 0.0,
            upload_share=ub / total_u if total_u > 0 else 0.0,
        ))
    return tuple(out)


def _raw(upload: Sketch, flagged: Sketch) -> tuple[float | None, float]:
    """Relative raw distance ‖U - F‖/‖F‖ over aligned tensors, and the share aligned."""
    if upload.kind != flagged.kind or upload.kind == "delta" or not len(flagged):
        return None, 0.0
    pairs = align(upload, flagged)
    if not pairs:
        return None, 0.0
    num = den = 0.0
    for fk, uk in pairs.items():
        f = flagged.tensors[fk].values
        d = upload.tensors[uk].values - f
        num += float(np.sum(d * d))
        den += float(np.sum(f * f))
    return (math.sqrt(num / den) if den > 0 else None), len(pairs) / len(flagged)


def match(
    upload: Sketch,
    flagged: Sketch,
    base: Sketch | None = None,
    *,
    base_name: str | None = None,
    thresholds: Thresholds = THRESHOLDS,
    shared: Sketch | None = None,
) -> Match | None:
    """The verdict for ``upload`` against one flagged item, or None if it does not match.

    Types: ``near-duplicate`` (the flagged model itself, cast or re-saved),
    ``derived`` (a fine-tune or merge of it, or a LoRA extracted from it), ``lora``
    (the flagged adapter in another form) and ``lora-baked`` (the flagged adapter
    merged into a checkpoint).
    """
    c = compare(upload, flagged, base, base_name=base_name, thresholds=thresholds, shared=shared)
    t = thresholds
    if c.cosine is not None and c.z is not None and c.coefficient is not None:
        carried = (
            c.cosine >= t.carried_cosine
            and t.carried_coefficient[0] <= c.coefficient <= t.carried_coefficient[1]
        )
        if flagged.kind == "lora":
            by_cosine = c.cosine >= (t.shared_lora_cosine if c.shared_removed else t.lora_cosine)
        else:
            if c.shared_removed:
                least, floor = t.shared_cosine, t.shared_min_coefficient
            else:
                least, floor = t.cosine, t.min_coefficient
            by_cosine = c.cosine >= least and c.coefficient >= floor
        if (by_cosine or carried) and c.z >= t.z:
            lo, hi = t.near_coefficient
            if upload.kind == "lora":
                kind = "lora" if flagged.kind == "lora" else "derived"
            elif flagged.kind == "lora":
                kind = "lora-baked"
            elif c.cosine >= t.near_cosine and lo <= c.coefficient <= hi:
                kind = "near-duplicate"
            else:
                kind = "derived"
            return Match(kind, c.cosine, _evidence(c))
    if (
        c.raw_distance is not None
        and c.raw_distance <= t.raw_distance
        and c.raw_coverage >= t.raw_coverage
        and (
            c.flagged_base_distance is None
            or c.raw_distance <= t.near_delta_ratio * c.flagged_base_distance
        )
    ):
        kind = "lora" if upload.kind == "lora" else "near-duplicate"
        return Match(kind, 1.0 - c.raw_distance, _evidence(c))
    return _invariant_match(upload, flagged, base, c, base_name, thresholds, shared)


def _invariant_match(
    upload: Sketch, flagged: Sketch, base: Sketch | None, c: Comparison,
    base_name: str | None, thresholds: Thresholds, shared: Sketch | None,
) -> Match | None:
    """The invariant layer's verdict, when the sketch delta is thin (see
    :mod:`modelhash.fingerprint._robust`): the upload's tensors did not line up
    with the base's, as after a permutation or rotation of its units."""
    ti = thresholds.invariant
    if (upload.kind != "model" or flagged.kind == "lora" or upload.invariant is None
            or flagged.invariant is None):
        return None
    aligned = False
    if base is not None:
        if base.invariant is None:
            return None
        spectral = spectral_distance(upload.invariant, base.invariant)
        trusted = c.base_distance is not None and c.base_distance <= ti.sketch_ratio * spectral
        aligned = c.coverage >= ti.thin_coverage
        if aligned and trusted:
            return None
    if base is None and c.raw_coverage >= thresholds.raw_coverage:
        # Without a base the raw sketches stand in for the delta: they are trusted
        # when they moved about as much as the spectra did. Scales moved across a
        # norm or between queries and keys keep every tensor aligned but move it
        # far (raw distance 0.3-0.5 for a copy whose spectra moved by 1e-8).
        raw_spectral = spectral_distance(upload.invariant, flagged.invariant)
        if c.raw_distance is not None and c.raw_distance <= ti.sketch_ratio * raw_spectral:
            return None
    algorithms = [upload.invariant.algorithm, flagged.invariant.algorithm]
    if base is not None and base.invariant is not None:
        algorithms.append(base.invariant.algorithm)
    if not all(comparable(algorithms[0], a) for a in algorithms):
        return None
    got = match_invariant(
        upload.invariant, flagged.invariant, base.invariant if base is not None else None,
        shared=shared.invariant if shared is not None else None, thresholds=ti,
    )
    if got is None:
        return None
    kind, score, ic = got
    if aligned and kind != "near-duplicate" and not (
        c.base_distance is not None and c.base_distance >= ti.distorted_distance
    ):
        # The tensors lined up and their sketch delta is no farther from the base than
        # known-innocent derivatives go: the sketch layer has read it, and what the
        # spectra add is not enough to overrule it (fine-tunes of one kind, q/k-only
        # say, shift the top singular values alike whatever their data).
        return None
    evidence = {**ic.evidence(), "base": base_name,
                "sketch": {"tensors_compared": c.tensors, "coverage": round(c.coverage, 3)}}
    return Match(kind, score, evidence)


def _evidence(c: Comparison) -> dict[str, Any]:
    out: dict[str, Any] = {"layer": "sketch", "base": c.base, "tensors_compared": c.tensors}
    if c.cosine is not None:
        out.update(
            cosine=round(c.cosine, 4),
            z=round(c.z or 0.0, 2),
            coefficient=round(c.coefficient or 0.0, 4),
        )
    if c.shared_removed:
        out["shared_direction_removed"] = True
    if c.blocks:
        out["blocks"] = [b.to_json() for b in c.blocks]
    if c.base_distance is not None:
        out["base_distance"] = round(c.base_distance, 4)
    if c.raw_distance is not None:
        out["raw_distance"] = round(c.raw_distance, 6)
        out["raw_coverage"] = round(c.raw_coverage, 3)
    return out


def storage_copy(
    model: Sketch, base: Sketch, *, thresholds: Thresholds = THRESHOLDS
) -> str | None:
    """The precision at which ``model`` is ``base`` re-stored, or None if it is not.

    Judged in delta terms, tensor by tensor: every scored tensor aligned with the
    base must differ from it by nothing (re-saved: ``"exact"``) or by the rounding
    one storage precision causes (:data:`CAST_LEVELS`), within
    :attr:`Thresholds.copy_tolerance`, and at least half of the base's scored
    tensors must align. Rounding moves every tensor by the same relative amount; a
    fine-tune, even one whose delta is as small as 1e-4 of the weights, moves its
    tensors by amounts that are neither zero nor that uniform level, so it is not a
    copy, however close its raw sketch is to the base's.
    """
    pairs = align(model, base)
    keys = [k for k in pairs if scored(k)]
    if not keys or len(keys) < 0.5 * sum(1 for k in base.tensors if scored(k)):
        return None
    found: set[str] = set()
    for bk in keys:
        b = base.tensors[bk].values
        nb = float(np.linalg.norm(b))
        if nb == 0:
            continue
        r = float(np.linalg.norm(model.tensors[pairs[bk]].values - b)) / nb
        if r <= thresholds.copy_exact:
            continue
        tol = thresholds.copy_tolerance
        level = next((name for name, v in CAST_LEVELS.items() if v / tol <= r <= v * tol), None)
        if level is None:
            return None
        found.add(level)
    return "exact" if not found else ", ".join(sorted(found))
