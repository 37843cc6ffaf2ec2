"""safetensors: an 8-byte little-endian header length, a JSON header, then data.

The header is parsed here rather than by the ``safetensors`` package because the
engine needs each tensor's byte offsets to hash it during the single pass, and the
package does not expose them. The checks mirror the package's own: a bounded
header, no duplicate keys, offsets that tile the data section exactly.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

from modelhash.errors import MalformedFileError, ResourceLimitError
from modelhash.fingerprint._limits import (
    MAX_DIMS,
    MAX_HEADER_BYTES,
    check_name,
    check_shape,
    check_tensor_count,
    load_json,
)
from modelhash.fingerprint._model import DTYPE_SIZES, ParsedFile, TensorRecord, numel

__all__ = ["MAX_HEADER", "SafetensorsReader"]

# The safetensors package refuses headers above 100 MB; so do we.
MAX_HEADER = MAX_HEADER_BYTES
# A header is an object of tensor entries (objects of a string and two lists).
MAX_HEADER_DEPTH = 3
# AutoV3 hashes after the header only when the header is shorter than 16 MiB.
AUTOV3_HEADER_LIMIT = 16 * 1024 * 1024


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r} in header")
        out[key] = value
    return out


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class SafetensorsReader:
    """Reader for ``.safetensors`` files."""

    name = "safetensors"

    def sniff(self, head: bytes, path: Path) -> bool:
        """A plausible header length followed by ``{``."""
        if len(head) < 9:
            return path.suffix in (".safetensors", ".sft")
        (n,) = struct.unpack("<Q", head[:8])
        return (n >= 2 and head[8:9] == b"{") or path.suffix in (".safetensors", ".sft")

    def parse(self, path: Path, size: int, fh: BinaryIO) -> ParsedFile:
        """Parse and validate the header; tensors become spans into the data section."""
        if size < 8:
            raise MalformedFileError(path, f"truncated safetensors file ({size} bytes)")
        first = fh.read(8)
        if len(first) != 8:
            raise MalformedFileError(path, "file shorter than its reported size")
        (n,) = struct.unpack("<Q", first)
        if n > MAX_HEADER:
            raise ResourceLimitError(
                path, f"safetensors header of {n} bytes exceeds the {MAX_HEADER}-byte limit"
            )
        if 8 + n > size:
            raise MalformedFileError(
                path, f"safetensors header length {n} runs past the end of the file ({size} bytes)"
            )
        raw = fh.read(n)
        if len(raw) != n:
            raise MalformedFileError(path, "file shrank while reading the header")
        header = load_json(
            path,
            raw,
            "safetensors header",
            max_depth=MAX_HEADER_DEPTH,
            object_pairs_hook=_reject_duplicates,
        )
        del raw
        if not isinstance(header, dict):
            raise MalformedFileError(path, "safetensors header is not a JSON object")
        data_start = 8 + n
        data_len = size - data_start
        metadata = self._metadata(path, header.pop("__metadata__", None))
        check_tensor_count(path, len(header))
        tensors = [self._tensor(path, name, entry, data_start) for name, entry in header.items()]
        self._check_tiling(path, tensors, data_start, data_len)
        return ParsedFile(
            path=path,
            format="safetensors",
            size=size,
            tensors=tensors,
            metadata=metadata,
            autov3_offset=data_start if n < AUTOV3_HEADER_LIMIT else 8,
        )

    @staticmethod
    def _metadata(path: Path, meta: object) -> dict[str, str]:
        if meta is None:
            return {}
        if not isinstance(meta, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
        ):
            raise MalformedFileError(path, "__metadata__ must map strings to strings")
        return dict(meta)

    @staticmethod
    def _tensor(path: Path, name: str, entry: object, data_start: int) -> TensorRecord:
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise MalformedFileError(
                path, f"tensor {name!r}: entry needs exactly dtype, shape and data_offsets"
            )
        check_name(path, name)
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise MalformedFileError(path, f"tensor {name!r}: unknown dtype {dtype!r}")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_DIMS
            or not all(_is_int(d) and d >= 0 for d in shape)
        ):
            raise MalformedFileError(path, f"tensor {name!r}: bad shape {shape!r}"[:200])
        check_shape(path, name, tuple(shape))
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(o) and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise MalformedFileError(path, f"tensor {name!r}: bad data_offsets {offsets!r}"[:200])
        begin, end = offsets
        expected = numel(tuple(shape)) * DTYPE_SIZES[dtype]
        if end - begin != expected:
            raise MalformedFileError(
                path,
                f"tensor {name!r}: shape {shape} of {dtype} needs {expected} bytes, "
                f"data_offsets give {end - begin}",
            )
        return TensorRecord(
            name=name,
            dtype=dtype,
            shape=tuple(shape),
            nbytes=expected,
            span=(data_start + begin, end - begin),
        )

    @staticmethod
    def _check_tiling(
        path: Path, tensors: list[TensorRecord], data_start: int, data_len: int
    ) -> None:
        """Offsets must cover the data section exactly, without gaps or overlaps."""
        pos = 0
        for t in sorted(tensors, key=lambda t: (t.span or (0, 0))[0]):
            assert t.span is not None
            begin = t.span[0] - data_start
            if begin != pos:
                what = "overlaps the previous tensor" if begin < pos else "leaves a gap"
                raise MalformedFileError(path, f"tensor {t.name!r}: data_offsets {what}")
            pos = begin + t.span[1]
        if pos > data_len:
            raise MalformedFileError(
                path, f"truncated: tensors need {pos} data bytes, file has {data_len}"
            )
        if pos < data_len:
            raise MalformedFileError(
                path, f"{data_len - pos} trailing bytes after the last tensor"
            )
