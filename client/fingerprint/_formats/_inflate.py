"""Compressed zip members, each inflated once, as a stream, into a temporary file.

A checkpoint whose storages are deflated cannot be read at a tensor's offset without
inflating everything before it. Inflating from the start for every tensor is
quadratic: 6,000 one-byte tensors of one storage took over a minute. Instead the
first tensor that needs a member inflates all of it, a bounded chunk at a time,
into an anonymous temporary file; every tensor of that storage then reads or
memory-maps its bytes there. Memory stays at one chunk whatever the member's size;
disk use is bounded by the member's declared size (itself under MAX_INFLATED).
"""

from __future__ import annotations

import tempfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

from modelhash.errors import MalformedFileError
from modelhash.fingerprint._limits import MAX_INFLATED, open_regular

if TYPE_CHECKING:
    import numpy as np

__all__ = ["InflatedMember"]

CHUNK = 1024 * 1024


class InflatedMember:
    """One compressed member of the zip at ``path``, of ``size`` inflated bytes."""

    def __init__(self, path: Path, member: str, size: int) -> None:
        self.path = path
        self.member = member
        self.size = size
        self._file: IO[bytes] | None = None
        self._lock = threading.Lock()

    def _inflated(self) -> IO[bytes]:
        with self._lock:
            if self._file is None:
                self._file = self._inflate()
            return self._file

    def _inflate(self) -> IO[bytes]:
        if self.size > MAX_INFLATED:
            raise MalformedFileError(self.path, f"zip entry {self.member!r} is too large")
        out = tempfile.TemporaryFile()  # noqa: SIM115 - kept open for later reads
        try:
            fh, _ = open_regular(self.path)
            with fh, zipfile.ZipFile(fh) as zf, zf.open(self.member) as src:
                total = 0
                while piece := src.read(CHUNK):
                    total += len(piece)
                    if total > self.size:
                        raise MalformedFileError(
                            self.path, f"zip entry {self.member!r} inflates past its size"
                        )
                    out.write(piece)
            if total != self.size:
                raise MalformedFileError(self.path, f"zip entry {self.member!r} ends early")
            out.flush()
        except BaseException:
            out.close()
            raise
        return out

    def read(self, start: int, length: int) -> Iterator[bytes]:
        """``length`` inflated bytes from ``start``, in chunks."""
        if start + length > self.size:
            raise MalformedFileError(self.path, f"zip entry {self.member!r} ends early")
        fh = self._inflated()
        pos, left = start, length
        while left:
            with self._lock:
                fh.seek(pos)
                piece = fh.read(min(left, CHUNK))
            if not piece:
                raise MalformedFileError(self.path, f"zip entry {self.member!r} ends early")
            pos += len(piece)
            left -= len(piece)
            yield piece

    def region(self, start: int, length: int) -> np.ndarray:
        """The inflated bytes ``start .. start + length`` as a read-only memory map."""
        import numpy as np

        if start + length > self.size:
            raise MalformedFileError(self.path, f"zip entry {self.member!r} ends early")
        if length == 0:
            return np.zeros(0, dtype=np.uint8)
        return np.memmap(self._inflated(), dtype=np.uint8, mode="r", offset=start, shape=(length,))
