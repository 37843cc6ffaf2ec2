"""LoRA-style adapters: group their tensors per target module, sketch each effective delta.

An adapter stores, per target module, factors whose product is the change it makes
to that module's weight. Its sketch is the sketch of that effective delta ΔW, so
the same adapter in another form sketches the same:

- plain LoRA (kohya ``lora_down``/``lora_up``, PEFT and diffusers ``lora_A``/``lora_B``,
  old diffusers ``lora.down``/``lora.up``): ΔW = scale · up · down, sketched as
  scale · (A·up)(down·Bᵀ) without forming the product, so any re-factorisation
  up·R, R⁻¹·down gives the same sketch;
- LoHa: ΔW = scale · (w1a·w1b) ⊙ (w2a·w2b), a matrix of rank r1·r2: the sketch is
  (A·(w1a ⊛ w2a))((w1b • w2b)·Bᵀ) with ⊛ and • the row- and column-wise Khatri-Rao
  products, built a block of rows or columns at a time (or, when r1·r2 is larger
  than the matrix, from bounded row blocks of ΔW itself);
- LoKr: ΔW = scale · w1 ⊗ w2 (either factor possibly itself a product): A and B
  are split into blocks that match the Kronecker structure, so ΔW is never formed.

No dense ΔW is ever held; a module whose sketch would cost more than
MAX_SKETCH_WORK multiply-adds is skipped with a note ("too large to sketch"). A
factor that is 0-d, empty or does not fit its partners raises :class:`FactorError`.

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
from modelhash.fingerprint._limits import MAX_SKETCH_SIDE, MAX_SKETCH_WORK
from modelhash.fingerprint._project import K, matrix_shape, project_factors, projections
from modelhash.fingerprint._sketch import TensorSketch

__all__ = [
    "ROLES",
    "AdapterConfig",
    "FactorError",
    "LoraGroup",
    "adapter_configs",
    "group_lora",
    "sketch_group",
]

F64 = npt.NDArray[np.float64]
MAX_CONFIG_BYTES = 1024 * 1024
_BLOCK = 1 << 20
TOO_LARGE = "too large to sketch"


class FactorError(ValueError):
    """An adapter factor is 0-d, empty, or its shape does not fit its partners."""

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


def _matrix(x: F64, role: str = "factor") -> F64:
    """A factor as a matrix (first dimension kept, the rest flattened)."""
    if x.ndim < 2:
        raise FactorError(f"{role} has {x.ndim} dimension(s), needs at least 2")
    if x.size == 0:
        raise FactorError(f"{role} is empty (shape {tuple(x.shape)})")
    return x.reshape(x.shape[0], -1)


def _product(a: F64, b: F64, what: str) -> None:
    if a.shape[1] != b.shape[0]:
        raise FactorError(
            f"{what}: factor shapes disagree ({a.shape[0]}x{a.shape[1]} times "
            f"{b.shape[0]}x{b.shape[1]})"
        )


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
    up2, down2 = _matrix(up, "up"), _matrix(down, "down")
    rank = down.shape[0]
    _product(up2, down2, "up x down")
    mn = matrix_shape((up.shape[0], *down.shape[1:]))
    if mn is None:
        return "shape"
    if sum(mn) > MAX_SKETCH_SIDE:
        return TOO_LARGE
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
    p, q = _matrix(arrays["hada_w1_a"], "hada_w1_a"), _matrix(arrays["hada_w1_b"], "hada_w1_b")
    r, s = _matrix(arrays["hada_w2_a"], "hada_w2_a"), _matrix(arrays["hada_w2_b"], "hada_w2_b")
    _product(p, q, "hada_w1")
    _product(r, s, "hada_w2")
    if (p.shape[0], q.shape[1]) != (r.shape[0], s.shape[1]):
        raise FactorError("hada_w1 and hada_w2 products differ in shape")
    mn = matrix_shape((p.shape[0], q.shape[1]))
    if mn is None:
        return "shape"
    m, n = mn
    r1, r2 = q.shape[0], s.shape[0]
    khatri_rao = (m + n) * r1 * r2 * K
    dense = m * n * (r1 + r2 + K)
    if m + n > MAX_SKETCH_SIDE or min(khatri_rao, dense) > MAX_SKETCH_WORK:
        return TOO_LARGE
    a, bt = projections(m, n)
    if khatri_rao <= dense:
        sketch = _loha_khatri_rao(a, bt, p, q, r, s)
    else:
        sketch = _loha_rows(a, bt, p, q, r, s)
    scale = _scale(group, arrays, configs, r1)
    return TensorSketch(group.key, mn, sketch * (scale / math.sqrt(m * n)))


def _loha_khatri_rao(a: npt.NDArray[np.float32], bt: npt.NDArray[np.float32],
                     p: F64, q: F64, r: F64, s: F64) -> F64:
    """A((pq) ⊙ (rs))Bᵀ = (A (p ⊛ r))((q • s) Bᵀ), a block of rows or columns at a time."""
    m, n = p.shape[0], q.shape[1]
    rr = p.shape[1] * r.shape[1]
    left: F64 = np.zeros((K, rr))
    step = max(1, _BLOCK // rr)
    for i in range(0, m, step):
        kr = (p[i : i + step, :, None] * r[i : i + step, None, :]).reshape(-1, rr)
        left += a[:, i : i + step].astype(np.float64) @ kr
    right: F64 = np.zeros((rr, K))
    for j in range(0, n, step):
        kr = (q[:, None, j : j + step] * s[None, :, j : j + step]).reshape(rr, -1)
        right += kr @ bt[j : j + step].astype(np.float64)
    out: F64 = left @ right
    return out


def _loha_rows(a: npt.NDArray[np.float32], bt: npt.NDArray[np.float32],
               p: F64, q: F64, r: F64, s: F64) -> F64:
    """A((pq) ⊙ (rs))Bᵀ from bounded blocks of rows of the delta."""
    m, n = p.shape[0], q.shape[1]
    b64 = bt.astype(np.float64)
    out: F64 = np.zeros((K, K))
    step = max(1, _BLOCK // n)
    for i in range(0, m, step):
        rows = (p[i : i + step] @ q) * (r[i : i + step] @ s)
        out += a[:, i : i + step].astype(np.float64) @ (rows @ b64)
    return out


def _lokr(
    group: LoraGroup, arrays: Mapping[str, F64], configs: Mapping[str, AdapterConfig]
) -> TensorSketch | str:
    factors: list[F64] = []
    rank = 0
    for i in ("1", "2"):
        full = arrays.get(f"lokr_w{i}")
        a, b = arrays.get(f"lokr_w{i}_a"), arrays.get(f"lokr_w{i}_b")
        if full is not None:
            factors.append(_matrix(full, f"lokr_w{i}"))
        elif a is not None and b is not None:
            a2, b2 = _matrix(a, f"lokr_w{i}_a"), _matrix(b, f"lokr_w{i}_b")
            _product(a2, b2, f"lokr_w{i}")
            if a2.shape[0] * b2.shape[1] > _BLOCK * 32:
                return TOO_LARGE
            factors.append(a2 @ b2)
            rank = b.shape[0]
        else:
            return "incomplete factors"
    w1, w2 = factors
    mn = matrix_shape((w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1]))
    if mn is None:
        return "shape"
    m, n = mn
    (i1, j1), (c, d) = w1.shape, w2.shape
    work = K * (i1 * j1 * c + j1 * c * d + K * j1 * d)
    if m + n > MAX_SKETCH_SIDE or work > MAX_SKETCH_WORK:
        return TOO_LARGE
    signs, bt = projections(m, n)
    sketch = _lokr_blocks(signs, bt, w1, w2)
    scale = _scale(group, arrays, configs, rank)
    return TensorSketch(group.key, mn, sketch * (scale / math.sqrt(m * n)))


def _lokr_blocks(a: npt.NDArray[np.float32], bt: npt.NDArray[np.float32],
                 w1: F64, w2: F64) -> F64:
    """A (w1 ⊗ w2) Bᵀ without forming the Kronecker product.

    Row i·c + p of the product is w1[i] ⊗ w2[p], so A splits into K x a x c and Bᵀ
    into b x d x K blocks: the sketch is Σ_j ((Σ_i w1[i, j] A[:, i, :]) w2) Bᵀ[j].
    """
    (i1, j1), (c, d) = w1.shape, w2.shape
    a3 = a.reshape(K, i1, c).astype(np.float64)
    b3 = bt.reshape(j1, d, K)
    out: F64 = np.zeros((K, K))
    step = max(1, _BLOCK // (K * max(c, d, i1)))
    for j in range(0, j1, step):
        cols = w1[:, j : j + step]  # a x jb
        # t[jb, K, c] = Σ_i cols[i, jb] a3[K, i, c], then u = t w2 (matrix products)
        t = np.tensordot(cols, a3, axes=([0], [1]))
        u = t @ w2  # jb x K x d
        out += np.tensordot(u, b3[j : j + step].astype(np.float64), axes=([0, 2], [0, 1]))
    return out
