"""Scaled low-precision weights: the scale tensors that turn stored codes into weights.

An fp8 checkpoint often stores each weight as fp8 codes *plus* a scale kept in a
tensor of its own; the real weight is codes x scale. Sketching the codes alone is
off by the scale (two orders of magnitude for ComfyUI's fp8_scaled files), so a
re-upload in such a file would look unrelated. :data:`CONVENTIONS` names the scale
tensor each convention keeps beside a weight; :func:`scale_for` reads it into a
:class:`Scale` that the sketch layer applies row by row as the codes stream by:

- per tensor (one value) or per output row (``[rows]`` or ``[rows, 1]``);
- per block (``[ceil(rows/b), ceil(cols/b)]``, DeepSeek-V3-style ``weight_scale_inv``).

Scales are metadata-sized tensors, read with one small random-access read each
before the pass. Any other shape, a non-finite value, or a weight that is not a
low-precision dtype leaves the weight unscaled, never mis-scaled.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from modelhash.fingerprint._dequant import DECODERS
from modelhash.fingerprint._model import TensorRecord, numel

__all__ = [
    "CONVENTIONS",
    "SCALED_DTYPES",
    "Scale",
    "scale_for",
    "scale_names",
    "scales_follow_weights",
]

F32 = npt.NDArray[np.float32]

SCALED_DTYPES = frozenset({"F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ"})
"""Weight dtypes whose stored codes may carry a separate scale."""

MAX_SCALE_ELEMENTS = 1 << 22
MAX_SCALES_PER_FILE = 1 << 24
"""Scale elements held for one file's pass (64 MiB as float32), whatever its header claims."""
BLOCK_SIZES = (128, 64, 256, 32, 16)


@dataclass(frozen=True)
class Convention:
    """A weight suffix, the suffix of its scale tensor, and where the convention is from."""

    weight: str
    scale: str
    source: str


CONVENTIONS: list[Convention] = [
    Convention(".weight", ".scale_weight",
               "ComfyUI comfy/ops.py scaled_fp8_ops (fp8_scaled checkpoints, 'scaled_fp8' marker)"),
    Convention(".weight", ".weight_scale",
               "compressed-tensors / llm-compressor float-quantized; transformers fbgemm_fp8"),
    Convention(".weight", ".weight_scale_inv",
               "DeepSeek-V3 / Qwen3-FP8 block-wise fp8 (transformers finegrained_fp8)"),
]
"""Scale tensors kept beside a weight; first match wins."""


@dataclass(frozen=True)
class Scale:
    """A decoded scale: ``values`` of shape (1, 1), (rows, 1) or (row blocks, col blocks)."""

    values: F32
    block: tuple[int, int]

    def rows(self, first: int, count: int, cols: int) -> F32:
        """The factor for stored rows ``first:first+count``, broadcastable to (count, cols)."""
        v = self.values
        if v.shape == (1, 1):
            return v
        br, bc = self.block
        idx = (first + np.arange(count)) // br
        out = v[idx]
        if bc > 1:
            out = np.repeat(out, bc, axis=1)[:, :cols]
        return out


def scale_names(names: Mapping[str, TensorRecord]) -> dict[str, str]:
    """Weight name -> scale tensor name, for low-precision weights that have one."""
    out: dict[str, str] = {}
    for name, t in names.items():
        if t.dtype not in SCALED_DTYPES:
            continue
        for c in CONVENTIONS:
            if name.endswith(c.weight):
                scale = name[: -len(c.weight)] + c.scale
                if scale in names:
                    out[name] = scale
                    break
    return out


def scales_follow_weights(tensors: Sequence[TensorRecord]) -> bool:
    """Whether a weight's scale is stored after the weight's bytes begin.

    A stream cannot go back for such a scale, so an upload like this is spooled and
    read as a file: its sketch is then the one of the same bytes on disk.
    """
    by_name = {t.name: t for t in tensors}
    for weight, scale in scale_names(by_name).items():
        w, s = by_name[weight].span, by_name[scale].span
        if w is not None and s is not None and s[0] + s[1] > w[0]:
            return True
    return False


def scale_for(
    t: TensorRecord, path: Path, rows: int, cols: int,
    read: Callable[[Path, TensorRecord], Iterator[bytes]],
) -> Scale | None:
    """The scale in tensor ``t`` for a weight viewed as ``rows x cols``, or None."""
    n = numel(t.shape)
    dec = DECODERS.get(t.dtype)
    if dec is None or dec.block != 1 or n == 0 or n > MAX_SCALE_ELEMENTS:
        return None
    raw = b"".join(read(path, t))
    if len(raw) != t.nbytes:
        return None
    with np.errstate(all="ignore"):
        values = dec.fn(np.frombuffer(raw, dtype=np.uint8)).astype(np.float32)
    if not np.all(np.isfinite(values)):
        return None
    dims = [d for d in t.shape if d != 1]
    if n == 1:
        return Scale(values.reshape(1, 1), (rows, cols))
    if len(dims) == 1 and dims[0] == rows:
        return Scale(values.reshape(rows, 1), (1, 1))
    if len(t.shape) == 2:
        sr, sc = t.shape
        for b in BLOCK_SIZES:
            if math.ceil(rows / b) == sr and math.ceil(cols / b) == sc:
                return Scale(values.reshape(sr, sc), (b, b))
    return None
