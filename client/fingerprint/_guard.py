"""The per-file boundary: whatever happens while reading one path becomes its error.

Readers raise :class:`~modelhash.errors.ModelhashError` for every problem they
expect. Anything else that escapes them (a bug, or an input no one foresaw) must
still cost only the path being read: :func:`guarded` turns it into that path's
one-line error, an :class:`~modelhash.errors.InternalReadError` saying "internal
error while reading" so that it stays visible as a bug, and the other paths' results
are kept.

The error that comes out holds no traceback and no chained exception: an
out-of-memory error's frames would otherwise keep the very buffers that ran out of
memory alive for as long as the result is kept.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

from modelhash.errors import (
    InternalReadError,
    MalformedFileError,
    ModelhashError,
    ResourceLimitError,
)

__all__ = ["as_error", "guarded"]

T = TypeVar("T")


def guarded(path: str | os.PathLike[str], fn: Callable[[], T]) -> T:
    """Run ``fn``; any exception comes out as a bare ModelhashError naming ``path``."""
    try:
        return fn()
    except Exception as exc:  # this is the boundary: anything at all
        err = as_error(path, exc)
    raise err  # outside the except block: no __context__ back to the failure


def as_error(path: str | os.PathLike[str], exc: BaseException) -> ModelhashError:
    """``exc`` as the one-line error of ``path``, stripped of frames and chains."""
    path = os.fspath(path)
    if isinstance(exc, ModelhashError):
        err = exc
    elif isinstance(exc, MemoryError):
        err = ResourceLimitError(path, "too large: out of memory while reading")
    elif isinstance(exc, RecursionError):
        err = MalformedFileError(path, "structure nested too deeply")
    elif isinstance(exc, OSError):
        err = MalformedFileError(path, f"read error: {exc.strerror or _line(exc)}")
    else:
        err = InternalReadError(
            path, f"internal error while reading: {type(exc).__name__}: {_line(exc)}"
        )
    err.__traceback__ = None
    err.__context__ = None
    err.__cause__ = None
    return err


def _line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
