"""Small safetensors models for sketch-layer tests: a base, its derivatives, adapters.

Every model is written with numpy and fingerprinted through the client API, so the
sketches the tests send are exactly what ``modelhash`` would send.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from modelhash.fingerprint import Sketch, fingerprint_path

StateDict = dict[str, np.ndarray]

_BLOCK = "down_blocks_0_attentions_0_transformer_blocks_0"
#: Attention projections of one UNet block, diffusers names, and their shapes.
MODULES: dict[str, tuple[int, int]] = {
    f"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn{a}.{p}": shape
    for a in (1, 2)
    for p, shape in (("to_q", (64, 64)), ("to_k", (64, 128)), ("to_v", (64, 128)),
                     ("to_out.0", (64, 64)))
}


def _kohya(module: str) -> str:
    """``unet.down_blocks.0....attn1.to_q`` -> ``lora_unet_down_blocks_0_..._attn1_to_q``."""
    return "lora_unet_" + module.removeprefix("unet.").replace(".", "_")


def base_model(seed: int = 0) -> StateDict:
    """A reference base: float32 attention weights plus a norm and a bias."""
    rng = np.random.default_rng(seed)
    sd: StateDict = {
        f"{m}.weight": (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
        for m, shape in MODULES.items()
    }
    sd["unet.down_blocks.0.attentions.0.norm.weight"] = np.ones(64, dtype=np.float32)
    sd["unet.down_blocks.0.attentions.0.norm.bias"] = np.zeros(64, dtype=np.float32)
    return sd


def random_delta(base: StateDict, seed: int, size: float = 0.02) -> StateDict:
    """A dense delta of relative norm ``size`` on every matrix of ``base``."""
    rng = np.random.default_rng(seed)
    out: StateDict = {}
    for k, v in base.items():
        if v.ndim == 2:
            d = rng.standard_normal(v.shape)
            out[k] = (d / np.linalg.norm(d) * np.linalg.norm(v) * size).astype(np.float32)
    return out


def plus(base: StateDict, *deltas: tuple[float, StateDict]) -> StateDict:
    """``base`` plus weighted deltas."""
    out = {k: v.copy() for k, v in base.items()}
    for w, d in deltas:
        for k, v in d.items():
            out[k] = (out[k] + w * v).astype(out[k].dtype)
    return out


def cast(sd: StateDict, dtype: type[np.generic] = np.float16) -> StateDict:
    """Every floating tensor cast to ``dtype``."""
    return {k: v.astype(dtype) for k, v in sd.items()}


def lora(base: StateDict, seed: int, rank: int = 4, size: float = 0.03,
         modules: list[str] | None = None) -> tuple[StateDict, StateDict]:
    """A kohya LoRA on some of ``base``'s modules, and its effective delta by weight name.

    The factors are scaled so that the delta's relative norm is ``size`` per module.
    """
    rng = np.random.default_rng(seed)
    adapter: StateDict = {}
    delta: StateDict = {}
    for m in modules or [m for m in MODULES if "attn1" in m]:
        out, inp = MODULES[m]
        up = rng.standard_normal((out, rank))
        down = rng.standard_normal((rank, inp))
        alpha = float(rank)
        eff = up @ down
        w = base[f"{m}.weight"]
        scale = np.linalg.norm(w) * size / np.linalg.norm(eff)
        up = up * scale
        adapter[f"{_kohya(m)}.lora_up.weight"] = up.astype(np.float32)
        adapter[f"{_kohya(m)}.lora_down.weight"] = down.astype(np.float32)
        adapter[f"{_kohya(m)}.alpha"] = np.array(alpha, dtype=np.float32)
        delta[f"{m}.weight"] = (alpha / rank * up @ down).astype(np.float32)
    return adapter, delta


def lora_sum(*parts: tuple[float, StateDict]) -> StateDict:
    """One kohya LoRA whose effective delta is the weighted sum of the parts' deltas.

    The factors are stacked along the rank (up: side by side, down: one above the
    other), with alpha equal to the total rank, as :func:`lora` makes them.
    """
    first = parts[0][1]
    out: StateDict = {}
    for k in first:
        if not k.endswith(".lora_up.weight"):
            continue
        stem = k.removesuffix(".lora_up.weight")
        ups, downs = [], []
        for w, a in parts:
            scale = float(a[f"{stem}.alpha"]) / a[k].shape[1]
            ups.append(a[k] * (w * scale))
            downs.append(a[f"{stem}.lora_down.weight"])
        out[k] = np.concatenate(ups, axis=1).astype(np.float32)
        out[f"{stem}.lora_down.weight"] = np.concatenate(downs, axis=0).astype(np.float32)
        out[f"{stem}.alpha"] = np.array(float(out[k].shape[1]), dtype=np.float32)
    return out


def lora_resaved(adapter: StateDict, seed: int) -> StateDict:
    """The same adapter re-factorised (up·R, R⁻¹·down) and stored in float16."""
    rng = np.random.default_rng(seed)
    out: StateDict = {}
    for k, v in adapter.items():
        if k.endswith(".lora_up.weight"):
            stem = k.removesuffix(".lora_up.weight")
            down = adapter[f"{stem}.lora_down.weight"].astype(np.float64)
            r = rng.standard_normal((v.shape[1], v.shape[1])) + 3 * np.eye(v.shape[1])
            out[k] = (v.astype(np.float64) @ r).astype(np.float16)
            out[f"{stem}.lora_down.weight"] = np.linalg.solve(r, down).astype(np.float16)
        elif k.endswith(".alpha"):
            out[k] = v
    return out


def write(folder: Path, name: str, sd: StateDict) -> Path:
    """Save ``sd`` as ``folder/name.safetensors``."""
    path = folder / f"{name}.safetensors"
    save_file(sd, str(path))
    return path


def sketch_of(path: Path) -> Sketch:
    """The sketch layer ``modelhash`` computes for ``path``."""
    (outcome,) = fingerprint_path(path, layers="all")
    assert outcome.fingerprint is not None and outcome.fingerprint.sketch is not None
    return outcome.fingerprint.sketch
