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

The top :data:`TOP` values are computed exactly, from the eigenvalues of the
smaller Gram matrix (W Wᵀ or Wᵀ W) in float64: a fine-tune's shifts are 1e-4 to
1e-2 of the values, and a randomised SVD errs about 100 times more than that.

Not every matrix is measured: the cost is ``m n min(m, n)`` multiply-adds. The
candidates of a file are taken cheapest first (ties by a hash of the canonical key)
while the total stays within ``MACS_PER_ELEMENT`` per weight element plus
``MACS_BASE``, so every model of one architecture, whatever its dtype, measures
the same matrices. The layer is stored beside the sketch (a version 3 sketch
blob, see :mod:`modelhash.fingerprint._sketch`), under its own algorithm name.
"""

from __future__ import annotations

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
    "TOP",
    "Candidate",
    "Spectra",
    "Spectrum",
    "norm_key",
    "select",
    "spectrum",
]

TOP = 32
INVARIANT_ALGORITHM = f"invariant-svals-k{TOP}-v1"
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


def select(candidates: Iterable[Candidate], elements: int) -> set[str]:
    """The keys measured for a file of ``elements`` weight elements (see the module
    docstring): cheapest first, ties by key hash, within the budget."""
    budget = MACS_PER_ELEMENT * float(elements) + MACS_BASE
    ranked = sorted(
        (c for c in candidates if c.rows * c.cols <= MAX_ELEMENTS),
        key=lambda c: (cost(c.rows, c.cols), _order(c.key)),
    )
    out: set[str] = set()
    spent = 0.0
    for c in ranked:
        if c.key in out:
            continue
        spent += cost(c.rows, c.cols)
        if spent > budget or len(out) >= MAX_SPECTRA:
            break
        out.add(c.key)
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
        pos = 0

        def take(n: int) -> memoryview:
            nonlocal pos
            if pos + n > len(body):
                raise ValueError("truncated invariant section")
            pos += n
            return body[pos - n : pos]

        try:
            alg = bytes(take(take(1)[0])).decode("ascii")
            (count,) = struct.unpack("<I", take(4))
            if count > MAX_SPECTRA:
                raise ValueError(f"invariant section: {count} spectra, more than allowed")
            items: dict[str, Spectrum] = {}
            for _ in range(count):
                (klen,) = struct.unpack("<H", take(2))
                key = bytes(take(klen)).decode("utf-8")
                m, n, k = struct.unpack("<IIB", take(9))
                vals = np.frombuffer(take(4 * k), dtype="<f4").astype(np.float64)
                if k > TOP * 8 or not np.all(np.isfinite(vals)) or np.any(vals < 0):
                    raise ValueError("invariant section: bad singular values")
                if key in items:
                    raise ValueError("invariant section: duplicate key")
                items[key] = Spectrum(key, (m, n), vals)
        except UnicodeDecodeError:
            raise ValueError("invariant section: key is not UTF-8") from None
        if pos != len(body):
            raise ValueError("trailing bytes after the invariant section")
        return cls(items, algorithm=alg)


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
