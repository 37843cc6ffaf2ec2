"""The one set of limits every reader obeys, and the checks that enforce them.

A hostile file can claim anything: a million tensors, a header of a billion empty
lists, a dimension of 2**64, a sidecar that is a FIFO or ``/dev/zero``. Each limit
below is checked where the bytes or objects it bounds would be created, and fails
with a :class:`~modelhash.errors.ResourceLimitError` that says which limit; the
checks live here so that readers share one definition of "too large".

Together they bound peak memory by a constant that does not grow with the file
(see :data:`PEAK_RSS_BOUND`), apart from the single largest tensor a strided or
byte-swapped view must hold, which is itself bounded by :data:`MAX_MATERIALIZED`.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO

from modelhash.errors import MalformedFileError, ResourceLimitError

__all__ = [
    "MAX_DIM",
    "MAX_DIMS",
    "MAX_HEADER_BYTES",
    "MAX_INFLATED",
    "MAX_JSON_DEPTH",
    "MAX_JSON_VALUES",
    "MAX_MATERIALIZED",
    "MAX_NAME_BYTES",
    "MAX_PICKLE_OBJECT_BYTES",
    "MAX_SIDECAR_BYTES",
    "MAX_SKETCHED",
    "MAX_SKETCH_CACHE_BYTES",
    "MAX_SKETCH_SIDE",
    "MAX_SKETCH_WORK",
    "MAX_TENSORS_PER_FILE",
    "MAX_TENSORS_PER_MODEL",
    "MAX_TREE_ENTRIES",
    "PEAK_RSS_BOUND",
    "check_name",
    "check_shape",
    "check_tensor_count",
    "load_json",
    "open_regular",
    "read_sidecar",
    "too_large",
]

MAX_TENSORS_PER_FILE = 100_000
"""Tensors one file may hold. The largest published single files hold ~20,000."""
MAX_TENSORS_PER_MODEL = 250_000
"""Tensors one model (all shards or components together) may hold."""
MAX_NAME_BYTES = 8192
"""UTF-8 bytes of one tensor name; real names are under 300."""
MAX_DIMS = 16
MAX_DIM = 2**63 - 1
"""Largest single dimension: the content layer stores each as an unsigned 64-bit."""

MAX_HEADER_BYTES = 100_000_000
"""A safetensors JSON header (the safetensors package's own limit)."""
MAX_JSON_VALUES = 2_500_000
"""JSON values (containers, numbers, strings) one header or sidecar may hold.
Parsed JSON costs ~60 bytes per value, so this bounds a header at ~150 MB."""
MAX_JSON_DEPTH = 32
MAX_SIDECAR_BYTES = 64 * 1024 * 1024
"""Any sidecar (``*.index.json``, ``model_index.json``, ``refs/main``,
``adapter_config.json``); each reader may ask for less."""

MAX_INFLATED = 4 * 1024**3
"""Bytes the compressed storages of one zip checkpoint may inflate to (streamed, so
this bounds time, not memory)."""
MAX_PICKLE_OBJECT_BYTES = 64 * 1024 * 1024
"""Bytes the unpickler's allow-listed byte builders (``bytearray``, ``_codecs.encode``)
may create in one pickle, all together."""
MAX_MATERIALIZED = 256 * 1024 * 1024
"""Bytes of one strided, compressed or byte-swapped tensor view held at once."""

MAX_SKETCH_SIDE = 2**21
"""m + n of a matrix the sketch layer projects: its sign matrices take 64·(m+n) bytes."""
MAX_SKETCH_CACHE_BYTES = 128 * 1024 * 1024
"""Sign matrices kept between tensors of the same shape."""
MAX_SKETCHED = 65_536
"""Matrices sketched per model (2 KiB each); the largest MoE models have ~45,000."""
MAX_SKETCH_WORK = 10**10
"""Multiply-adds to sketch one adapter module from its factors (seconds, at worst)."""

MAX_TREE_ENTRIES = 1_000_000
"""Entries a recursive walk of folders may visit."""

PEAK_RSS_BOUND = 1024 * 1024 * 1024
"""What the limits above hold peak memory under, for any input (measured worst: see
the README's "Hostile input" section)."""


def too_large(path: Path | str, what: str, n: int, limit: int) -> ResourceLimitError:
    """The error for ``what`` of ``n`` going past ``limit``."""
    return ResourceLimitError(path, f"too large: {what} ({n:,}) exceeds the limit of {limit:,}")


def check_tensor_count(path: Path | str, n: int, limit: int = MAX_TENSORS_PER_FILE) -> None:
    """Refuse a file (or model) holding more than ``limit`` tensors."""
    if n > limit:
        raise too_large(path, "tensor count", n, limit)


def check_name(path: Path | str, name: str) -> None:
    """A tensor name must be valid Unicode (no lone surrogates) and of bounded length."""
    try:
        n = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise MalformedFileError(
            path, f"tensor name {name[:80]!r} is not valid Unicode (lone surrogate)"
        ) from None
    if n > MAX_NAME_BYTES:
        raise too_large(path, f"tensor name {name[:40]!r}...", n, MAX_NAME_BYTES)


def check_shape(path: Path | str, name: str, shape: tuple[int, ...]) -> None:
    """At most MAX_DIMS dimensions, each a non-negative int up to MAX_DIM."""
    if len(shape) > MAX_DIMS:
        raise MalformedFileError(
            path, f"tensor {name[:80]!r}: {len(shape)} dimensions, at most {MAX_DIMS} allowed"
        )
    for d in shape:
        if not isinstance(d, int) or isinstance(d, bool) or not 0 <= d <= MAX_DIM:
            raise MalformedFileError(
                path, f"tensor {name[:80]!r}: dimension {str(d)[:40]} out of range"
            )


def open_regular(path: Path) -> tuple[BinaryIO, int]:
    """Open ``path`` for reading only if it is a regular file; return it and its size.

    The open never blocks: a FIFO is opened non-blocking and refused by its type, as
    are devices, sockets and folders. A symlink is followed (Hugging Face caches are
    made of them), but only to a regular file.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise MalformedFileError(path, f"cannot open: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise MalformedFileError(path, f"not a regular file ({_kind(st.st_mode)})")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        fh = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    return fh, st.st_size


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a file"


def read_sidecar(path: Path, limit: int = MAX_SIDECAR_BYTES) -> bytes:
    """The bytes of a small regular file, at most ``limit`` of them, else an error.

    Reads at most ``limit + 1`` bytes whatever the file claims its size is, so a
    file that grows, or a sysfs file whose size is a lie, cannot take more.
    """
    fh, size = open_regular(path)
    with fh:
        if size > limit:
            raise too_large(path, "sidecar file size", size, limit)
        try:
            data = fh.read(limit + 1)
        except OSError as exc:
            raise MalformedFileError(path, f"cannot read: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise too_large(path, "sidecar file size", len(data), limit)
    return data


def check_json(
    path: Path | str,
    raw: bytes,
    what: str,
    *,
    max_values: int = MAX_JSON_VALUES,
    max_depth: int = MAX_JSON_DEPTH,
) -> None:
    """Refuse JSON text whose parse would build too many values or nest too deep.

    Counted on the text outside its strings, before ``json`` builds anything, a
    bounded chunk at a time: every value (or key) but the first follows a comma or
    opens a container, so one plus their count bounds what ``json`` would build.
    Escaped backslashes and quotes are dropped first, so every quote left opens or
    closes a string (a backslash outside a string is invalid JSON, which ``json``
    refuses at that point, before building what follows).
    """
    text = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    values = 1
    brackets = bytearray()
    inside = False
    for i in range(0, len(text), _CHUNK):
        pieces = text[i : i + _CHUNK].split(b'"')
        outside = b"".join(pieces[1 if inside else 0 :: 2])
        del pieces
        values += outside.count(b",") + outside.count(b"[") + outside.count(b"{")
        brackets += outside.translate(None, _NOT_BRACKETS)
        if values > max_values:
            raise too_large(path, f"{what}: JSON values", values, max_values)
        if text.count(b'"', i, i + _CHUNK) % 2:
            inside = not inside
    del text
    for _ in range(max_depth):
        if not brackets:
            return
        brackets = brackets.replace(b"[]", b"").replace(b"{}", b"")
    if brackets:
        raise MalformedFileError(
            path, f"{what}: JSON nested deeper than {max_depth} levels (or unbalanced)"
        )


_CHUNK = 1 << 20
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def load_json(
    path: Path | str,
    raw: bytes,
    what: str,
    *,
    max_values: int = MAX_JSON_VALUES,
    max_depth: int = MAX_JSON_DEPTH,
    object_pairs_hook: Any = None,
) -> Any:
    """Parse JSON within the value and depth limits; MalformedFileError if it is not JSON."""
    check_json(path, raw, what, max_values=max_values, max_depth=max_depth)
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=object_pairs_hook)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise MalformedFileError(path, f"{what} is not valid JSON: {reason}") from None
