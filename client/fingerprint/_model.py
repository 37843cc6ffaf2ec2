"""The values readers hand to the engine: a parsed file and its tensors.

A reader parses a file's structure with small random-access reads and returns a
:class:`ParsedFile`. Tensor bytes are not read by the reader: each
:class:`TensorRecord` says where its bytes lie (a contiguous ``span`` of the file),
or, for the rare tensor whose bytes are not one contiguous run of the file (a
strided view, a compressed zip entry), how to ``materialize`` them. The engine then
reads the file once, front to back, and feeds every hasher from that one read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from modelhash.errors import MalformedFileError

__all__ = ["DTYPE_SIZES", "ParsedFile", "TensorRecord", "materialized", "numel"]

# Canonical dtype names (safetensors spelling) and their element size in bytes.
# Quantised GGUF types are named by their GGML name and sized per block instead.
DTYPE_SIZES: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2FNUZ": 1,
    "F8_E8M0": 1,
    "C64": 8,
    "C128": 16,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
}


def numel(shape: tuple[int, ...]) -> int:
    """Number of elements of a tensor of ``shape`` (1 for a scalar)."""
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass(frozen=True)
class TensorRecord:
    """One tensor as stored: its name, dtype, shape, and where its bytes are.

    Exactly one of ``span`` and ``materialize`` is set. ``span`` is
    ``(offset, length)`` in the file; ``materialize`` yields the tensor's bytes in
    C order, in chunks, and is called only after the main pass.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    span: tuple[int, int] | None = None
    materialize: Callable[[], Iterator[bytes]] | None = None

    def __post_init__(self) -> None:
        if (self.span is None) == (self.materialize is None):
            raise ValueError("a TensorRecord needs exactly one of span and materialize")


@dataclass
class ParsedFile:
    """The structure of one weight file, parsed without reading tensor bytes.

    ``format`` names the container (``safetensors``, ``torch-zip``,
    ``torch-legacy``, ``gguf``). ``autov3_offset`` is where the AutoV3 hash starts
    (safetensors only; ``None`` means AutoV3 is not defined for the file).
    ``metadata`` holds string metadata the container carries (never trusted for
    identity). ``notes`` records what the reader skipped, e.g. non-tensor entries.
    """

    path: Path
    format: str
    size: int
    tensors: list[TensorRecord]
    metadata: dict[str, str] = field(default_factory=dict)
    autov3_offset: int | None = None
    notes: list[str] = field(default_factory=list)


def materialized(path: Path, t: TensorRecord) -> Iterator[bytes]:
    """The bytes of a tensor that has no span in its file (read through its
    ``materialize``), checked to come to its size: MalformedFileError if not."""
    assert t.materialize is not None
    n = 0
    for piece in t.materialize():
        n += len(piece)
        yield piece
    if n != t.nbytes:
        raise MalformedFileError(path, f"tensor {t.name!r}: got {n} bytes, expected {t.nbytes}")
