"""The invariant layer: what it is invariant to, how it is stored, how it is measured."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from modelhash.fingerprint import Sketch, fingerprint_file
from modelhash.fingerprint._invariant import (
    INVARIANT_ALGORITHM,
    TOP,
    Candidate,
    Spectra,
    Spectrum,
    exposed,
    measure,
    norm_key,
    select,
    spectrum,
    units,
)
from modelhash.fingerprint._sketch import TensorSketch


def _orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    out: np.ndarray = q * np.sign(np.diag(r))
    return out


@settings(max_examples=20, deadline=None)
@given(st.integers(8, 70), st.integers(8, 70), st.integers(0, 2**31))
def test_spectrum_is_invariant_to_permutations_and_rotations(m: int, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((m, n))
    base = spectrum(w)
    assert len(base) == min(TOP, m, n)
    assert np.all(np.diff(base) <= 1e-12)
    assert np.allclose(base, np.linalg.svd(w, compute_uv=False)[:TOP], rtol=1e-10)
    permuted = w[rng.permutation(m)][:, rng.permutation(n)]
    rotated = _orthogonal(m, rng) @ w @ _orthogonal(n, rng)
    for other in (permuted, rotated):
        assert np.max(np.abs(spectrum(other) - base)) <= 1e-10 * base[0]


def test_norm_scale_folded_in_makes_rescaling_invisible() -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((48, 32))
    gamma = 1 + 0.2 * rng.standard_normal(32)
    s = np.exp(rng.standard_normal(32))
    # The model computes W diag(g) x̂: moving a scale from g into W changes nothing.
    assert np.allclose(spectrum(w * s, gamma / s), spectrum(w, gamma), rtol=1e-12)
    # Without folding the matrix alone moves.
    assert not np.allclose(spectrum(w * s), spectrum(w), rtol=1e-3)
    # An RMSNorm model's residual rotation: fold g, then rotate the input side.
    q = _orthogonal(32, rng)
    assert np.allclose(spectrum((w * gamma) @ q.T), spectrum(w, gamma), rtol=1e-10)


def test_first_order_shift_is_linear_in_the_delta() -> None:
    rng = np.random.default_rng(2)
    w = rng.standard_normal((64, 48))
    d = 1e-3 * rng.standard_normal((64, 48))
    u, _sv, vt = np.linalg.svd(w)
    k = min(TOP, 48)
    predicted = np.einsum("ik,ij,kj->k", u[:, :k], d, vt[:k])
    actual = spectrum(w + d) - spectrum(w)
    assert np.linalg.norm(actual - predicted) <= 0.05 * np.linalg.norm(predicted)


def test_norm_table() -> None:
    assert norm_key(":layers_3_self_attn_k_proj") == ":layers_3_input_layernorm"
    assert norm_key(":layers_3_mlp_up_proj") == ":layers_3_post_attention_layernorm"
    assert norm_key(":layers_3_mlp_down_proj") is None
    assert norm_key("te1:encoder_layers_2_mlp_fc1") == "te1:encoder_layers_2_layer_norm2"
    key = "unet:down_blocks_0_attentions_1_transformer_blocks_0_ff_net_0_proj"
    assert norm_key(key) == "unet:down_blocks_0_attentions_1_transformer_blocks_0_norm3"
    assert norm_key("unet:mid_block_attentions_0_transformer_blocks_0_attn2_to_k") is None


def test_selection_is_cheapest_first_and_depends_on_shapes_only() -> None:
    cands = [Candidate(f"x:l{i}", 64 * (1 + i % 4), 64) for i in range(40)]
    got = select(cands, elements=0)
    assert select(list(reversed(cands)), elements=0) == got
    # Cheapest first: every kept matrix costs no more than every dropped one.
    keys = {u.key for u in got}
    kept = [c for c in cands if c.key in keys]
    dropped = [c for c in cands if c.key not in keys]
    assert kept
    if dropped:
        assert max(c.rows for c in kept) <= min(c.rows for c in dropped)
    huge = [Candidate("x:big", 1 << 14, 1 << 14)]
    assert select(huge, elements=1 << 28) == []


def test_products_join_their_factors_only_where_the_shapes_fit() -> None:
    """Queries with keys, outputs with values, down with up (and a GEGLU's linear
    half with its output) are measured as products beside every matrix alone;
    grouped-query keys and values (fewer rows than the queries) and a plain GELU
    layer give no product."""
    d, f = 64, 256
    mha = [Candidate(f":layers_0_self_attn_{n}_proj", d, d) for n in "qkvo"]
    mha += [Candidate(":layers_0_mlp_gate_proj", f, d), Candidate(":layers_0_mlp_up_proj", f, d),
            Candidate(":layers_0_mlp_down_proj", d, f)]
    got = {u.key: u for u in units(mha)}
    products = {":layers_0_self_attn_q_proj*layers_0_self_attn_k_proj",
                ":layers_0_self_attn_o_proj*layers_0_self_attn_v_proj",
                ":layers_0_mlp_down_proj*layers_0_mlp_up_proj"}
    assert set(got) == products | {c.key for c in mha}
    assert got[":layers_0_mlp_down_proj*layers_0_mlp_up_proj"].shape == (d, d)
    assert exposed(got) == {c.key for c in mha} - {":layers_0_mlp_gate_proj"}
    gqa = [Candidate(":layers_0_self_attn_q_proj", d, d), Candidate(":layers_0_self_attn_k_proj",
           d // 4, d), Candidate(":layers_0_self_attn_v_proj", d // 4, d),
           Candidate(":layers_0_self_attn_o_proj", d, d)]
    assert {u.key for u in units(gqa)} == {c.key for c in gqa}
    assert exposed(c.key for c in gqa) == {c.key for c in gqa}  # no product, still exposed
    bert = [Candidate(f":encoder_layer_0_attention_{n}", d, d)
            for n in ("self_query", "self_key", "self_value", "output_dense")]
    assert {u.key for u in units(bert)} - {c.key for c in bert} == {
        ":encoder_layer_0_attention_self_query*encoder_layer_0_attention_self_key",
        ":encoder_layer_0_attention_output_dense*encoder_layer_0_attention_self_value"}
    ff = "u:blocks_0_ff_"
    geglu = {u.key: u for u in units([Candidate(ff + "net_0_proj", 2 * f, d),
                                      Candidate(ff + "net_2", d, f)])}
    assert set(geglu) == {ff + "net_2*blocks_0_ff_net_0_proj[0/2]", ff + "net_0_proj[1/2]",
                          ff + "net_0_proj", ff + "net_2"}
    assert exposed(geglu) == {ff + "net_0_proj", ff + "net_2"}
    gelu = units([Candidate(ff + "net_0_proj", f, d), Candidate(ff + "net_2", d, f)])
    assert {u.key for u in gelu} == {ff + "net_0_proj", ff + "net_2"}


def test_products_do_not_move_when_a_map_moves_between_their_factors() -> None:
    """Any invertible map per head between queries and keys (or values and outputs),
    and any per-unit scale between a gated layer's up and down projections, leave the
    product's spectrum as it was; each factor's own spectrum moves."""
    rng = np.random.default_rng(11)
    d, f, heads = 48, 96, 4
    hd = d // heads
    w = {n: rng.standard_normal((d, d)) / np.sqrt(d) for n in "qkvo"}
    w["up"], w["down"] = rng.standard_normal((f, d)), rng.standard_normal((d, f))
    maps = [rng.standard_normal((hd, hd)) + 3 * np.eye(hd) for _ in range(heads)]
    m = np.zeros((d, d))
    for h, x in enumerate(maps):
        m[h * hd:(h + 1) * hd, h * hd:(h + 1) * hd] = x
    s = np.exp(rng.standard_normal(f))
    moved = {"q": m @ w["q"], "k": np.linalg.inv(m).T @ w["k"], "v": m @ w["v"],
             "o": w["o"] @ np.linalg.inv(m), "up": s[:, None] * w["up"], "down": w["down"] / s}
    key = {n: f":layers_0_self_attn_{n}_proj" for n in "qkvo"}
    key |= {"up": ":layers_0_mlp_up_proj", "down": ":layers_0_mlp_down_proj"}
    cands = [Candidate(key[n], *x.shape) for n, x in w.items()]
    every = units(cands)
    assert sum(1 for u in every if u.b is not None) == 3
    for u in every:
        if u.key in exposed(u.key for u in every):
            continue
        before = measure(u, {key[n]: x for n, x in w.items()}, {})
        after = measure(u, {key[n]: x for n, x in moved.items()}, {})
        assert before is not None and after is not None
        np.testing.assert_allclose(after, before, rtol=1e-9, atol=1e-9)
    for n in ("q", "up"):
        assert not np.allclose(spectrum(moved[n]), spectrum(w[n]), rtol=1e-3)


def _spectra(seed: int = 0) -> Spectra:
    rng = np.random.default_rng(seed)
    return Spectra({
        k: Spectrum(k, (40, 30), np.sort(rng.random(TOP))[::-1] * 10) for k in ("a:x", "b:y")
    })


def _sketch(invariant: Spectra | None) -> Sketch:
    rng = np.random.default_rng(3)
    t = {k: TensorSketch(k, (40, 30), rng.standard_normal((16, 16))) for k in ("a:x", "b:y")}
    return Sketch("model", t, invariant=invariant)


def test_blob_versions_round_trip() -> None:
    plain = _sketch(None)
    v2 = plain.to_bytes()
    assert v2[4] == 2
    assert Sketch.from_bytes(v2).invariant is None
    v1 = plain.to_bytes(precision="f16")
    assert v1[4] == 1 and Sketch.from_bytes(v1).invariant is None
    inv = _spectra()
    v3 = _sketch(inv).to_bytes()
    assert v3[4] == 3
    back = Sketch.from_bytes(v3)
    assert back.invariant is not None and back.invariant.algorithm == INVARIANT_ALGORITHM
    for k, s in inv.items.items():
        got = back.invariant.items[k]
        assert got.shape == s.shape
        assert np.allclose(got.values, s.values, rtol=1e-7)
    for k, t in plain.tensors.items():
        assert np.allclose(back.tensors[k].values, t.values, rtol=1e-6, atol=1e-6)
    assert _sketch(inv).to_bytes(compress=False)[4] == 3


def _reblob(version: int, body: bytes) -> bytes:
    return b"MHSK" + struct.pack("<BB", version, 1) + zlib.compress(body)


def test_hostile_invariant_sections_are_refused_plainly() -> None:
    blob = _sketch(_spectra()).to_bytes()
    body = zlib.decompress(blob[6:])
    sections = _spectra().to_section()
    head = body[: len(body) - len(sections)]
    for bad in (
        head + sections[:-3],  # truncated values
        head + sections[:5],  # truncated count
        head + sections + b"\x00",  # trailing bytes
        head + sections[:2],
        head + b"\x20" + b"\xff" * 40,  # algorithm name not ASCII
    ):
        with pytest.raises(ValueError):
            Sketch.from_bytes(_reblob(3, bad))
    # A v2 blob with anything after its tensors is still refused.
    with pytest.raises(ValueError, match="trailing"):
        Sketch.from_bytes(_reblob(2, body))
    nan = bytearray(sections)
    nan[-4:] = struct.pack("<f", float("nan"))
    with pytest.raises(ValueError, match="singular values"):
        Sketch.from_bytes(_reblob(3, head + bytes(nan)))
    with pytest.raises(ValueError, match="not supported"):
        Sketch.from_bytes(_reblob(4, body))


def _llama(rng: np.random.Generator, d: int = 48, f: int = 128, layers: int = 2
           ) -> dict[str, np.ndarray]:
    sd: dict[str, np.ndarray] = {}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, shape in (("self_attn.q_proj", (d, d)), ("self_attn.k_proj", (d, d)),
                            ("self_attn.v_proj", (d, d)), ("self_attn.o_proj", (d, d)),
                            ("mlp.gate_proj", (f, d)), ("mlp.up_proj", (f, d)),
                            ("mlp.down_proj", (d, f))):
            sd[p + name + ".weight"] = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(
                np.float32)
        sd[p + "input_layernorm.weight"] = (1 + 0.2 * rng.standard_normal(d)).astype(np.float32)
        sd[p + "post_attention_layernorm.weight"] = (
            1 + 0.2 * rng.standard_normal(d)).astype(np.float32)
    return sd


def _permuted(sd: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """FFN units and residual channels permuted, norm scales moved into the matrices:
    the same function, every matrix changed."""
    d = sd["model.layers.0.input_layernorm.weight"].shape[0]
    f = sd["model.layers.0.mlp.up_proj.weight"].shape[0]
    res = rng.permutation(d)
    hidden = {name.split(".")[2]: rng.permutation(f) for name in sd}
    out: dict[str, np.ndarray] = {}
    for name, w in sd.items():
        unit = hidden[name.split(".")[2]]
        if w.ndim == 1:
            w = w[res] / 2
        elif "gate_proj" in name or "up_proj" in name:
            w = w[unit][:, res] * 2
        elif "down_proj" in name:
            w = w[res][:, unit]
        elif "o_proj" in name:
            w = w[res]
        else:
            w = w[:, res] * 2
        out[name] = np.ascontiguousarray(w, dtype=np.float32)
    return out


def test_pass_measures_the_same_spectra_for_a_permuted_model(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    sd = _llama(rng)
    save_file(sd, str(tmp_path / "a.safetensors"))
    save_file(_permuted(sd, rng), str(tmp_path / "b.safetensors"))
    half = {k: v.astype(np.float16) for k, v in sd.items()}
    save_file(half, str(tmp_path / "c.safetensors"))
    a = fingerprint_file(tmp_path / "a.safetensors").sketch
    b = fingerprint_file(tmp_path / "b.safetensors").sketch
    c = fingerprint_file(tmp_path / "c.safetensors").sketch
    assert a is not None and b is not None and c is not None
    assert a.invariant is not None and b.invariant is not None and c.invariant is not None
    assert len(a.invariant) == 20  # per layer: q*k, o*v, down*up and the 7 matrices
    assert set(a.invariant.items) == set(b.invariant.items) == set(c.invariant.items)
    for key, s in a.invariant.items.items():
        assert np.max(np.abs(b.invariant.items[key].values - s.values)) < 1e-5 * s.values[0]
    # The stored blob carries the layer.
    again = Sketch.from_bytes(a.to_bytes())
    assert again.invariant is not None and set(again.invariant.items) == set(a.invariant.items)
    # ...while the per-tensor sketches of the permuted matrices moved far away.
    key = ":layers_0_mlp_up_proj"
    x, y = a.tensors[key].values.ravel(), b.tensors[key].values.ravel()
    assert abs(float(x @ y)) / float(np.linalg.norm(x) * np.linalg.norm(y)) < 0.5


def test_norm_folding_uses_the_norm_stored_after_the_matrix(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    sd = _llama(rng, layers=1)
    w = sd["model.layers.0.mlp.gate_proj.weight"]
    up = sd["model.layers.0.mlp.up_proj.weight"].astype(np.float64)
    g = sd["model.layers.0.post_attention_layernorm.weight"].astype(np.float64)
    save_file(sd, str(tmp_path / "m.safetensors"))
    got = fingerprint_file(tmp_path / "m.safetensors").sketch
    assert got is not None and got.invariant is not None
    want = spectrum(w.astype(np.float64), g)
    assert np.allclose(got.invariant.items[":layers_0_mlp_gate_proj"].values, want, rtol=1e-6)
    # down_proj reads no norm: its product with up_proj folds up_proj's norm alone.
    down = sd["model.layers.0.mlp.down_proj.weight"].astype(np.float64)
    product = got.invariant.items[":layers_0_mlp_down_proj*layers_0_mlp_up_proj"]
    assert np.allclose(product.values, spectrum(down @ (up * g)), rtol=1e-6)


def _sk(tmp_path: Path, name: str, sd: dict[str, np.ndarray]) -> Sketch:
    from tests.utils.sketch_models import sketch_of, write

    return sketch_of(write(tmp_path, name, sd))


def test_match_falls_back_to_the_invariant_layer_only_when_the_delta_is_thin(
    tmp_path: Path,
) -> None:
    from modelhash.fingerprint import delta_sketch, match, shared_direction
    from tests.utils.invariant_models import disguise, llama
    from tests.utils.sketch_models import plus, random_delta

    b = llama(10)
    df, dg = random_delta(b, 11), random_delta(b, 12)
    sk = {name: _sk(tmp_path, name, sd) for name, sd in {
        "base": b, "f": plus(b, (1, df)), "f_disguised": disguise(plus(b, (1, df)), 1),
        "f_disguised16": {k: v.astype(np.float16)
                          for k, v in disguise(plus(b, (1, df)), 2).items()},
        "g_disguised": disguise(plus(b, (1, dg)), 1),
        "base_disguised": disguise(b, 1),
        "merge_disguised": disguise(plus(b, (0.5, df), (0.5, dg)), 3),
        "stranger_disguised": disguise(llama(99), 1),
        **{f"ref{i}": plus(b, (1, random_delta(b, 20 + i))) for i in range(5)},
    }.items()}
    base = sk["base"]
    flagged = delta_sketch(sk["f"], base)[0]
    flagged.invariant = sk["f"].invariant

    def verdict(name: str, shared: Sketch | None = None) -> tuple[str, dict[str, object]] | None:
        m = match(sk[name], flagged, base, base_name="b", shared=shared)
        return None if m is None else (m.match, m.evidence)

    got = verdict("f")
    assert got is not None and got[1]["layer"] == "sketch"  # the ordinary delta decides
    for name in ("f_disguised", "f_disguised16"):
        got = verdict(name)
        assert got is not None and got[0] == "near-duplicate", name
        ev = got[1]
        assert ev["invariant"] is True and ev["layer"] == "invariant"
        assert float(ev["cosine"]) > 0.95 and 0.8 < float(ev["coefficient"]) < 1.25  # type: ignore[arg-type]
    for name in ("g_disguised", "base_disguised", "stranger_disguised"):
        assert verdict(name) is None, name
    # A merge is reported only once references teach what fine-tunes share.
    assert verdict("merge_disguised") is None
    shared = shared_direction([sk[f"ref{i}"] for i in range(5)], base)
    assert shared is not None and shared.invariant is not None
    got = verdict("merge_disguised", shared)
    assert got is not None and got[0] == "derived" and got[1]["invariant"] is True
    for name in ("g_disguised", "base_disguised", "stranger_disguised"):
        assert verdict(name, shared) is None, name
    # Without the flag's invariant layer (an old stored blob) nothing changes.
    flagged.invariant = None
    assert verdict("f_disguised") is None


def test_a_streamed_upload_measures_what_the_file_does(tmp_path: Path) -> None:
    from modelhash._stream import Body, fingerprint_body

    rng = np.random.default_rng(6)
    sd = _llama(rng)
    # The norms sort after some of the matrices that read them: a stream cannot go back.
    path = tmp_path / "m.safetensors"
    save_file({k: v.astype(np.float16) for k, v in sd.items()}, str(path))
    data = path.read_bytes()

    def chunks() -> Iterator[bytes]:
        at = 0
        while at < len(data):
            n = int(rng.integers(1, 5000))
            yield data[at : at + n]
            at += n

    out = fingerprint_body(Body(chunks(), path.name, len(data)))
    assert out.fingerprint is not None and out.fingerprint.sketch is not None
    streamed = out.fingerprint.sketch.invariant
    whole = fingerprint_file(path).sketch
    assert whole is not None and whole.invariant is not None and streamed is not None
    assert set(streamed.items) == set(whole.invariant.items)
    for key, s in whole.invariant.items.items():
        assert np.array_equal(streamed.items[key].values, s.values)


def test_a_fused_matrix_is_measured_per_canonical_module(tmp_path: Path) -> None:
    """Flux's fused qkv (BFL names) against diffusers' separate q, k, v; and the final
    AdaLN whose (shift, scale) halves are stored swapped: the same spectra."""
    rng = np.random.default_rng(8)
    d = 32
    q, k, v = (rng.standard_normal((d, d)).astype(np.float32) for _ in range(3))
    shift, scale = (rng.standard_normal((d, 4 * d)).astype(np.float32) for _ in range(2))
    save_file({"double_blocks.0.img_attn.qkv.weight": np.concatenate([q, k, v]),
               "final_layer.adaLN_modulation.1.weight": np.concatenate([shift, scale])},
              str(tmp_path / "bfl.safetensors"))
    save_file({"transformer.transformer_blocks.0.attn.to_q.weight": q,
               "transformer.transformer_blocks.0.attn.to_k.weight": k,
               "transformer.transformer_blocks.0.attn.to_v.weight": v,
               "transformer.norm_out.linear.weight": np.concatenate([scale, shift])},
              str(tmp_path / "diffusers.safetensors"))
    a = fingerprint_file(tmp_path / "bfl.safetensors").sketch
    b = fingerprint_file(tmp_path / "diffusers.safetensors").sketch
    assert a is not None and b is not None and a.invariant is not None
    assert b.invariant is not None
    assert set(a.invariant.items) == set(b.invariant.items)
    qk = "unet:transformer_blocks_0_attn_to_q*transformer_blocks_0_attn_to_k"
    assert qk in a.invariant.items and "unet:transformer_blocks_0_attn_to_v" in a.invariant.items
    for key, s in b.invariant.items.items():
        assert np.allclose(a.invariant.items[key].values, s.values, rtol=1e-9)
    assert np.allclose(a.invariant.items[qk].values,
                       spectrum(q.astype(np.float64).T @ k.astype(np.float64)), rtol=1e-9)


def test_the_wire_carries_the_layer_and_refuses_a_bad_section_plainly() -> None:
    import base64

    from modelhash.wire import decode_sketch, encode_sketch

    sketch = _sketch(_spectra())
    back = decode_sketch(encode_sketch(sketch))
    assert back.invariant is not None and set(back.invariant.items) == {"a:x", "b:y"}
    body = zlib.decompress(sketch.to_bytes()[6:])
    bad = base64.b64encode(_reblob(3, body[:-7])).decode("ascii")
    with pytest.raises(ValueError, match=r"^sketch: .*invariant section"):
        decode_sketch(bad)


def test_references_calibrate_the_invariant_merge_rule() -> None:
    """Spectral shifts of three tasks: same-task references stay alike once the shared
    shift of the others is removed, so the merge rule's bar rises above them; with
    unlike references it stays where it was."""
    from modelhash.fingerprint._robust import (
        INVARIANT_THRESHOLDS,
        calibrated_invariant,
        match_invariant,
        shared_shift,
    )

    rng = np.random.default_rng(11)
    keys = [f"unet:m{i}" for i in range(12)]
    base = Spectra({k: Spectrum(k, (64, 64), np.sort(rng.random(TOP))[::-1] * 10 + 1)
                    for k in keys})

    def shift(seed: int) -> dict[str, np.ndarray]:
        r = np.random.default_rng(seed)
        return {k: 1e-3 * r.standard_normal(TOP) for k in keys}

    tasks = [shift(900 + j) for j in range(3)]

    def model(seed: int, task: int | None, a: float = 1.3) -> Spectra:
        own = shift(seed)
        return Spectra({k: Spectrum(k, (64, 64), base.items[k].values * (1 + own[k] + (
            a * tasks[task][k] if task is not None else 0))) for k in keys})

    refs = [model(920 + i, i % 3) for i in range(6)]
    cal = calibrated_invariant(refs, base, 3.0)
    assert cal.shared_cosine > 0.55 and cal.shared_min_coefficient > 0.55
    assert (cal.copy_cosine, cal.z) == (INVARIANT_THRESHOLDS.copy_cosine, INVARIANT_THRESHOLDS.z)
    shared = shared_shift(refs, base, 4)
    flagged, sibling = model(950, 0), model(951, 0)
    assert match_invariant(sibling, flagged, base, shared=shared) is not None
    assert match_invariant(sibling, flagged, base, shared=shared, thresholds=cal) is None
    assert match_invariant(flagged, flagged, base, shared=shared, thresholds=cal) is not None
    unlike = [model(960 + i, None) for i in range(6)]
    assert calibrated_invariant(unlike, base, 3.0) == INVARIANT_THRESHOLDS
    assert calibrated_invariant(refs[:3], base, 3.0) == INVARIANT_THRESHOLDS


def test_a_sharded_model_measures_the_matrices_of_its_single_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The matrices measured are chosen for the whole model before the first pass, so
    re-sharding a checkpoint does not change them (one budget, not one per shard)."""
    import json

    import modelhash.fingerprint._invariant as inv
    from modelhash.fingerprint._measure import Measurer

    rng = np.random.default_rng(5)
    shapes = [(48, 40), (64, 48), (96, 64), (40, 40), (128, 96), (56, 48), (80, 72), (64, 64)]
    sd = {f"model.layers.{i}.mlp.up_proj.weight": rng.standard_normal(s).astype(np.float32)
          for i, s in enumerate(shapes)}
    save_file(sd, str(tmp_path / "single.safetensors"))
    folder = tmp_path / "sharded"
    folder.mkdir()
    names = sorted(sd)
    # Cheap matrices in one shard, costly ones in the others: per-shard budgets differ.
    by_cost = sorted(names, key=lambda k: sd[k].size)
    groups = [by_cost[:3], by_cost[3:6], by_cost[6:]]
    wm = {}
    for i, group in enumerate(groups):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: sd[k] for k in group}, str(folder / shard))
        wm.update({k: shard for k in group})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    # A budget that takes about half of the matrices.
    monkeypatch.setattr(inv, "MACS_BASE", 0.0)
    monkeypatch.setattr(inv, "MACS_PER_ELEMENT", 30)

    def measured(path: Path) -> dict[str, np.ndarray]:
        s = fingerprint_file(path).sketch
        assert s is not None and s.invariant is not None
        return {k: v.values for k, v in s.invariant.items.items()}

    single, sharded = measured(tmp_path / "single.safetensors"), measured(folder)
    assert 2 <= len(single) < len(sd)
    assert set(sharded) == set(single)
    for k, v in single.items():
        np.testing.assert_allclose(sharded[k], v, rtol=1e-12)
    # Without the whole-model plan each shard spends its own budget.
    monkeypatch.setattr(Measurer, "plan", lambda self, files: None)
    assert set(measured(folder)) != set(single)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_without_a_base_copies_are_found_on_the_invariant_layer_whatever_changed(
    tmp_path: Path, kv_heads: int,
) -> None:
    """Without a base: a copy whose tensors no longer line up (permuted, rotated) and
    one whose tensors line up but moved far (scales moved across a norm, between
    queries and keys, values and outputs, up and down projections) are both copies on
    the invariant layer, with multi-head and grouped-query attention (where no
    attention product forms and the factors are left out); a sibling or the base
    changed the same way is not."""
    from modelhash.fingerprint import match
    from modelhash.fingerprint._robust import INVARIANT_THRESHOLDS
    from tests.utils.invariant_models import (
        everything,
        llama,
        permute,
        rescale_norms,
        rotate,
        scale_qk,
        scale_vo_ffn,
    )
    from tests.utils.sketch_models import plus, random_delta

    b = llama(40, kv_heads=kv_heads)
    f, g = plus(b, (1, random_delta(b, 41))), plus(b, (1, random_delta(b, 42)))
    flagged = _sk(tmp_path, "f", f)
    got = match(_sk(tmp_path, "f16", {k: v.astype(np.float16) for k, v in f.items()}), flagged)
    assert got is not None and got.evidence["layer"] == "sketch"  # a plain cast: the sketch
    for i, change in enumerate((permute, rotate, rescale_norms, scale_qk, scale_vo_ffn,
                                everything)):
        for half in (False, True):
            def sk(sd: dict[str, np.ndarray], who: str) -> Sketch:
                out, _q = change(sd, 50 + i)
                if half:
                    out = {k: v.astype(np.float16) for k, v in out.items()}
                return _sk(tmp_path, f"{who}-{i}-{half}", out)

            name = f"{change.__name__}{' fp16' if half else ''}"
            got = match(sk(f, "f"), flagged)
            assert got is not None and got.match == "near-duplicate", name
            assert got.evidence["layer"] == "invariant" and got.evidence["invariant"] is True
            raw = float(got.evidence["raw_distance"])  # type: ignore[arg-type]
            assert raw <= INVARIANT_THRESHOLDS.raw_distance, name
            assert match(sk(g, "g"), flagged) is None, name
            assert match(sk(b, "b"), flagged) is None, name


def test_a_factor_joins_the_shift_only_where_it_moved_with_the_rest() -> None:
    """The shift from the base keeps a product's factor when it moved about as much as
    the products did (a fine-tune), and leaves it out when it moved far more (a scale
    moved between it and its partner); the copy distance never counts it."""
    from modelhash.fingerprint._robust import EXPOSED_RATIO, base_distance, shifts, trusted

    rng = np.random.default_rng(12)
    keys = [":layers_0_self_attn_q_proj", ":layers_0_self_attn_k_proj",
            ":layers_0_self_attn_q_proj*layers_0_self_attn_k_proj", ":layers_0_mlp_gate_proj"]
    base = Spectra({k: Spectrum(k, (48, 48), np.sort(rng.random(TOP))[::-1] + 1) for k in keys})

    def moved(by: dict[str, float]) -> Spectra:
        return Spectra({k: Spectrum(k, s.shape, s.values * (1 + by.get(k, 1e-3)
                                                            * rng.standard_normal(TOP)))
                        for k, s in base.items.items()})

    assert set(trusted(base).items) == set(keys[2:])
    fine_tune = moved({})
    assert set(shifts(fine_tune, base)) == set(keys)
    scaled = moved({keys[0]: 0.03, keys[1]: 1e-3 * EXPOSED_RATIO * 0.5})
    assert set(shifts(scaled, base)) == set(keys[1:])
    # The copy distance compares the products and the other matrices only.
    assert base_distance(scaled, base) == base_distance(trusted(scaled), trusted(base))
    assert base_distance(scaled, base) < 3e-3


def test_a_copy_is_judged_on_the_spectra_no_scale_can_move() -> None:
    """A copy whose factor carries a mild scale (it moved less than EXPOSED_RATIO times
    the rest, so it stays in the shift and pulls the pooled cosine down) is still a
    copy: the copy rule scores the products and other matrices alone."""
    from modelhash.fingerprint._robust import compare_invariant, match_invariant

    rng = np.random.default_rng(13)
    keys = [":layers_0_self_attn_q_proj", ":layers_0_self_attn_k_proj",
            ":layers_0_self_attn_q_proj*layers_0_self_attn_k_proj", ":layers_0_mlp_gate_proj",
            ":layers_0_mlp_down_proj*layers_0_mlp_up_proj", ":layers_1_mlp_gate_proj"]
    base = Spectra({k: Spectrum(k, (48, 48), np.sort(rng.random(TOP))[::-1] + 1) for k in keys})

    def moved(x: Spectra, by: dict[str, float], default: float) -> Spectra:
        return Spectra({k: Spectrum(k, s.shape, s.values * (1 + by.get(k, default)
                                                            * rng.standard_normal(TOP)))
                        for k, s in x.items.items()})

    flagged = moved(base, {}, 1e-3)
    upload = moved(flagged, {keys[0]: 2e-3, keys[1]: 2e-3}, 1e-7)
    c = compare_invariant(upload, flagged, base)
    assert c.strict is not None and c.cosine is not None
    assert c.matrices == len(keys) and c.strict.matrices == len(keys) - 2
    assert c.cosine < 0.95 < c.strict.cosine  # the factors' scale spoils the pooled cosine
    got = match_invariant(upload, flagged, base)
    assert got is not None and got[0] == "near-duplicate"
    assert got[2].matrices == len(keys) - 2
