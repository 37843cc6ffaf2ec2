"""The matcher: derivatives and carriers match, the base, siblings and strangers do not."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelhash.fingerprint import (
    Sketch,
    TensorSketch,
    compare,
    delta_sketch,
    match,
    shared_direction,
)
from modelhash.fingerprint._project import K
from modelhash.fingerprint._similarity import THRESHOLDS, calibrated

SHAPES = [(320, 320), (320, 768), (640, 320), (1280, 640)]


def _model(seed: int, n: int = 40, scale: float = 1.0) -> Sketch:
    rng = np.random.default_rng(seed)
    return Sketch(
        "model",
        {
            f"unet:block_{i}": TensorSketch(
                f"unet:block_{i}", SHAPES[i % len(SHAPES)], scale * rng.standard_normal((K, K))
            )
            for i in range(n)
        },
    )


def _delta(seed: int, like: Sketch, size: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: size * rng.standard_normal((K, K)) for k in like.tensors}


def _plus(s: Sketch, *deltas: tuple[float, dict[str, np.ndarray]]) -> Sketch:
    out = {}
    for k, t in s.tensors.items():
        v = t.values.copy()
        for w, d in deltas:
            if k in d:
                v = v + w * d[k]
        out[k] = TensorSketch(k, t.shape, v)
    return Sketch(s.kind, out)


def _noise(s: Sketch, rel: float, seed: int) -> Sketch:
    rng = np.random.default_rng(seed)
    return _plus(s, (rel, {k: rng.standard_normal((K, K)) for k in s.tensors}))


BASE = _model(0)
DF = _delta(1, BASE, 0.01)
DG = _delta(2, BASE, 0.01)
F = _plus(BASE, (1.0, DF))
G = _plus(BASE, (1.0, DG))
FLAGGED = delta_sketch(F, BASE)[0]


def _verdict(upload: Sketch, flagged: Sketch = FLAGGED) -> str | None:
    m = match(upload, flagged, BASE, base_name="base")
    return m.match if m is not None else None


def test_delta_against_base_is_linear() -> None:
    d, dist = delta_sketch(F, BASE)
    assert d.kind == "delta" and 0.005 < dist < 0.02
    for k, v in DF.items():
        np.testing.assert_allclose(d.tensors[k].values, v, atol=1e-12)


def test_reuploads_and_derivatives_match() -> None:
    assert _verdict(F) == "near-duplicate"
    assert _verdict(_noise(F, 1e-4, 5)) == "near-duplicate"
    assert _verdict(_noise(F, 0.02, 5)) == "derived"
    # With unrelated deltas the coefficient is the merge weight itself; the floor
    # (0.3) is the smallest share of a flagged fine-tune that is reported.
    for alpha in (0.7, 0.5, 0.35):
        assert _verdict(_plus(BASE, (alpha, DF), (1 - alpha, DG))) == "derived"
    assert _verdict(_plus(BASE, (0.2, DF), (0.8, DG))) is None
    m = match(_plus(BASE, (0.5, DF), (0.5, DG)), FLAGGED, BASE, base_name="base")
    assert m is not None and abs(m.evidence["coefficient"] - 0.5) < 0.05
    assert m.evidence["base"] == "base" and m.evidence["tensors_compared"] == 40


def test_innocents_do_not_match() -> None:
    assert _verdict(BASE) is None
    assert _verdict(_noise(BASE, 1e-3, 7)) is None
    assert _verdict(G) is None
    assert _verdict(_plus(BASE, (0.5, DG), (0.5, _delta(3, BASE, 0.01)))) is None
    assert _verdict(_model(99)) is None
    c = compare(_model(99), FLAGGED, BASE)
    assert c.cosine is None and c.base_distance is not None and c.base_distance > 1


def test_merges_of_many_innocent_siblings_do_not_match() -> None:
    """Siblings share part of their deltas; averaging many keeps only that part.

    Each sibling is shared + own, and F is too, with the shared part a quarter of
    each delta's energy: one sibling scores cosine 0.25, and an eight-sibling merge
    about 0.43, past the cosine threshold, but its coefficient stays at 0.25: it
    holds no more of F than any sibling does. F merged into such a merge still matches.
    """
    shared = _delta(50, BASE, 0.01 * np.sqrt(0.25))
    own = lambda seed: _delta(seed, BASE, 0.01 * np.sqrt(0.75))  # noqa: E731
    f_delta = {k: shared[k] + v for k, v in own(51).items()}
    flagged = delta_sketch(_plus(BASE, (1.0, f_delta)), BASE)[0]
    siblings = [{k: shared[k] + v for k, v in own(60 + i).items()} for i in range(8)]
    mega = _plus(BASE, *[(1 / 8, d) for d in siblings])
    c = compare(mega, flagged, BASE)
    assert c.cosine is not None and c.cosine > 0.35 and c.coefficient is not None
    assert 0.15 < c.coefficient < 0.3
    assert _verdict(mega, flagged) is None
    assert _verdict(_plus(BASE, (1.0, siblings[0])), flagged) is None
    with_f = _plus(BASE, (0.4, f_delta), *[(0.6 / 8, d) for d in siblings])
    assert _verdict(with_f, flagged) == "derived"


def test_renamed_tensors_align_by_shape_and_similarity() -> None:
    """An ldm-named copy lines up with a diffusers-named base without a name table."""
    renamed = Sketch(
        "model",
        {f"unet:other_{k}": TensorSketch(f"unet:other_{k}", t.shape, t.values)
         for k, t in reversed(list(_noise(F, 1e-4, 3).tensors.items()))},
    )
    assert _verdict(renamed) == "near-duplicate"


def test_lora_forms_and_baked() -> None:
    keys = list(BASE.tensors)[:12]
    dl = {k: v for k, v in _delta(11, BASE, 0.01).items() if k in keys}
    lora = Sketch("lora", {k: TensorSketch(k, BASE.tensors[k].shape, dl[k]) for k in keys})
    assert _verdict(_plus(BASE, (1.0, dl)), lora) == "lora-baked"
    half = match(_plus(G, (0.5, {k: 2 * v for k, v in dl.items()})), lora, BASE)
    assert half is not None and half.match == "lora-baked"
    assert abs(half.evidence["coefficient"] - 1.0) < 0.1
    strong = match(_plus(G, (0.8, dl)), lora, BASE)
    assert strong is not None and strong.match == "lora-baked"
    # Half strength into a fine-tune whose delta is as large (cosine 0.45): not
    # reported, as other adapters sharing a direction with the flagged one score alike.
    weak = compare(_plus(G, (0.5, dl)), lora, BASE)
    assert weak.cosine is not None and 0.4 < weak.cosine < 0.5
    assert match(_plus(G, (0.5, dl)), lora, BASE) is None
    # Another adapter sharing a direction with the flagged one, as measured: cosine 0.5.
    shared = {k: 0.45 * dl[k] + 0.8 * v for k, v in _delta(13, BASE, 0.01).items() if k in keys}
    assert _verdict(_plus(BASE, (1.0, shared)), lora) is None
    both = {k: 0.5 * dl[k] + 0.5 * v for k, v in _delta(14, BASE, 0.01).items() if k in keys}
    assert _verdict(_plus(BASE, (1.0, both)), lora) == "lora-baked"
    again = Sketch("lora", {k: TensorSketch(k, t.shape, 2 * t.values) for k, t in lora.tensors.items()})
    assert _verdict(again, lora) == "lora"
    other = {k: v for k, v in _delta(12, BASE, 0.01).items() if k in keys}
    assert _verdict(_plus(BASE, (1.0, other)), lora) is None
    assert _verdict(BASE, lora) is None


def test_without_base_only_near_duplicates() -> None:
    assert match(_noise(F, 1e-4, 1), F) is not None
    assert match(G, F) is None
    assert match(BASE, F) is None


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**16), st.permutations(list(range(40))))
def test_tensor_order_does_not_matter(seed: int, order: list[int]) -> None:
    up = _noise(_plus(BASE, (0.6, DF), (0.4, DG)), 0.002, seed)
    items = list(up.tensors.items())
    shuffled = Sketch("model", dict(items[i] for i in order))
    a, b = compare(up, FLAGGED, BASE), compare(shuffled, FLAGGED, BASE)
    assert a.cosine is not None and b.cosine is not None
    assert abs(a.cosine - b.cosine) < 1e-12 and a.tensors == b.tensors


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**20))
def test_z_is_standard_normal_for_unrelated_deltas(seed: int) -> None:
    """The null: unrelated deltas give |z| well below the threshold."""
    up = _plus(BASE, (1.0, _delta(seed + 1000, BASE, 0.01)))
    c = compare(up, FLAGGED, BASE)
    assert c.z is not None and abs(c.z) < 5


def _with_vae(s: Sketch, vae: dict[str, np.ndarray] | None = None, n: int = 12) -> Sketch:
    """``s`` plus ``n`` VAE tensors: the base's, moved by ``vae`` if given."""
    rng = np.random.default_rng(1234)
    out = dict(s.tensors)
    for i in range(n):
        k = f"vae:decoder_{i}"
        v = rng.standard_normal((K, K)) + (vae[k] if vae is not None else 0.0)
        out[k] = TensorSketch(k, SHAPES[i % len(SHAPES)], v)
    return Sketch(s.kind, out)


def test_a_shared_baked_vae_does_not_make_models_match() -> None:
    """A replacement VAE is large next to a fine-tune's own delta and is baked into many
    unrelated checkpoints: with it in the score, a sibling baking the same VAE
    scored cosine ≈ 0.97 against the flagged model and matched as a near-duplicate."""
    base = _with_vae(BASE)
    vae_ft = {f"vae:decoder_{i}": 0.1 * np.random.default_rng([77, i]).standard_normal((K, K))
              for i in range(12)}
    flagged = delta_sketch(_with_vae(F, vae_ft), base)[0]
    assert any(k.startswith("vae:") for k in flagged.tensors)

    def verdict(upload: Sketch) -> str | None:
        m = match(upload, flagged, base, base_name="base")
        return m.match if m is not None else None

    assert verdict(_with_vae(G, vae_ft)) is None
    assert verdict(_with_vae(BASE, vae_ft)) is None
    # The flagged fine-tune with its VAE swapped back, or with the VAE, still matches.
    assert verdict(_with_vae(F)) == "near-duplicate"
    assert verdict(_with_vae(F, vae_ft)) == "near-duplicate"
    c = compare(_with_vae(F), flagged, base)
    assert c.tensors == 40


def _values(s: Sketch) -> dict[str, np.ndarray]:
    return {k: t.values for k, t in s.tensors.items()}


def test_a_shared_direction_learnt_from_innocent_derivatives_is_removed() -> None:
    """Fine-tunes that share a direction look alike until it is learnt and removed."""
    common = _delta(500, BASE, 0.01)
    ft = {i: _plus(BASE, (1.0, _delta(510 + i, BASE, 0.01)), (0.8, common)) for i in range(10)}
    flagged = delta_sketch(ft[0], BASE)[0]
    refs = [ft[i] for i in range(4, 10)]
    shared = shared_direction([*refs, BASE, _model(77)], BASE)  # the base and a stranger are skipped
    assert shared is not None and set(shared.tensors) == set(BASE.tensors)
    assert shared_direction([BASE, _model(77)], BASE) is None
    sibling = compare(ft[1], flagged, BASE)
    assert sibling.cosine is not None and sibling.cosine > 0.35  # 0.64 / 1.64
    assert match(ft[1], flagged, BASE) is not None
    cleaned = compare(ft[1], flagged, BASE, shared=shared)
    assert cleaned.cosine is not None and abs(cleaned.cosine) < 0.15
    assert match(ft[1], flagged, BASE, shared=shared) is None
    # What makes the flagged fine-tune itself is kept: re-uploads and merges still match.
    m = match(_noise(ft[0], 1e-4, 3), flagged, BASE, shared=shared)
    assert m is not None and m.match == "near-duplicate"
    assert m.evidence["shared_direction_removed"] is True
    merged = _plus(BASE, (0.5, _values(delta_sketch(ft[0], BASE)[0])),
                   (0.5, _values(delta_sketch(ft[1], BASE)[0])))
    m = match(merged, flagged, BASE, shared=shared)
    c = compare(merged, flagged, BASE, shared=shared)
    assert m is not None and m.match == "derived"
    assert c.coefficient is not None and abs(c.coefficient - 0.5) < 0.1


def test_a_shared_direction_of_adapters_covers_their_modules() -> None:
    keys = list(BASE.tensors)[:10]

    def adapter(seed: int, common: float) -> Sketch:
        own, shared = _delta(seed, BASE, 0.01), _delta(600, BASE, 0.01)
        return Sketch("lora", {k: TensorSketch(k, BASE.tensors[k].shape, own[k] + common * shared[k])
                               for k in keys})

    refs = [adapter(610 + i, 1.3) for i in range(6)]
    shared = shared_direction(refs, BASE)
    assert shared is not None and set(shared.tensors) == set(keys)
    flagged, other = adapter(601, 1.3), adapter(602, 1.3)
    assert match(other, flagged, BASE) is not None  # cosine 0.63 over the adapter threshold
    assert match(other, flagged, BASE, shared=shared) is None
    baked = _plus(BASE, (1.0, _values(flagged)))
    m = match(baked, flagged, BASE, shared=shared)
    assert m is not None and m.match == "lora-baked"


def _task_family(a: float = 0.8) -> tuple[list[Sketch], Callable[[int, int], Sketch]]:
    """Fine-tunes of BASE on three tasks: each is its own delta plus ``a`` of its task's.

    Two fine-tunes of one task sit at delta cosine a²/(1 + a²) (0.39), fine-tunes of
    different tasks near 0: no single shared direction explains it, so removing the
    references' mean leaves same-task siblings alike. Six references, two per task.
    """
    tasks = [_delta(700 + j, BASE, 0.01) for j in range(3)]

    def ft(seed: int, task: int) -> Sketch:
        return _plus(BASE, (1.0, _delta(seed, BASE, 0.01)), (a, tasks[task]))

    return [ft(720 + i, i % 3) for i in range(6)], ft


def test_references_calibrate_the_thresholds_of_their_base() -> None:
    refs, ft = _task_family()
    shared = shared_direction(refs, BASE)
    cal = calibrated(refs, BASE)
    f, sibling, other = ft(801, 0), ft(802, 0), ft(803, 1)
    flagged = delta_sketch(f, BASE)[0]
    # The same-task sibling is the false match the fixed thresholds make...
    c = compare(sibling, flagged, BASE, shared=shared)
    assert c.shared_removed and c.cosine is not None and 0.3 < c.cosine < 0.45
    assert match(sibling, flagged, BASE, shared=shared) is not None
    # ...and the references show it: their pairs reach that far, so the bar rises.
    assert cal.shared_cosine > 0.45 and cal.shared_min_coefficient > 0.45
    assert match(sibling, flagged, BASE, shared=shared, thresholds=cal) is None
    assert match(other, flagged, BASE, shared=shared, thresholds=cal) is None
    # Copies and uploads carrying most of the flagged delta still match.
    m = match(_noise(f, 1e-4, 3), flagged, BASE, shared=shared, thresholds=cal)
    assert m is not None and m.match == "near-duplicate"
    own = _values(delta_sketch(f, BASE)[0])
    merged = _plus(BASE, (0.7, own), (0.3, _values(delta_sketch(other, BASE)[0])))
    m = match(merged, flagged, BASE, shared=shared, thresholds=cal)
    assert m is not None and m.match == "derived"
    # Fixed thresholds untouched by calibration keep their values.
    assert (cal.near_cosine, cal.carried_coefficient, cal.z) == (
        THRESHOLDS.near_cosine, THRESHOLDS.carried_coefficient, THRESHOLDS.z)


def test_calibration_never_lowers_a_threshold_and_needs_three_references() -> None:
    independent = [_plus(BASE, (1.0, _delta(900 + i, BASE, 0.01))) for i in range(6)]
    cal = calibrated(independent, BASE)
    # The references also say how far known-innocent fine-tunes go from the base:
    # 2.5 times the farthest is where an aligned sketch delta counts as distorted.
    farthest = max(delta_sketch(m, BASE)[1] for m in independent)
    assert cal.invariant.distorted_distance == pytest.approx(2.5 * farthest)
    assert replace(cal, invariant=replace(cal.invariant, distorted_distance=math.inf)) == THRESHOLDS
    refs, _ft = _task_family()
    assert calibrated(refs[:2], BASE) == THRESHOLDS
    # The base and a stranger are not samples of the base's derivatives.
    assert calibrated([BASE, _model(77), *refs[:2]], BASE) == THRESHOLDS
    three = calibrated(refs[:3], BASE)
    for name in ("cosine", "min_coefficient", "lora_cosine", "shared_cosine",
                 "shared_min_coefficient", "shared_lora_cosine"):
        assert getattr(three, name) >= getattr(THRESHOLDS, name)
    # Three references give no shared direction: only the thresholds without it move.
    assert three.shared_cosine == THRESHOLDS.shared_cosine


def test_spectra_overrule_an_aligned_sketch_only_where_it_is_distorted() -> None:
    """Fine-tunes of one kind (q/k-only, say) shift the top singular values alike
    whatever their data, while their sketch deltas are unrelated. Where the upload's
    tensors line up and its sketch delta is no farther from the base than the
    references go, the sketch layer has read it: the invariant layer's merge rule
    must not overrule it. A sketch delta distorted far past that (scales moved across
    a norm) is still left to the spectra."""
    from modelhash.fingerprint._invariant import TOP, Spectra, Spectrum

    rng = np.random.default_rng(40)
    keys = list(BASE.tensors)[:12]
    base_spec = {k: np.sort(rng.random(TOP))[::-1] * 10 + 1 for k in keys}
    kind_shift = {k: 1e-3 * rng.standard_normal(TOP) for k in keys}

    def model(seed: int, shift: float, size: float = 0.01, common: float = 0.0) -> Sketch:
        r = np.random.default_rng(seed)
        sk = _plus(BASE, (1.0, _delta(seed, BASE, size)))
        sk.invariant = Spectra({k: Spectrum(k, BASE.tensors[k].shape, base_spec[k] * (
            1 + shift * r.standard_normal(TOP) + common * kind_shift[k])) for k in keys})
        return sk

    base = _plus(BASE)
    base.invariant = Spectra({k: Spectrum(k, BASE.tensors[k].shape, v) for k, v in base_spec.items()})
    refs = [model(1000 + i, 1e-3) for i in range(6)]
    shared, cal = shared_direction(refs, base), calibrated(refs, base)
    assert math.isfinite(cal.invariant.distorted_distance)
    f = model(1100, 1e-4, common=3.0)
    flagged = delta_sketch(f, base)[0]
    flagged.invariant = f.invariant
    innocent = model(1101, 1e-4, common=3.0)  # same kind of fine-tune, other data
    c = compare(innocent, flagged, base, shared=shared, thresholds=cal)
    assert c.coverage > 0.99 and c.cosine is not None and abs(c.cosine) < 0.2
    assert match(innocent, flagged, base, shared=shared, thresholds=cal) is None
    # Without the gate the spectra alone would call it derived.
    ungated = replace(cal, invariant=replace(cal.invariant, sketch_ratio=0.0))
    ungated = replace(ungated, invariant=replace(ungated.invariant, distorted_distance=0.0))
    m = match(innocent, flagged, base, shared=shared, thresholds=ungated)
    assert m is not None and m.evidence.get("invariant") is True
    # A distorted upload carrying the flagged spectra: the spectra decide.
    distorted = _plus(BASE, (1.0, _delta(1102, BASE, 0.2)))
    distorted.invariant = f.invariant
    m = match(distorted, flagged, base, shared=shared, thresholds=cal)
    assert m is not None and m.evidence.get("invariant") is True
