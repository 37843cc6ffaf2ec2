"""The invariant layer: top singular values of sampled weight matrices.

A re-uploader can change a model's weights without changing what it computes:
permute the hidden units of a feed-forward layer, the attention heads, or the
channels of the residual stream; rotate an RMSNorm model's residual stream; move a
scale between a norm and the linear layer that reads it. Every such change
multiplies a weight matrix by a permutation, rotation or diagonal matrix on one
side or both, and moves each per-tensor sketch to cosine ~0 from the original.

The singular values do not move: s(P W Q) = s(W) for orthogonal P and Q. And to
first order, a delta D shifts them linearly, δs_i = u_iᵀ D v_i, so the vector of
shifts from a reference base is a small, permutation- and rotation-invariant linear
sketch of a fine-tune's delta, and merges combine about linearly (see
:mod:`modelhash.fingerprint._robust`). A matrix that reads a norm's output is
measured with that norm's scale folded in, ``W diag(g)`` (:data:`NORM_FOLDS`), so
moving a scale across the norm, or rotating an RMSNorm model's residual stream
(which folds g into W first), leaves the value unchanged.

A scale, or any invertible map, moved between two matrices that a layer multiplies
with nothing non-linear between them (a head's queries and keys, its values and
output, a gated feed-forward layer's up and down projections) does move each one's
singular values, but not their product's: version 2 also measures those products
(:data:`PRODUCTS`), beside the matrices alone. A factor's own spectrum is *exposed*
(:func:`exposed`) and is trusted only where it moved with the rest (see
:mod:`modelhash.fingerprint._robust`).

The top :data:`TOP` values are computed exactly, from the eigenvalues of the
smaller Gram matrix (W Wᵀ or Wᵀ W) in float64: a fine-tune's shifts are 1e-4 to
1e-2 of the values, and a randomised SVD errs about 100 times more than that.

Not every matrix is measured: the cost is ``m n min(m, n)`` multiply-adds (a
product's, forming it first, ``m k n`` more). The units of a file (matrices and
products, :func:`units`) are taken cheapest first (ties by a hash of the canonical key)
while the total stays within ``MACS_PER_ELEMENT`` per weight element plus
``MACS_BASE``, so every model of one architecture, whatever its dtype, measures
the same matrices. The layer is stored beside the sketch (a version 3 sketch
blob, see :mod:`modelhash.fingerprint._sketch`), under its own algorithm name.
"""

from __future__ import annotations

import functools
import math
import re
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import blake3
import numpy as np
import numpy.typing as npt

__all__ = [
    "INVARIANT_ALGORITHM",
    "NORM_FOLDS",
    "PRODUCTS",
    "TOP",
    "Candidate",
    "Factor",
    "ProductRule",
    "Spectra",
    "Spectrum",
    "Unit",
    "comparable",
    "exposed",
    "measure",
    "norm_key",
    "select",
    "spectrum",
    "units",
]

TOP = 32
_FAMILY = f"invariant-svals-k{TOP}"
INVARIANT_ALGORITHM = f"{_FAMILY}-v2"
"""v2 measures :data:`PRODUCTS` in place of their factors; v1 measured every matrix
alone. The two compare on the spectra they share (:func:`comparable`)."""
MACS_PER_ELEMENT = 4
MACS_BASE = 2e9
MAX_ELEMENTS = 1 << 23
"""Largest matrix measured (elements); its bytes are kept while the file passes."""
MAX_KEPT_BYTES = 256 * 1024 * 1024
"""Stored bytes of measured matrices kept per file at most."""
MAX_SPECTRA = 65_536
_HASH_DOMAIN = b"modelhash/invariant/order/v1\x00"
_ROW_BLOCK = 1 << 12

F64 = npt.NDArray[np.float64]

NORM_FOLDS: list[tuple[re.Pattern[str], str]] = [
    # Llama, Mistral, Qwen (RMSNorm before attention and before the gated MLP).
    (re.compile(r"(.*layers_\d+_)self_attn_[qkv]_proj(_rotary)?"), r"\1input_layernorm"),
    (re.compile(r"(.*layers_\d+_)mlp_(gate|up)_proj"), r"\1post_attention_layernorm"),
    (re.compile(r"lm_head"), "norm"),
    # CLIP text encoders (pre-LN).
    (re.compile(r"(.*encoder_layers_\d+_)self_attn_[qkv]_proj"), r"\1layer_norm1"),
    (re.compile(r"(.*encoder_layers_\d+_)mlp_fc1"), r"\1layer_norm2"),
    # diffusers BasicTransformerBlock (SD 1.x/2.x/XL UNets, PixArt): norm1 -> self
    # attention, norm2 -> the query of cross attention, norm3 -> feed-forward.
    (re.compile(r"(.*transformer_blocks_\d+_)attn1_to_[qkv]"), r"\1norm1"),
    (re.compile(r"(.*transformer_blocks_\d+_)attn2_to_q"), r"\1norm2"),
    (re.compile(r"(.*transformer_blocks_\d+_)ff_net_0_proj"), r"\1norm3"),
]
"""Canonical paths of matrices that read a learnt norm's output, and that norm's path."""


_NORM_PATH = re.compile(
    r"(.*_)?(input_layernorm|post_attention_layernorm|layer_norm[12]|norm[123]?)"
)


def is_norm(key: str) -> bool:
    """Whether ``key`` names a norm that :data:`NORM_FOLDS` may fold into a matrix."""
    return _NORM_PATH.fullmatch(key.partition(":")[2]) is not None


def norm_key(key: str) -> str | None:
    """The canonical key of the norm whose scale ``key``'s input is multiplied by."""
    component, _, path = key.partition(":")
    for pattern, norm in NORM_FOLDS:
        if m := pattern.fullmatch(path):
            return f"{component}:{m.expand(norm)}"
    return None


def cost(m: int, n: int) -> float:
    """Multiply-adds to measure an m x n matrix (its Gram matrix, then eigenvalues)."""
    p = min(m, n)
    return float(m) * n * p + float(p) ** 3


def _order(key: str) -> int:
    return int.from_bytes(blake3.blake3(_HASH_DOMAIN + key.encode("utf-8")).digest(8), "little")


@dataclass(frozen=True)
class Candidate:
    """A canonical matrix that could be measured, with its shape."""

    key: str
    rows: int
    cols: int


@dataclass(frozen=True)
class Factor:
    """A measured matrix as a unit uses it: rows ``part[0]`` of ``part[1]`` equal
    parts of canonical matrix ``key`` (its norm folded in), transposed or not."""

    key: str
    transposed: bool = False
    part: tuple[int, int] = (0, 1)


@dataclass(frozen=True)
class Unit:
    """One measured spectrum: of ``a`` itself, or of the product ``aᵀ b`` of two
    matrices that a head or a feed-forward layer multiplies together."""

    key: str
    a: Factor
    b: Factor | None
    shape: tuple[int, int]
    """The measured matrix's shape (for a product, a's columns by b's)."""
    cost: float


@dataclass(frozen=True)
class ProductRule:
    """Two matrices whose product a model computes with nothing non-linear between
    them, so that the product, unlike either factor, does not move when a scale or
    any invertible map is moved from one to the other (see the module docstring).

    The first factor, A, is ``prefix + a`` and the second, B, the same prefix (its
    one group) followed by ``b``. The product is ``Aᵀ B`` with A transposed first
    when ``a_transposed`` (the output matrix of a head or a feed-forward layer,
    stored as out x inner); B's rows are part ``b_part`` of its equal parts, and the
    rest (``rest``), when given, is measured alone.
    """

    prefix: str
    a: str
    b: str
    a_transposed: bool = False
    b_part: tuple[int, int] = (0, 1)
    rest: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "_a", re.compile(self.prefix + self.a))
        object.__setattr__(self, "_factor", re.compile(f"{self.prefix}(?:{self.a}|{self.b})"))

    def match_a(self, path: str) -> re.Match[str] | None:
        """A's match (group 1: the prefix), or None."""
        m: re.Match[str] | None = self._a.fullmatch(path)  # type: ignore[attr-defined]
        return m

    def is_factor(self, path: str) -> bool:
        """Whether ``path`` is A or B of this rule (whether or not a product formed)."""
        return self._factor.fullmatch(path) is not None  # type: ignore[attr-defined]


PRODUCTS: list[ProductRule] = [
    # Queries and keys of an attention layer: each head's logits are x Q_hᵀ K_h y, and
    # Qᵀ K = Σ_h Q_hᵀ K_h is what survives any invertible map between Q_h and K_h
    # (q/k scaling among them) and any permutation of the heads.
    ProductRule(r"(.*self_attn_)", "q_proj", "k_proj"),
    ProductRule(r"(.*attn\d?_)", "to_q", "to_k"),
    ProductRule(r"(.*attn_)", "add_q_proj", "add_k_proj"),
    ProductRule(r"(.*attention_self_)", "query", "key"),  # BERT
    # Values and outputs: O V = Σ_h O_h V_h.
    ProductRule(r"(.*self_attn_)", "(?:o_proj|out_proj)", "v_proj", True),
    ProductRule(r"(.*attn\d?_)", "to_out_0", "to_v", True),
    ProductRule(r"(.*attn_)", "to_add_out", "add_v_proj", True),
    ProductRule(r"(.*attention_)", "output_dense", "self_value", True),
    # Gated feed-forward layers: down (silu(gate x) * up x) is linear in the up
    # projection's units, so any per-unit scale moves between up and down.
    ProductRule(r"(.*mlp_)", "down_proj", "up_proj", True),
    # GEGLU (diffusers' ff.net.0.proj holds the linear half, then the gate): only
    # when its rows are twice the output's columns (a GELU layer has no linear half).
    ProductRule(r"(.*ff(?:_context)?_)", "net_2", "net_0_proj", True, (0, 2), (1, 2)),
]
"""The products measured beside their factors (see :class:`ProductRule`)."""


def _part_rows(rows: int, part: tuple[int, int]) -> int | None:
    _i, n = part
    return rows // n if rows % n == 0 else None


def units(candidates: Iterable[Candidate]) -> list[Unit]:
    """What is measured of ``candidates``: each :data:`PRODUCTS` pair whose inner
    dimensions agree as one product, and every matrix alone. A pair whose shapes do
    not fit (grouped-query attention's keys and values have fewer rows than its
    queries) gives no product."""
    by_key = {c.key: c for c in candidates}
    out: list[Unit] = []
    used: set[str] = set()
    for c in by_key.values():
        component, _, path = c.key.partition(":")
        for rule in PRODUCTS:
            m = rule.match_a(path)
            if m is None:
                continue
            b_path = m.group(1) + rule.b
            bk = f"{component}:{b_path}"
            b = by_key.get(bk)
            if b is None or bk in used or c.key in used:
                break
            inner, outer = (c.cols, c.rows) if rule.a_transposed else (c.rows, c.cols)
            b_rows = _part_rows(b.rows, rule.b_part)
            if b_rows != inner:
                break
            fa = Factor(c.key, rule.a_transposed)
            fb = Factor(bk, False, rule.b_part)
            name = f"{c.key}*{b_path}" + _suffix(rule.b_part)
            out.append(Unit(name, fa, fb, (outer, b.cols),
                            float(outer) * inner * b.cols + cost(outer, b.cols)))
            if rule.rest is not None and (r := _part_rows(b.rows, rule.rest)) is not None:
                out.append(Unit(bk + _suffix(rule.rest), Factor(bk, False, rule.rest), None,
                                (r, b.cols), cost(r, b.cols)))
            used |= {c.key, bk}
            break
    # Every matrix is also measured alone: a factor's spectrum is exposed to what moves
    # between it and its partner (see exposed()), yet when it did not move it adds to
    # what a fine-tune's shift is measured on.
    for c in by_key.values():
        out.append(Unit(c.key, Factor(c.key), None, (c.rows, c.cols), cost(c.rows, c.cols)))
    return out


def exposed(keys: Iterable[str]) -> set[str]:
    """The keys among ``keys`` that name a factor of a :data:`PRODUCTS` rule, whether
    or not its product was formed: their spectra move when a scale or map is moved
    between the factors (a product's do not)."""
    return {k for k in keys if _is_factor(k)}


@functools.lru_cache(maxsize=1 << 16)
def _is_factor(key: str) -> bool:
    # Cached: every comparison asks this of the same few hundred keys.
    path = key.partition(":")[2]
    return "*" not in path and any(rule.is_factor(path) for rule in PRODUCTS)


def _suffix(part: tuple[int, int]) -> str:
    return "" if part == (0, 1) else f"[{part[0]}/{part[1]}]"


def select(candidates: Iterable[Candidate], elements: int) -> list[Unit]:
    """The units measured for a file of ``elements`` weight elements (see the module
    docstring): cheapest first, ties by key hash, within the budget."""
    candidates = list(candidates)
    budget = MACS_PER_ELEMENT * float(elements) + MACS_BASE
    sizes = {c.key: c.rows * c.cols for c in candidates}
    ranked = sorted(
        (u for u in units(candidates)
         if u.shape[0] * u.shape[1] <= MAX_ELEMENTS
         and all(sizes[f.key] <= MAX_ELEMENTS for f in (u.a, u.b) if f is not None)),
        key=lambda u: (u.cost, _order(u.key)),
    )
    out: list[Unit] = []
    spent = 0.0
    for u in ranked:
        spent += u.cost
        if spent > budget or len(out) >= MAX_SPECTRA:
            break
        out.append(u)
    return out


def spectrum(w: npt.NDArray[np.floating], gamma: npt.NDArray[np.floating] | None = None) -> F64:
    """The top :data:`TOP` singular values of ``w`` (times ``diag(gamma)`` on the right),
    descending, from the smaller Gram matrix in float64."""
    m, n = w.shape
    g64 = None if gamma is None else np.asarray(gamma, dtype=np.float64).reshape(1, n)
    gram = np.zeros((min(m, n),) * 2)
    # Blocks keep the float64 copy small: W Wᵀ sums over column blocks, Wᵀ W over
    # row blocks.
    for s in range(0, n if m <= n else m, _ROW_BLOCK):
        blk = np.asarray(w[:, s : s + _ROW_BLOCK] if m <= n else w[s : s + _ROW_BLOCK],
                         dtype=np.float64)
        if g64 is not None:
            blk = blk * (g64[:, s : s + _ROW_BLOCK] if m <= n else g64)
        gram += blk @ blk.T if m <= n else blk.T @ blk
    ev = np.linalg.eigvalsh(gram)[::-1][:TOP]
    out: F64 = np.sqrt(np.clip(ev, 0.0, None))
    return out


@dataclass(frozen=True)
class Spectrum:
    """The top singular values of one canonical matrix of shape ``shape``."""

    key: str
    shape: tuple[int, int]
    values: F64


@dataclass
class Spectra:
    """The invariant layer of one model: a spectrum per measured matrix."""

    items: dict[str, Spectrum] = field(default_factory=dict)
    algorithm: str = INVARIANT_ALGORITHM

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Spectrum]:
        return iter(self.items.values())

    def products(self) -> int:
        """How many of the spectra are of products of two matrices (:data:`PRODUCTS`)."""
        return sum(1 for k in self.items if "*" in k)

    def to_section(self) -> bytes:
        """The stored form: algorithm, count, then per matrix its key, shape and
        values (float32; float16 would round away a fine-tune's shifts)."""
        out = bytearray()
        alg = self.algorithm.encode("ascii")
        out += struct.pack("<B", len(alg)) + alg
        out += struct.pack("<I", len(self.items))
        for s in sorted(self.items.values(), key=lambda s: s.key):
            key = s.key.encode("utf-8")
            if len(key) > 0xFFFF or len(s.values) > 0xFF:
                raise ValueError(f"spectrum key or length too large to store: {s.key[:80]!r}")
            out += struct.pack("<H", len(key)) + key
            out += struct.pack("<IIB", s.shape[0], s.shape[1], len(s.values))
            out += np.asarray(s.values, dtype="<f4").tobytes()
        return bytes(out)

    @classmethod
    def from_section(cls, body: memoryview) -> Spectra:
        """Parse :meth:`to_section` output exactly; ValueError on anything malformed."""
        end = len(body)
        try:
            pos = 1 + body[0]
            if pos + 4 > end:
                raise ValueError("truncated invariant section")
            alg = bytes(body[1:pos]).decode("ascii")
            (count,) = struct.unpack_from("<I", body, pos)
            pos += 4
            if count > MAX_SPECTRA:
                raise ValueError(f"invariant section: {count} spectra, more than allowed")
            heads: list[tuple[str, int, int, int]] = []
            spans: list[tuple[int, int]] = []
            for _ in range(count):
                (klen,) = struct.unpack_from("<H", body, pos)
                key = bytes(body[pos + 2 : pos + 2 + klen]).decode("utf-8")
                pos += 2 + klen
                m, n, k = struct.unpack_from("<IIB", body, pos)
                pos += 9
                if k > TOP * 8:
                    raise ValueError("invariant section: bad singular values")
                if pos + 4 * k > end:
                    raise ValueError("truncated invariant section")
                heads.append((key, m, n, k))
                spans.append((pos, pos + 4 * k))
                pos += 4 * k
        except (IndexError, struct.error):
            raise ValueError("truncated invariant section") from None
        except UnicodeDecodeError:
            raise ValueError("invariant section: key is not UTF-8") from None
        if pos != end:
            raise ValueError("trailing bytes after the invariant section")
        # Every spectrum's values at once: one conversion and one check, not one each.
        raw = b"".join(body[a:b] for a, b in spans)
        values = np.frombuffer(raw, dtype="<f4").astype(np.float64)
        if not np.all(np.isfinite(values)) or np.any(values < 0):
            raise ValueError("invariant section: bad singular values")
        items: dict[str, Spectrum] = {}
        at = 0
        for key, m, n, k in heads:
            if key in items:
                raise ValueError("invariant section: duplicate key")
            items[key] = Spectrum(key, (m, n), values[at : at + k])
            at += k
        return cls(items, algorithm=alg)


def comparable(a: str, b: str) -> bool:
    """Whether spectra stored under invariant algorithms ``a`` and ``b`` may be
    compared (matrix by matrix, on the keys both measured): versions of one family."""
    return a.rpartition("-v")[0] == b.rpartition("-v")[0] == _FAMILY


def measure(unit: Unit, matrices: Mapping[str, npt.NDArray[np.floating]],
            norms: Mapping[str, F64]) -> F64 | None:
    """The spectrum of ``unit`` from its canonical matrices (None if one is missing)."""
    if unit.b is None and unit.a.part == (0, 1):
        w = matrices.get(unit.a.key)
        return None if w is None else spectrum(w, fold(w, unit.a.key, norms))
    xs = []
    for f in (unit.a, unit.b):
        if f is None:
            continue
        w = matrices.get(f.key)
        if w is None:
            return None
        g = fold(w, f.key, norms)
        x = np.asarray(w, dtype=np.float64)
        if g is not None:
            x = x * g.reshape(1, -1)
        if f.part != (0, 1):
            r = x.shape[0] // f.part[1]
            x = x[f.part[0] * r : (f.part[0] + 1) * r]
        xs.append(x.T if f.transposed else x)
    if len(xs) == 1:
        return spectrum(xs[0])
    return spectrum(xs[0].T @ xs[1])


def fold(
    w: npt.NDArray[np.floating], key: str, norms: Mapping[str, F64]
) -> npt.NDArray[np.floating] | None:
    """The norm scale to fold into ``w``'s columns: None when ``key`` reads no learnt
    norm or the norm's length does not fit (then ``w`` is measured as it is)."""
    nk = norm_key(key)
    if nk is None:
        return None
    g = norms.get(nk)
    if g is None or g.shape != (w.shape[1],):
        return None
    return g


def relative_distance(a: F64, b: F64) -> float:
    """‖a - b‖ / ‖b‖ over their common length (infinity when b is zero)."""
    k = min(len(a), len(b))
    nb = float(np.linalg.norm(b[:k]))
    return float(np.linalg.norm(a[:k] - b[:k])) / nb if nb > 0 else math.inf
