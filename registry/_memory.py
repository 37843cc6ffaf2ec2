"""Give memory freed by a large request back to the operating system.

Decoding sketches allocates many small arrays; when the request ends Python frees
them, but glibc's allocator keeps the freed pages in the process, so a worker that
once served a large sketch check would stay large. ``malloc_trim(0)`` returns
them. Called only after requests that decoded sketches, and a no-op where glibc
is not the allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
from collections.abc import Callable

__all__ = ["release_freed_memory"]


@functools.cache
def _trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


def release_freed_memory() -> None:
    """Collect garbage, then return free heap pages to the system (glibc only)."""
    gc.collect()
    trim = _trim()
    if trim is not None:
        trim(0)
