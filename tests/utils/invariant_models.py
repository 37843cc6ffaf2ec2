"""Small Llama-shaped models, and the function-preserving changes a re-uploader makes.

Written with numpy only: a base with norms, and the same weights with the feed-forward units and the residual stream permuted
and the norm scales moved into the matrices that read them. Fine-tunes and merges of
them use :mod:`tests.utils.sketch_models` (``random_delta``, ``plus``).
"""

from __future__ import annotations

import numpy as np

StateDict = dict[str, np.ndarray]

_MATRICES = (("self_attn.q_proj", "dd"), ("self_attn.k_proj", "dd"), ("self_attn.v_proj", "dd"),
             ("self_attn.o_proj", "dd"), ("mlp.gate_proj", "fd"), ("mlp.up_proj", "fd"),
             ("mlp.down_proj", "df"))
_READS = {"self_attn.q_proj": "input_layernorm", "self_attn.k_proj": "input_layernorm",
          "self_attn.v_proj": "input_layernorm", "mlp.gate_proj": "post_attention_layernorm",
          "mlp.up_proj": "post_attention_layernorm"}


def llama(seed: int, d: int = 48, f: int = 128, layers: int = 2) -> StateDict:
    """A tiny Llama-shaped state dict (float32), norms not all ones."""
    rng = np.random.default_rng(seed)
    dims = {"d": d, "f": f}
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
