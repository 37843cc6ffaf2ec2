"""GGUF: llama.cpp's single-file container for (often quantised) weights.

Layout of versions 2 and 3, all integers little-endian::

    "GGUF" | u32 version | u64 tensor_count | u64 kv_count
    kv_count x     (string key, u32 value_type, value)
    tensor_count x (string name, u32 n_dims, u64 ne[n_dims], u32 ggml_type, u64 offset)
    padding up to general.alignment (default 32)
    data section; each tensor starts at data_start + offset

A string is a u64 byte length and UTF-8 bytes; an array value is a u32 item type, a
u64 count and the items. The file is parsed here rather than with the ``gguf``
package, which would pull its dependencies into every platform's install and trusts
its input. Every count and length is checked against the bytes actually left in the
file before anything is read or allocated, and values we do not keep (vocabularies,
merges, chat templates) are skipped, not loaded.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import BinaryIO

from modelhash.errors import MalformedFileError, ResourceLimitError, UnsupportedFormatError
from modelhash.fingerprint._limits import MAX_NAME_BYTES, MAX_TENSORS_PER_FILE, too_large
from modelhash.fingerprint._model import ParsedFile, TensorRecord, numel

__all__ = ["GGML_TYPES", "GgufReader"]

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

MAX_TENSORS = MAX_TENSORS_PER_FILE
MAX_DIMS = 8
MAX_NAME = 1024 * 1024
MAX_ARRAY_DEPTH = 8
# Strings and nested arrays visited while skipping KV values (each a Python step);
# real vocabularies and merge lists stay well under a million.
MAX_ITEMS = 4_000_000
MAX_METADATA_ENTRIES = 256
MAX_METADATA_VALUE = 4096
CHUNK = 1024 * 1024

# GGML type id -> (name, elements per block, bytes per block), as in ggml's
# type_traits table. Ids 31-33 were removed from ggml but appear in published files.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    31: ("Q4_0_4_4", 32, 18),
    32: ("Q4_0_4_8", 32, 18),
    33: ("Q4_0_8_8", 32, 18),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
    42: ("Q2_0", 64, 18),
}

_UINT16 = 2
_UINT32 = 4
_STRING = 8
_ARRAY = 9
# GGUF value type id -> (name, size in bytes; 0 for the variable-sized ones).
_VALUE_TYPES: dict[int, tuple[str, int]] = {
    0: ("uint8", 1),
    1: ("int8", 1),
    2: ("uint16", 2),
    3: ("int16", 2),
    4: ("uint32", 4),
    5: ("int32", 4),
    6: ("float32", 4),
    7: ("bool", 1),
    _STRING: ("string", 0),
    _ARRAY: ("array", 0),
    10: ("uint64", 8),
    11: ("int64", 8),
    12: ("float64", 8),
}
# Integer value types, and the integer metadata kept for the layout layer: the head
# counts with which llama.cpp's converter permuted q and k (``llama.attention.head_count``,
# ``llama.attention.head_count_kv``), needed to put their rows back.
_INTEGERS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 10: "<Q", 11: "<q"}
_LAYOUT_HINT = re.compile(r"[a-z0-9_\-]{1,64}\.attention\.head_count(_kv)?")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
# The smallest possible KV entry (empty key, u8 value) and tensor info (empty name,
# no dims), used to bound the counts by the bytes left in the file.
_MIN_KV = 8 + 4 + 1
_MIN_TENSOR_INFO = 8 + 4 + 4 + 8
_MIN_VARIABLE = {_STRING: 8, _ARRAY: 4 + 8}


class _Cursor:
    """Sequential reads over the file through a bounded buffer, never past ``size``.

    Every read is checked against the file size first, so a length field can
    never make us allocate or seek beyond what the file holds.
    """

    def __init__(self, path: Path, fh: BinaryIO, size: int) -> None:
        self.path = path
        self.size = size
        self._fh = fh
        self._buf = b""
        self._buf_start = 0
        self.pos = 0

    def remaining(self) -> int:
        return self.size - self.pos

    def _need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise MalformedFileError(
                self.path,
                f"truncated: {what} needs {n} bytes at offset {self.pos}, "
                f"file has {self.size - self.pos} left",
            )

    def take(self, n: int, what: str) -> bytes:
        self._need(n, what)
        rel = self.pos - self._buf_start
        if rel + n > len(self._buf):
            self._fill(n)
            rel = 0
        self.pos += n
        return self._buf[rel : rel + n]

    def skip(self, n: int, what: str) -> None:
        self._need(n, what)
        self.pos += n

    def _fill(self, n: int) -> None:
        want = min(max(n, CHUNK), self.size - self.pos)
        try:
            self._fh.seek(self.pos)
            data = self._fh.read(want)
        except OSError as exc:
            raise MalformedFileError(self.path, f"cannot read: {exc.strerror or exc}") from None
        if len(data) < n:
            raise MalformedFileError(self.path, "file shrank while reading the GGUF header")
        self._buf = data
        self._buf_start = self.pos

    def u16(self, what: str) -> int:
        value: int = _U16.unpack(self.take(2, what))[0]
        return value

    def u32(self, what: str) -> int:
        value: int = _U32.unpack(self.take(4, what))[0]
        return value

    def u64(self, what: str) -> int:
        value: int = _U64.unpack(self.take(8, what))[0]
        return value

    def string_length(self, what: str) -> int:
        n = self.u64(f"length of {what}")
        self._need(n, what)
        return n

    def text(self, what: str, limit: int = MAX_NAME) -> str:
        n = self.string_length(what)
        if n > limit:
            raise ResourceLimitError(
                self.path, f"too large: {what} of {n} bytes exceeds the {limit}-byte limit"
            )
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedFileError(self.path, f"{what} is not valid UTF-8") from None


class _Header:
    """What the KV section yields: the alignment, the metadata we keep, and counters."""

    def __init__(self) -> None:
        self.alignment = DEFAULT_ALIGNMENT
        self.metadata: dict[str, str] = {}
        self.split: dict[str, int] = {}
        self.dropped = 0
        self.items = 0


class GgufReader:
    """Reader for GGUF files, versions 2 and 3, little-endian."""

    name = "gguf"

    def sniff(self, head: bytes, path: Path) -> bool:
        """GGUF files open with the magic ``GGUF``."""
        return head[:4] == MAGIC

    def parse(self, path: Path, size: int, fh: BinaryIO) -> ParsedFile:
        """Parse header, metadata and tensor infos; tensors become spans into the data."""
        cur = _Cursor(path, fh, size)
        if cur.take(4, "magic") != MAGIC:
            raise MalformedFileError(path, "not a GGUF file (bad magic)")
        version = cur.u32("version")
        if version not in SUPPORTED_VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            if swapped in (1, *SUPPORTED_VERSIONS):
                raise MalformedFileError(path, "big-endian GGUF is not supported")
            raise UnsupportedFormatError(path, f"GGUF version {version} is not supported")
        tensor_count = cur.u64("tensor count")
        kv_count = cur.u64("KV count")
        if tensor_count > MAX_TENSORS:
            raise too_large(path, "tensor count", tensor_count, MAX_TENSORS)
        if kv_count * _MIN_KV + tensor_count * _MIN_TENSOR_INFO > cur.remaining():
            raise MalformedFileError(
                path,
                f"truncated: {kv_count} KV entries and {tensor_count} tensor infos "
                f"cannot fit in the {cur.remaining()} bytes left",
            )
        header = _Header()
        self._read_kvs(cur, kv_count, header)
        infos = [self._read_tensor_info(cur, i) for i in range(tensor_count)]
        data_start = -(-cur.pos // header.alignment) * header.alignment
        tensors = [self._tensor(path, size, data_start, header.alignment, *i) for i in infos]
        names = set()
        for t in tensors:
            if t.name in names:
                raise MalformedFileError(path, f"duplicate tensor name {t.name!r}")
            names.add(t.name)
        notes = self._check_layout(path, tensors, data_start, size, header.alignment)
        if header.split.get("split.count", 1) > 1:
            notes.append(
                f"GGUF split {header.split.get('split.no', 0) + 1} of "
                f"{header.split['split.count']}: the other splits hold the rest of the model"
            )
        if header.dropped:
            notes.append(
                f"{header.dropped} general.* metadata strings not kept "
                f"(over {MAX_METADATA_VALUE} bytes, or past {MAX_METADATA_ENTRIES} entries)"
            )
        return ParsedFile(
            path=path,
            format="gguf",
            size=size,
            tensors=tensors,
            metadata=header.metadata,
            notes=notes,
        )

    def _read_kvs(self, cur: _Cursor, count: int, header: _Header) -> None:
        seen: set[str] = set()
        for i in range(count):
            key = cur.text(f"key of KV entry {i}")
            if key in seen:
                raise MalformedFileError(cur.path, f"duplicate metadata key {key!r}")
            seen.add(key)
            vtype = self._value_type(cur, key)
            if key == "general.alignment":
                header.alignment = self._alignment(cur, vtype)
            elif key in ("split.no", "split.count") and vtype == _UINT16:
                header.split[key] = cur.u16(key)
            elif vtype == _STRING and key.startswith("general."):
                self._keep_string(cur, key, header)
            elif vtype in _INTEGERS and _LAYOUT_HINT.fullmatch(key):
                self._keep_integer(cur, key, vtype, header)
            else:
                self._skip_value(cur, vtype, key, header, depth=0)

    @staticmethod
    def _value_type(cur: _Cursor, key: str) -> int:
        vtype = cur.u32(f"type of {key!r}")
        if vtype not in _VALUE_TYPES:
            raise MalformedFileError(cur.path, f"metadata {key!r}: unknown value type {vtype}")
        return vtype

    @staticmethod
    def _alignment(cur: _Cursor, vtype: int) -> int:
        if vtype != _UINT32:
            raise MalformedFileError(
                cur.path, f"general.alignment must be uint32, not {_VALUE_TYPES[vtype][0]}"
            )
        alignment = cur.u32("general.alignment")
        if alignment == 0 or alignment & (alignment - 1):
            raise MalformedFileError(
                cur.path, f"general.alignment {alignment} is not a power of two"
            )
        return alignment

    @staticmethod
    def _keep_string(cur: _Cursor, key: str, header: _Header) -> None:
        n = cur.string_length(f"value of {key!r}")
        if n > MAX_METADATA_VALUE or len(header.metadata) >= MAX_METADATA_ENTRIES:
            cur.skip(n, f"value of {key!r}")
            header.dropped += 1
            return
        raw = cur.take(n, f"value of {key!r}")
        header.metadata[key] = raw.decode("utf-8", errors="replace")

    @staticmethod
    def _keep_integer(cur: _Cursor, key: str, vtype: int, header: _Header) -> None:
        """Keep an integer the layout layer needs (head counts), as a decimal string."""
        fmt = _INTEGERS[vtype]
        (value,) = struct.unpack(fmt, cur.take(struct.calcsize(fmt), f"value of {key!r}"))
        if len(header.metadata) >= MAX_METADATA_ENTRIES:
            header.dropped += 1
            return
        header.metadata[key] = str(value)

    def _skip_value(self, cur: _Cursor, vtype: int, key: str, header: _Header, depth: int) -> None:
        """Step over one value without keeping it; arrays are walked, never loaded."""
        size = _VALUE_TYPES[vtype][1]
        if size:
            cur.skip(size, f"value of {key!r}")
            return
        header.items += 1
        if header.items > MAX_ITEMS:
            raise ResourceLimitError(
                cur.path, f"metadata holds more than {MAX_ITEMS} strings and arrays"
            )
        if vtype == _STRING:
            cur.skip(cur.string_length(f"value of {key!r}"), f"value of {key!r}")
            return
        if depth >= MAX_ARRAY_DEPTH:
            raise ResourceLimitError(
                cur.path, f"metadata {key!r}: arrays nested deeper than {MAX_ARRAY_DEPTH}"
            )
        item_type = self._value_type(cur, key)
        count = cur.u64(f"length of array {key!r}")
        item_size = _VALUE_TYPES[item_type][1]
        if count * (item_size or _MIN_VARIABLE[item_type]) > cur.remaining():
            raise MalformedFileError(
                cur.path,
                f"truncated: array {key!r} of {count} items runs past the end of the file",
            )
        if item_size:
            cur.skip(count * item_size, f"array {key!r}")
            return
        for _ in range(count):
            self._skip_value(cur, item_type, key, header, depth + 1)

    @staticmethod
    def _read_tensor_info(cur: _Cursor, index: int) -> tuple[str, tuple[int, ...], int, int]:
        name = cur.text(f"name of tensor {index}", MAX_NAME_BYTES)
        if not name:
            raise MalformedFileError(cur.path, f"tensor {index} has an empty name")
        n_dims = cur.u32(f"n_dims of tensor {name!r}")
        if n_dims > MAX_DIMS:
            raise MalformedFileError(
                cur.path, f"tensor {name!r}: {n_dims} dimensions, at most {MAX_DIMS} allowed"
            )
        ne = tuple(cur.u64(f"dims of tensor {name!r}") for _ in range(n_dims))
        ggml_type = cur.u32(f"type of tensor {name!r}")
        offset = cur.u64(f"offset of tensor {name!r}")
        return name, ne, ggml_type, offset

    @staticmethod
    def _tensor(
        path: Path,
        size: int,
        data_start: int,
        alignment: int,
        name: str,
        ne: tuple[int, ...],
        ggml_type: int,
        offset: int,
    ) -> TensorRecord:
        if ggml_type not in GGML_TYPES:
            raise MalformedFileError(path, f"tensor {name!r}: unknown GGML type {ggml_type}")
        dtype, block, type_size = GGML_TYPES[ggml_type]
        if any(d >= 2**63 for d in ne):
            raise MalformedFileError(path, f"tensor {name!r}: dimension out of range {ne}")
        if ne and ne[0] % block:
            raise MalformedFileError(
                path,
                f"tensor {name!r}: row of {ne[0]} elements is not a whole number of "
                f"{dtype} blocks of {block}",
            )
        n = numel(ne)
        if n % block:
            raise MalformedFileError(
                path, f"tensor {name!r}: {n} elements is not a whole number of {dtype} blocks"
            )
        nbytes = n // block * type_size
        if offset % alignment:
            raise MalformedFileError(
                path, f"tensor {name!r}: offset {offset} is not aligned to {alignment}"
            )
        begin = data_start + offset
        if begin + nbytes > size:
            raise MalformedFileError(
                path,
                f"truncated: tensor {name!r} needs bytes {begin}..{begin + nbytes}, "
                f"file has {size}",
            )
        return TensorRecord(
            name=name,
            dtype=dtype,
            shape=tuple(reversed(ne)),
            nbytes=nbytes,
            span=(begin, nbytes),
        )

    @staticmethod
    def _check_layout(
        path: Path, tensors: list[TensorRecord], data_start: int, size: int, alignment: int
    ) -> list[str]:
        """Tensors must not overlap; report data bytes that belong to no tensor."""
        spans = sorted((t.span or (0, 0), t.name) for t in tensors)
        end = data_start
        unclaimed = 0
        for (begin, length), name in spans:
            if begin < end:
                raise MalformedFileError(path, f"tensor {name!r} overlaps the previous tensor")
            gap = begin - end
            if gap >= alignment:
                unclaimed += gap
            end = begin + length
        if tensors and size - end >= alignment:
            unclaimed += size - end
        if unclaimed:
            return [f"{unclaimed} bytes of the GGUF data section belong to no tensor"]
        return []
