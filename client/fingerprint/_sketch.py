"""The sketch layer's value: one small projection per weight matrix, and its bytes.

A :class:`Sketch` maps canonical module keys (see :mod:`modelhash.fingerprint._keys`)
to :class:`TensorSketch` values. ``kind`` says what the values project:

- ``model``: the weights of a checkpoint (raw sketches);
- ``lora``: the effective delta of each module an adapter touches;
- ``delta``: a model minus a reference base, keyed by the base's keys (made by
  :func:`modelhash.fingerprint._similarity.delta_sketch`).

The algorithm name carries every parameter that changes the values:
``sketch-rademacher-k16-v1``. :meth:`Sketch.to_bytes` is the stored form: a magic,
a version byte, then a zlib stream of the algorithm, the kind and, per tensor, its
key, matrix shape, a float32 scale and K x K values divided by that scale, so
precision does not depend on the weights' magnitude. The values are float16 for
``delta`` and ``lora`` sketches, whose rounding is relative to themselves, and
float32 for raw ``model`` sketches (version 2): a fine-tune's delta is 1e-4 to 1e-2
of the weights, and is computed as the difference of two raw sketches, so their
rounding must stay far below that, or the rounding of one base's sketch, common to
every delta taken from it, would make unrelated fine-tunes of it correlate.
Version 1 blobs (float16 throughout) are still read. Version 3 is version 2 followed
by the invariant layer (:class:`~modelhash.fingerprint._invariant.Spectra`, with its
own algorithm name), inside the same zlib stream; it is written only when a sketch
carries that layer, so a sketch without it is still a version 2 blob.

:meth:`Sketch.band_keys` gives locality-sensitive band keys for candidate retrieval
in SQL: sign bits of random hyperplanes through the sum of all sketches, each
hyperplane's signs seeded by the tensor's shape. Tensors of one shape share a
hyperplane, so the keys depend on neither names nor order, and models whose sketch
vectors are close share most bits, hence whole bands.
"""

from __future__ import annotations

import functools
import math
import struct
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import blake3
import numpy as np
import numpy.typing as npt

from modelhash.fingerprint._invariant import Spectra
from modelhash.fingerprint._project import K

__all__ = ["SKETCH_ALGORITHM", "Sketch", "TensorSketch", "band_keys", "blob_body", "blob_spectra"]

SKETCH_ALGORITHM = f"sketch-rademacher-k{K}-v1"
MAGIC = b"MHSK"
VERSION = 2
VERSION_INVARIANT = 3
VERSIONS = (1, 2, 3)


def value_dtype(version: int, kind: str) -> str:
    """The numpy dtype of stored values in a blob of ``version`` and ``kind``."""
    return "<f4" if version >= 2 and kind == "model" else "<f2"


KINDS = ("model", "lora", "delta")
BANDS = 16
ROWS = 16
_BAND_DOMAIN = b"modelhash/sketch/bands/v1\x00"
MAX_BLOB = 256 * 1024 * 1024

F64 = npt.NDArray[np.float64]


def blob_body(blob: bytes, limit: int = MAX_BLOB) -> tuple[int, bytes]:
    """The format version and the inflated body of a :meth:`Sketch.to_bytes` blob.

    The one reader of the blob's header, for every parser of it; ValueError for
    another format, an unsupported version, a corrupt or truncated body, or one
    that inflates past ``limit`` bytes.
    """
    if blob[:4] != MAGIC or len(blob) < 6:
        raise ValueError("not a modelhash sketch")
    version, compressed = blob[4], blob[5]
    if version not in VERSIONS:
        raise ValueError(f"sketch format version {version} is not supported")
    body = bytes(blob[6:])
    if compressed:
        d = zlib.decompressobj()
        try:
            body = d.decompress(body, limit)
        except zlib.error as exc:
            raise ValueError(f"corrupt sketch: {exc}") from None
        if d.unconsumed_tail:
            raise ValueError("sketch larger than the limit")
        if not d.eof:
            raise ValueError("truncated sketch")
    return version, body


def blob_spectra(blob: bytes) -> Spectra | None:
    """The invariant layer of a stored sketch blob, None if it has none (before version
    3), without building the per-tensor sketches; ValueError if malformed."""
    version, body = blob_body(blob)
    if version != VERSION_INVARIANT:
        return None
    try:
        pos = 1 + body[0]
        kind, count = struct.unpack_from("<BI", body, pos)
        pos += 5
        width = np.dtype(value_dtype(version, KINDS[kind])).itemsize * K * K
        for _ in range(count):
            (klen,) = struct.unpack_from("<H", body, pos)
            pos += 2 + klen + 12 + width
    except (IndexError, struct.error):
        raise ValueError("truncated sketch") from None
    if pos > len(body):
        raise ValueError("truncated sketch")
    return Spectra.from_section(memoryview(body)[pos:])


@dataclass(frozen=True)
class TensorSketch:
    """The K x K sketch of one weight matrix of shape ``shape`` under ``key``."""

    key: str
    shape: tuple[int, int]
    values: F64

    @property
    def dof(self) -> int:
        """Degrees of freedom: how many independent values the sketch can hold."""
        return min(K, self.shape[0]) * min(K, self.shape[1])


@dataclass
class Sketch:
    """The sketch layer of one model or adapter: per-module sketches and notes."""

    kind: str
    tensors: dict[str, TensorSketch]
    algorithm: str = SKETCH_ALGORITHM
    notes: list[str] = field(default_factory=list)
    invariant: Spectra | None = None
    """The invariant layer measured in the same read (None if it was not)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown sketch kind {self.kind!r}")

    def __len__(self) -> int:
        return len(self.tensors)

    def __iter__(self) -> Iterator[TensorSketch]:
        return iter(self.tensors.values())

    def to_bytes(self, *, compress: bool = True, precision: str | None = None) -> bytes:
        """The stored form (see the module docstring).

        ``precision`` (``f16`` or ``f32``) overrides the kind's value precision, for
        measuring what storage costs; ``f16`` writes a version 1 blob (without the
        invariant layer).
        """
        version = {None: VERSION, "f32": VERSION, "f16": 1}[precision]
        if version == VERSION and self.invariant is not None:
            version = VERSION_INVARIANT
        dtype = value_dtype(version, self.kind)
        if precision == "f32" and dtype != "<f4":
            raise ValueError(f"{self.kind} sketches are stored at float16")
        body = bytearray()
        alg = self.algorithm.encode("ascii")
        body += struct.pack("<B", len(alg)) + alg
        body += struct.pack("<BI", KINDS.index(self.kind), len(self.tensors))
        for t in sorted(self.tensors.values(), key=lambda t: t.key):
            key = t.key.encode("utf-8")
            if len(key) > 0xFFFF or not all(0 <= d <= 0xFFFFFFFF for d in t.shape):
                # Readers bound names and sketched shapes far below this; a Sketch
                # built by hand is told plainly rather than with a struct.error.
                raise ValueError(f"sketch key or shape too large to store: {t.key[:80]!r}")
            peak = float(np.max(np.abs(t.values))) if t.values.size else 0.0
            scale = np.float32(peak if peak > 0 and math.isfinite(peak) else 1.0)
            body += struct.pack("<H", len(key)) + key
            body += struct.pack("<IIf", t.shape[0], t.shape[1], scale)
            body += (t.values / float(scale)).astype(dtype).tobytes()
        if version == VERSION_INVARIANT:
            assert self.invariant is not None
            body += self.invariant.to_section()
        payload = zlib.compress(bytes(body), 6) if compress else bytes(body)
        return MAGIC + struct.pack("<BB", version, int(compress)) + payload

    @classmethod
    def from_bytes(cls, blob: bytes) -> Sketch:
        """Parse :meth:`to_bytes` output; raise ValueError on anything malformed."""
        version, body = blob_body(blob)
        return cls._parse(memoryview(body), version)

    @classmethod
    def _parse(cls, body: memoryview, version: int) -> Sketch:
        pos = 0

        def take(n: int) -> memoryview:
            nonlocal pos
            if pos + n > len(body):
                raise ValueError("truncated sketch")
            pos += n
            return body[pos - n : pos]

        alg = bytes(take(take(1)[0])).decode("ascii")
        kind_i, count = struct.unpack("<BI", take(5))
        if kind_i >= len(KINDS):
            raise ValueError("unknown sketch kind")
        tensors: dict[str, TensorSketch] = {}
        dtype = np.dtype(value_dtype(version, KINDS[kind_i]))
        for _ in range(count):
            (klen,) = struct.unpack("<H", take(2))
            key = bytes(take(klen)).decode("utf-8")
            m, n, scale = struct.unpack("<IIf", take(12))
            vals = np.frombuffer(take(dtype.itemsize * K * K), dtype=dtype).astype(np.float64)
            tensors[key] = TensorSketch(key, (m, n), vals.reshape(K, K) * scale)
        invariant = None
        if version == VERSION_INVARIANT:
            invariant = Spectra.from_section(body[pos:])
        elif pos != len(body):
            raise ValueError("trailing bytes after the sketch")
        return cls(KINDS[kind_i], tensors, algorithm=alg, invariant=invariant)

    def band_keys(self) -> list[int]:
        """LSH band keys of this sketch (see :func:`band_keys`)."""
        return band_keys((t.shape, t.values) for t in self)


@functools.lru_cache(maxsize=64)  # 512 KiB each
def _hyperplanes(shape: tuple[int, int]) -> npt.NDArray[np.float64]:
    seed = _BAND_DOMAIN + struct.pack("<QQQ", K, *shape)
    nbits = BANDS * ROWS * K * K
    raw = blake3.blake3(seed).digest(length=nbits // 8)
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")
    out: npt.NDArray[np.float64] = (1.0 - 2.0 * bits.astype(np.float64)).reshape(
        BANDS * ROWS, K * K
    )
    return out


def band_keys(items: Iterable[tuple[tuple[int, int], F64]]) -> list[int]:
    """``BANDS`` integers, each a band number and ``ROWS`` sign bits (SimHash).

    Two sketches whose summed vectors are at angle θ agree on each bit with
    probability 1 - θ/π, so on a whole band with (1 - θ/π)^ROWS: near-duplicates
    (θ of a few degrees) share most bands, unrelated models almost never one.
    """
    by_shape: dict[tuple[int, int], F64] = {}
    for shape, values in items:
        v = values.reshape(-1)
        by_shape[shape] = by_shape[shape] + v if shape in by_shape else v.copy()
    proj = np.zeros(BANDS * ROWS)
    for shape, v in by_shape.items():
        proj += _hyperplanes(shape) @ v
    bits = (proj > 0).reshape(BANDS, ROWS)
    weights = 1 << np.arange(ROWS, dtype=np.int64)
    return [(b << ROWS) | int(bits[b] @ weights) for b in range(BANDS)]


def sketch_from_arrays(
    kind: str, tensors: Mapping[str, tuple[tuple[int, int], F64]]
) -> Sketch:
    """A Sketch from ``key -> (shape, values)``, for tests and the registry."""
    return Sketch(kind, {k: TensorSketch(k, s, v) for k, (s, v) in tensors.items()})

