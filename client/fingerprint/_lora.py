"""LoRA-style adapters: group their tensors per target module, sketch each effective delta.

An adapter stores, per target module, factors whose product is the change it makes
to that module's weight. Its sketch is the sketch of that effective delta ΔW, so
the same adapter in another form sketches the same:

- plain LoRA (kohya ``lora_down``/``lora_up``, PEFT and diffusers ``lora_A``/``lora_B``,
  old diffusers ``lora.down``/``lora.up``): ΔW = scale · up · down, sketched as
  scale · (A·up)(down·Bᵀ) without forming the product, so any re-factorisation
  up·R, R⁻¹·down gives the same sketch;
- LoHa: ΔW = scale · (w1a·w1b) ⊙ (w2a·w2b); LoKr: ΔW = scale · w1 ⊗ w2 (either
  factor possibly itself a product); both are materialised, then sketched.

``scale`` follows each format's convention: kohya and LyCORIS store an ``alpha``
per module and scale by alpha/rank (no alpha means alpha = rank); PEFT and diffusers
keep ``lora_alpha`` and ``r`` in an adapter config (``adapter_config.json`` beside
the file, or the ``lora_adapter_metadata`` a diffusers file carries), with
``rank_pattern``/``alpha_pattern`` overrides and rsLoRA's alpha/sqrt(r). Re-scaling
alpha against rank therefore leaves the delta, and the sketch, unchanged. Tucker
variants (``lora_mid``, ``hada_t1``, ``lokr_t2``) are skipped with a note.

The table :data:`ROLES` maps name endings to factor roles; a new flavour is one
more row.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from modelhash.fingerprint._keys import module_key
from modelhash.fingerprint._project import matrix_shape, project, project_factors
from modelhash.fingerprint._sketch import TensorSketch

__all__ = ["ROLES", "AdapterConfig", "LoraGroup", "adapter_configs", "group_lora", "sketch_group"]

F64 = npt.NDArray[np.float64]
MAX_CONFIG_BYTES = 1024 * 1024

ROLES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^(.+)\.lora_down\.weight$"), "down"),
    (re.compile(r"^(.+)\.lora_up\.weight$"), "up"),
    (re.compile(r"^(.+)\.lora_mid\.weight$"), "tucker"),
    (re.compile(r"^(.+)\.hada_(w[12]_[ab])$"), "hada_{}"),
    (re.compile(r"^(.+)\.hada_t[12]$"), "tucker"),
    (re.compile(r"^(.+)\.lokr_(w[12](?:_[ab])?)$"), "lokr_{}"),
    (re.compile(r"^(.+)\.lokr_t[12]$"), "tucker"),
    (re.compile(r"^(.+)\.lora_linear_layer\.down\.weight$"), "down"),
    (re.compile(r"^(.+)\.lora_linear_layer\.up\.weight$"), "up"),
    (re.compile(r"^(.+)[._]lora\.down\.weight$"), "down"),
    (re.compile(r"^(.+)[._]lora\.up\.weight$"), "up"),
    (re.compile(r"^(.+)\.lora_A(?:\.[\w-]+)?\.weight$"), "down"),
    (re.compile(r"^(.+)\.lora_B(?:\.[\w-]+)?\.weight$"), "up"),
    (re.compile(r"^(.+)\.weight\.lora_a$"), "down"),
    (re.compile(r"^(.+)\.weight\.lora_b$"), "up"),
    (re.compile(r"^(.+_lora\d*)\.down\.weight$"), "down"),  # XLabs: processor.qkv_lora1.down
    (re.compile(r"^(.+_lora\d*)\.up\.weight$"), "up"),
    (re.compile(r"^(.+)\.alpha$"), "alpha"),
    (re.compile(r"^(.+)\.(?:dora_scale|lora_magnitude_vector(?:\.[\w-]+)?)$"), "dora"),
]
"""Name endings of adapter tensors: (module path, role), first match wins."""


@dataclass
class LoraGroup:
    """The tensors of one adapted module: ``parts`` maps a role to a tensor name."""

    key: str
    module: str
    parts: dict[str, str] = field(default_factory=dict)


def lora_role(name: str) -> tuple[str, str] | None:
    """(module path, role) of an adapter tensor name, or None."""
    for pattern, role in ROLES:
        if m := pattern.match(name):
            return m[1], role.format(*m.groups()[1:])
    return None


def group_lora(names: Sequence[str]) -> tuple[dict[str, LoraGroup], list[str]]:
    """Adapter groups keyed by canonical module key, and the names that are not parts."""
    groups: dict[str, LoraGroup] = {}
    other: list[str] = []
    for name in names:
        found = lora_role(name)
        if found is None:
            other.append(name)
            continue
        module, role = found
        key = module_key(module)
        g = groups.setdefault(key, LoraGroup(key, module))
        g.parts[role] = name
    return groups, other


@dataclass(frozen=True)
class AdapterConfig:
    """PEFT-style scaling: ``lora_alpha``/``r`` with per-module overrides."""

    r: float
    alpha: float
    rslora: bool = False
    rank_pattern: Mapping[str, float] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AdapterConfig | None:
        """Read a PEFT config dict; None if it lacks usable ``r`` and ``lora_alpha``."""
        r, alpha = d.get("r"), d.get("lora_alpha", d.get("alpha"))
        if not _positive(r) or not _positive(alpha):
            return None
        return cls(
            r=float(r),  # type: ignore[arg-type]
            alpha=float(alpha),
            rslora=d.get("use_rslora") is True,
            rank_pattern=_patterns(d.get("rank_pattern")),
            alpha_pattern=_patterns(d.get("alpha_pattern")),
        )

    def scale(self, module: str, rank: int) -> float:
        """The scale PEFT applies to ``module``'s up·down."""
        r = _lookup(self.rank_pattern, module, float(rank))
        alpha = _lookup(self.alpha_pattern, module, self.alpha)
        return alpha / math.sqrt(r) if self.rslora else alpha / r


def _positive(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and 0 < v < 1e9


def _patterns(v: object) -> dict[str, float]:
    if not isinstance(v, dict):
        return {}
    return {str(k): float(x) for k, x in v.items() if _positive(x)}


def _lookup(patterns: Mapping[str, float], module: str, default: float) -> float:
    for pattern, value in patterns.items():
        if module == pattern or module.endswith("." + pattern):
            return value
    return default


def adapter_configs(
    metadata: Mapping[str, str], sidecar: bytes | None
) -> dict[str, AdapterConfig]:
    """Adapter configs by component prefix ('' for all) from a sidecar or file metadata.

    A diffusers pipeline LoRA packs one config per component as ``unet.r``,
    ``text_encoder.lora_alpha``...; a PEFT ``adapter_config.json`` or a component
    LoRA holds one unprefixed config.
    """
    sources: list[Any] = []
    if sidecar is not None and len(sidecar) <= MAX_CONFIG_BYTES:
        sources.append(_json(sidecar))
    raw = metadata.get("lora_adapter_metadata")
    if raw is not None and len(raw) <= MAX_CONFIG_BYTES:
        sources.append(_json(raw.encode("utf-8", "replace")))
    out: dict[str, AdapterConfig] = {}
    for src in sources:
        if not isinstance(src, dict):
            continue
        split: dict[str, dict[str, Any]] = {}
        for k, v in src.items():
            prefix, _, leaf = str(k).rpartition(".")
            if leaf in ("r", "lora_alpha", "alpha", "use_rslora", "rank_pattern", "alpha_pattern"):
                split.setdefault(prefix, {})[leaf] = v
        for prefix, d in split.items():
            cfg = AdapterConfig.from_dict(d)
            if cfg is not None:
                out.setdefault(prefix, cfg)
    return out


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None


def _config_for(configs: Mapping[str, AdapterConfig], module: str) -> AdapterConfig | None:
    for prefix, cfg in configs.items():
        if prefix and (module.startswith(prefix + ".") or ("." + prefix + ".") in module):
            return cfg
    return configs.get("")


def _matrix(x: F64) -> F64:
    return x.reshape(x.shape[0], -1)


def _alpha_scale(arrays: Mapping[str, F64], rank: int) -> float | None:
    alpha = arrays.get("alpha")
    if alpha is None or alpha.size != 1:
        return None
    a = float(alpha.reshape(-1)[0])
    return a / rank if math.isfinite(a) and a > 0 and rank > 0 else None


def sketch_group(
    group: LoraGroup,
    arrays: Mapping[str, F64],
    configs: Mapping[str, AdapterConfig],
) -> TensorSketch | str:
    """The sketch of a group's effective delta, or why it cannot be sketched.

    ``arrays`` maps each role of the group to its decoded values in stored shape.
    """
    roles = set(arrays)
    if "tucker" in roles:
        return "tucker-decomposed factors"
    if {"down", "up"} <= roles:
        return _plain(group, arrays, configs)
    if {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= roles:
        return _loha(group, arrays, configs)
    if any(r.startswith("lokr_") for r in roles):
        return _lokr(group, arrays, configs)
    return "incomplete factors"


def _plain(
    group: LoraGroup, arrays: Mapping[str, F64], configs: Mapping[str, AdapterConfig]
) -> TensorSketch | str:
    up, down = arrays["up"], arrays["down"]
    rank = down.shape[0]
    up2, down2 = _matrix(up), _matrix(down)
    if up2.shape[1] != rank:
        return "factor shapes disagree"
    mn = matrix_shape((up.shape[0], *down.shape[1:]))
    if mn is None:
        return "shape"
    scale = _scale(group, arrays, configs, rank)
    return TensorSketch(group.key, mn, project_factors(up2, down2.reshape(rank, mn[1]), scale))


def _scale(
    group: LoraGroup, arrays: Mapping[str, F64], configs: Mapping[str, AdapterConfig], rank: int
) -> float:
    """alpha/rank from the module's alpha tensor, else from the adapter config, else 1.

    ``rank`` 0 means a LyCORIS module with no low-rank factor, which is unscaled
    unless a PEFT config says otherwise (PEFT scales by alpha/r regardless).
    """
    if rank:
        scale = _alpha_scale(arrays, rank)
        if scale is not None:
            return scale
    cfg = _config_for(configs, group.module)
    if cfg is None:
        return 1.0
    return cfg.scale(group.module, rank or int(cfg.r))


def _loha(
    group: LoraGroup, arrays: Mapping[str, F64], configs: Mapping[str, AdapterConfig]
) -> TensorSketch | str:
    w1 = _matrix(arrays["hada_w1_a"]) @ _matrix(arrays["hada_w1_b"])
    w2 = _matrix(arrays["hada_w2_a"]) @ _matrix(arrays["hada_w2_b"])
    if w1.shape != w2.shape:
        return "factor shapes disagree"
    rank = arrays["hada_w1_b"].shape[0]
    return _dense(group, w1 * w2 * _scale(group, arrays, configs, rank))


def _lokr(
    group: LoraGroup, arrays: Mapping[str, F64], configs: Mapping[str, AdapterConfig]
) -> TensorSketch | str:
    factors: list[F64] = []
    rank = 0
    for i in ("1", "2"):
        full = arrays.get(f"lokr_w{i}")
        a, b = arrays.get(f"lokr_w{i}_a"), arrays.get(f"lokr_w{i}_b")
        if full is not None:
            factors.append(_matrix(full))
        elif a is not None and b is not None:
            factors.append(_matrix(a) @ _matrix(b))
            rank = b.shape[0]
        else:
            return "incomplete factors"
    delta = np.asarray(np.kron(factors[0], factors[1]), dtype=np.float64)
    delta *= _scale(group, arrays, configs, rank)
    return _dense(group, delta)


def _dense(group: LoraGroup, delta: F64) -> TensorSketch | str:
    mn = matrix_shape(delta.shape)
    if mn is None:
        return "shape"
    return TensorSketch(group.key, mn, project(delta.reshape(mn)))
