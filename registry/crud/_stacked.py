"""A fast, read-only view of a stored sketch blob as one matrix, for pre-filtering.

:meth:`Sketch.from_bytes` builds one object per tensor, about 5 ms for 200 tensors;
the registry pre-filters many candidates per check and needs only each tensor's key,
shape and values. This reads the same format (see :mod:`modelhash.fingerprint._sketch`)
into a ``(tensors, K*K)`` float32 matrix with one gather. Anything unexpected raises
ValueError, like the full parser.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from modelhash.fingerprint._project import K
from modelhash.fingerprint._similarity import scored
from modelhash.fingerprint._sketch import KINDS, VERSION_INVARIANT, Sketch, blob_body, value_dtype

__all__ = ["Stacked", "orthogonal_rows", "pooled_cosine", "stack_blob", "stack_sketch"]

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
_MAX_BODY = 64 * 1024 * 1024


@dataclass(frozen=True)
class Stacked:
    """Keys, shapes and values (one row per tensor) of one sketch."""

    rows: dict[str, int]
    shapes: list[tuple[int, int]]
    values: F32


def stack_sketch(sketch: Sketch) -> Stacked:
    """A parsed sketch as a :class:`Stacked`."""
    ts = list(sketch)
    values = (
        np.stack([t.values.reshape(-1) for t in ts]).astype(np.float32)
        if ts else np.zeros((0, K * K), dtype=np.float32)
    )
    return Stacked({t.key: i for i, t in enumerate(ts)}, [t.shape for t in ts], values)


def stack_blob(blob: bytes) -> Stacked:
    """Read a ``Sketch.to_bytes()`` blob without building per-tensor objects."""
    version, body = blob_body(blob, _MAX_BODY)
    try:
        pos = 1 + body[0]
        kind, count = struct.unpack_from("<BI", body, pos)
        pos += 5
        dtype = np.dtype(value_dtype(version, KINDS[kind]))
        width = dtype.itemsize * K * K
        rows: dict[str, int] = {}
        shapes: list[tuple[int, int]] = []
        offsets = np.empty(count, dtype=np.int64)
        scales = np.empty(count, dtype=np.float32)
        for i in range(count):
            (klen,) = struct.unpack_from("<H", body, pos)
            key = body[pos + 2 : pos + 2 + klen].decode("utf-8")
            pos += 2 + klen
            m, n, scale = struct.unpack_from("<IIf", body, pos)
            pos += 12
            rows[key] = i
            shapes.append((m, n))
            offsets[i] = pos
            scales[i] = scale
            pos += width
    except (IndexError, struct.error, UnicodeDecodeError):
        raise ValueError("truncated sketch") from None
    # A version 3 blob carries the invariant layer after the tensors.
    if pos > len(body) or (pos != len(body) and version != VERSION_INVARIANT):
        raise ValueError("malformed sketch")
    raw = np.frombuffer(body, dtype=np.uint8)
    gathered = raw[offsets[:, None] + np.arange(width)].copy()
    values = gathered.view(dtype).astype(np.float32) * scales[:, None]
    return Stacked(rows, shapes, values)


def orthogonal_rows(d: F64, b: F64) -> F64:
    """Each row of ``d`` minus its projection on the same row of ``b`` (zero rows kept)."""
    bb = np.einsum("ij,ij->i", b, b)
    coef = np.divide(np.einsum("ij,ij->i", d, b), bb, out=np.zeros_like(bb), where=bb > 0)
    out: F64 = d - coef[:, None] * b
    return out


def pooled_cosine(upload: Stacked, flagged: Stacked, base: Stacked,
                  shared: Stacked | None = None) -> float:
    """The pooled cosine of two deltas over the scored tensors both cover, each made
    orthogonal to the base's tensor of the same key and shape, and without the
    ``shared`` direction over those tensors, if given (as the verifier does)."""
    fi: list[int] = []
    ui: list[int] = []
    bi: list[int] = []
    ks: list[str] = []
    for key, i in flagged.rows.items():
        j = upload.rows.get(key)
        if j is None or upload.shapes[j] != flagged.shapes[i] or not scored(key):
            continue
        fi.append(i)
        ui.append(j)
        ks.append(key)
        k = base.rows.get(key)
        bi.append(k if k is not None and base.shapes[k] == flagged.shapes[i] else -1)
    if not fi:
        return 0.0
    f = flagged.values[fi].astype(np.float64)
    u = upload.values[ui].astype(np.float64)
    has = np.array(bi) >= 0
    if has.any():
        b = np.zeros_like(f)
        b[has] = base.values[np.array(bi)[has]]
        f = orthogonal_rows(f, b)
        u = orthogonal_rows(u, b)
    if shared is not None:
        s = np.zeros_like(f)
        for row, key in enumerate(ks):
            k = shared.rows.get(key)
            if k is not None and shared.shapes[k] == flagged.shapes[fi[row]]:
                s[row] = shared.values[k]
        ss = float(np.sum(s * s))
        if ss > 0:
            f = f - (float(np.sum(f * s)) / ss) * s
            u = u - (float(np.sum(u * s)) / ss) * s
    uu, ff = float(np.sum(u * u)), float(np.sum(f * f))
    return float(np.sum(u * f)) / float(np.sqrt(uu * ff)) if uu > 0 and ff > 0 else 0.0
