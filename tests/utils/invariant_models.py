"""Small Llama-shaped models, and the function-preserving changes a re-uploader makes.

Written with numpy only: a base with norms; :func:`disguise`, the same weights with
the feed-forward units and the residual stream permuted and the norm scales moved
into the matrices that read them; and each such change on its own (:func:`permute`,
:func:`rotate`, :func:`rescale_norms`, :func:`scale_qk`, :func:`scale_vo_ffn`,
:func:`everything`), with a
forward pass (:func:`forward`) to check that they keep the function. Fine-tunes and
merges of them use :mod:`tests.utils.sketch_models` (``random_delta``, ``plus``).
"""

from __future__ import annotations

import numpy as np

StateDict = dict[str, np.ndarray]

_MATRICES = (("self_attn.q_proj", "dd"), ("self_attn.k_proj", "kd"), ("self_attn.v_proj", "kd"),
             ("self_attn.o_proj", "dd"), ("mlp.gate_proj", "fd"), ("mlp.up_proj", "fd"),
             ("mlp.down_proj", "df"))
_READS = {"self_attn.q_proj": "input_layernorm", "self_attn.k_proj": "input_layernorm",
          "self_attn.v_proj": "input_layernorm", "mlp.gate_proj": "post_attention_layernorm",
          "mlp.up_proj": "post_attention_layernorm"}


def llama(seed: int, d: int = 48, f: int = 128, layers: int = 2, kv_heads: int = 4
          ) -> StateDict:
    """A tiny Llama-shaped state dict (float32), norms not all ones; with ``kv_heads``
    below :data:`HEADS`, grouped-query attention (keys and values have fewer rows)."""
    rng = np.random.default_rng(seed)
    dims = {"d": d, "f": f, "k": d // HEADS * kv_heads}
    sd: StateDict = {}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, shape in _MATRICES:
            m, n = dims[shape[0]], dims[shape[1]]
            sd[p + name + ".weight"] = (rng.standard_normal((m, n)) / np.sqrt(n)).astype(np.float32)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            sd[p + norm + ".weight"] = (1 + 0.2 * rng.standard_normal(d)).astype(np.float32)
    return sd


def disguise(sd: StateDict, seed: int) -> StateDict:
    """The same function with every matrix changed: FFN units and residual channels
    permuted, and each norm's scale moved (per channel) into the matrices reading it."""
    rng = np.random.default_rng(seed)
    d = sd["model.layers.0.input_layernorm.weight"].shape[0]
    f = sd["model.layers.0.mlp.up_proj.weight"].shape[0]
    res = rng.permutation(d)
    out: StateDict = {}
    layers = sorted({k.split(".")[2] for k in sd})
    for i in layers:
        p = f"model.layers.{i}."
        unit = rng.permutation(f)
        scale = {n: np.exp(0.5 * rng.standard_normal(d))
                 for n in ("input_layernorm", "post_attention_layernorm")}
        for n, s in scale.items():
            out[p + n + ".weight"] = (sd[p + n + ".weight"] * s)[res]
        for name, _ in _MATRICES:
            w = sd[p + name + ".weight"].astype(np.float64)
            if name in _READS:
                w = w / scale[_READS[name]]
            if name in ("mlp.gate_proj", "mlp.up_proj"):
                w = w[unit][:, res]
            elif name == "mlp.down_proj":
                w = w[res][:, unit]
            elif name == "self_attn.o_proj":
                w = w[res]
            else:
                w = w[:, res]
            out[p + name + ".weight"] = np.ascontiguousarray(w, dtype=np.float32)
    return out


# Each change below, one at a time, as ``eval_invariant.py`` applies them with torch
# (``llm_ffn``, ``llm_heads``, ``_llm_residual``, ``llm_norm_rescale``,
# ``llm_qk_scale``). Each returns the new state dict and the map ``q`` it applied to
# the residual stream (the identity when untouched): the new model on ``x @ q.T``
# computes the old one's output times ``q.T`` (see :func:`forward`).

HEADS = 4
_READERS = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}
_WRITERS = ("self_attn.o_proj", "mlp.down_proj")


def _layers(sd: StateDict) -> list[str]:
    return sorted({k.split(".")[2] for k in sd})


def _dims(sd: StateDict) -> tuple[int, int]:
    up = sd["model.layers.0.mlp.up_proj.weight"]
    return up.shape[1], up.shape[0]


def _groups(sd: StateDict) -> int:
    """Query heads per key/value head (1 without grouped-query attention)."""
    d, _ = _dims(sd)
    return d // sd["model.layers.0.self_attn.k_proj.weight"].shape[0]


def _rows(heads: np.ndarray, hd: int) -> np.ndarray:
    out: np.ndarray = (heads[:, None] * hd + np.arange(hd)).reshape(-1)
    return out


def _f32(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w, dtype=np.float32)


def permute(sd: StateDict, seed: int) -> tuple[StateDict, np.ndarray]:
    """Feed-forward units and attention heads permuted per layer, and the residual
    stream's channels permuted (the norms' scales follow their channels)."""
    rng = np.random.default_rng(seed)
    d, f = _dims(sd)
    hd = d // HEADS
    r = _groups(sd)
    out = dict(sd)
    for i in _layers(sd):
        p = f"model.layers.{i}."
        unit = rng.permutation(f)
        # Key/value heads are permuted, each with its group of query heads (whose
        # order within the group is free).
        kv = rng.permutation(HEADS // r)
        q = np.concatenate([g * r + rng.permutation(r) for g in kv])
        for name in ("mlp.gate_proj", "mlp.up_proj"):
            out[p + name + ".weight"] = _f32(sd[p + name + ".weight"][unit])
        out[p + "mlp.down_proj.weight"] = _f32(sd[p + "mlp.down_proj.weight"][:, unit])
        out[p + "self_attn.q_proj.weight"] = _f32(sd[p + "self_attn.q_proj.weight"][_rows(q, hd)])
        for name in ("self_attn.k_proj", "self_attn.v_proj"):
            out[p + name + ".weight"] = _f32(sd[p + name + ".weight"][_rows(kv, hd)])
        out[p + "self_attn.o_proj.weight"] = _f32(
            sd[p + "self_attn.o_proj.weight"][:, _rows(q, hd)])
    q = np.eye(d)[rng.permutation(d)]
    return _residual(out, q, fold=False), q


def rotate(sd: StateDict, seed: int) -> tuple[StateDict, np.ndarray]:
    """The residual stream rotated by a random orthogonal matrix, each norm's scale
    folded into the matrices reading it first (an RMSNorm commutes with a rotation
    only when its scale is 1)."""
    rng = np.random.default_rng(seed)
    d, _ = _dims(sd)
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    q = q * np.sign(np.diagonal(r))
    return _residual(sd, q, fold=True), q


def _residual(sd: StateDict, q: np.ndarray, *, fold: bool) -> StateDict:
    out = dict(sd)
    for i in _layers(sd):
        p = f"model.layers.{i}."
        for norm, readers in _READERS.items():
            g = sd[p + norm + ".weight"].astype(np.float64)
            for name in readers:
                w = sd[p + name + ".weight"].astype(np.float64) * (g if fold else 1.0)
                out[p + name + ".weight"] = _f32(w @ q.T)
            out[p + norm + ".weight"] = _f32(np.ones_like(g) if fold else np.abs(q) @ g)
        for name in _WRITERS:
            out[p + name + ".weight"] = _f32(q @ sd[p + name + ".weight"].astype(np.float64))
    return out


def rescale_norms(sd: StateDict, seed: int) -> tuple[StateDict, np.ndarray]:
    """Each norm's scale multiplied per channel, the matrices reading it divided."""
    rng = np.random.default_rng(seed)
    d, _ = _dims(sd)
    out = dict(sd)
    for i in _layers(sd):
        p = f"model.layers.{i}."
        for norm, readers in _READERS.items():
            g = sd[p + norm + ".weight"].astype(np.float64)
            s = np.exp(0.5 * rng.standard_normal(g.shape))
            out[p + norm + ".weight"] = _f32(g * s)
            for name in readers:
                out[p + name + ".weight"] = _f32(sd[p + name + ".weight"] / s)
    return out, np.eye(d)


def scale_qk(sd: StateDict, seed: int, spread: float = 0.7) -> tuple[StateDict, np.ndarray]:
    """Each key head's keys divided by a random factor exp(spread N(0, 1)) and the
    queries of its query heads multiplied by it (the attention logits do not change)."""
    rng = np.random.default_rng(seed)
    d, _ = _dims(sd)
    out = dict(sd)
    for i in _layers(sd):
        p = f"model.layers.{i}."
        cq, ck = _head_scales(sd, rng, spread)
        out[p + "self_attn.q_proj.weight"] = _f32(sd[p + "self_attn.q_proj.weight"] * cq[:, None])
        out[p + "self_attn.k_proj.weight"] = _f32(sd[p + "self_attn.k_proj.weight"] / ck[:, None])
    return out, np.eye(d)


def _head_scales(sd: StateDict, rng: np.random.Generator, spread: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    """One random factor exp(spread N(0, 1)) per key/value head, repeated over the rows
    of its query heads and over its own rows."""
    d, _ = _dims(sd)
    r, hd = _groups(sd), d // HEADS
    c = np.exp(spread * rng.standard_normal(HEADS // r))
    return np.repeat(c, r * hd), np.repeat(c, hd)


def scale_vo_ffn(sd: StateDict, seed: int, spread: float = 0.7) -> tuple[StateDict, np.ndarray]:
    """Each value head's values multiplied by a random factor and the output columns of
    its query heads divided by it, and each feed-forward unit's up projection
    multiplied and its down projection's column divided (SwiGLU is linear in the up
    projection)."""
    rng = np.random.default_rng(seed)
    d, f = _dims(sd)
    out = dict(sd)
    for i in _layers(sd):
        p = f"model.layers.{i}."
        cq, cv = _head_scales(sd, rng, spread)
        out[p + "self_attn.v_proj.weight"] = _f32(sd[p + "self_attn.v_proj.weight"] * cv[:, None])
        out[p + "self_attn.o_proj.weight"] = _f32(sd[p + "self_attn.o_proj.weight"] / cq)
        u = np.exp(spread * rng.standard_normal(f))
        out[p + "mlp.up_proj.weight"] = _f32(sd[p + "mlp.up_proj.weight"] * u[:, None])
        out[p + "mlp.down_proj.weight"] = _f32(sd[p + "mlp.down_proj.weight"] / u)
    return out, np.eye(d)


def everything(sd: StateDict, seed: int) -> tuple[StateDict, np.ndarray]:
    """Every change above at once (as ``llm_all`` applies them)."""
    d, _ = _dims(sd)
    total = np.eye(d)
    for i, change in enumerate((rescale_norms, scale_qk, scale_vo_ffn, permute, rotate)):
        sd, q = change(sd, seed * 10 + i)
        total = q @ total
    return sd, total


def forward(sd: StateDict, x: np.ndarray) -> np.ndarray:
    """The residual stream after every layer (pre-norm, RMSNorm, causal multi-head
    attention without positions, SwiGLU), for ``x`` of shape (tokens, d), in float64."""
    t = x.shape[0]
    d, _ = _dims(sd)
    hd = d // HEADS
    r = _groups(sd)
    mask = np.triu(np.full((t, t), -np.inf), 1)

    def w(name: str) -> np.ndarray:
        return sd[name].astype(np.float64)

    def norm(h: np.ndarray, g: np.ndarray) -> np.ndarray:
        return h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + 1e-6) * g

    h = x.astype(np.float64)
    for i in _layers(sd):
        p = f"model.layers.{i}."
        a = norm(h, w(p + "input_layernorm.weight"))
        q, k, v = (a @ w(p + f"self_attn.{n}_proj.weight").T for n in "qkv")
        heads = []
        for j in range(HEADS):
            sl, kv = slice(j * hd, (j + 1) * hd), slice(j // r * hd, (j // r + 1) * hd)
            logits = q[:, sl] @ k[:, kv].T / np.sqrt(hd) + mask
            e = np.exp(logits - logits.max(axis=1, keepdims=True))
            heads.append((e / e.sum(axis=1, keepdims=True)) @ v[:, kv])
        h = h + np.concatenate(heads, axis=1) @ w(p + "self_attn.o_proj.weight").T
        m = norm(h, w(p + "post_attention_layernorm.weight"))
        gate = m @ w(p + "mlp.gate_proj.weight").T
        h = h + (gate / (1 + np.exp(-gate)) * (m @ w(p + "mlp.up_proj.weight").T)) @ w(
            p + "mlp.down_proj.weight").T
    return h
