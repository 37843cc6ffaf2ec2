"""Fingerprint a file while its bytes arrive, front to back, with bounded memory.

A safetensors file puts its header first, so once the header is in, every tensor's
byte span is known and each tensor is hashed as it streams past: the file and
content layers come out with no temporary file and no second read, and equal what
``fingerprint_file`` computes for the same bytes. Other formats (PyTorch zips and
pickles, GGUF) need random access; they are spooled to a temporary file, up to the
caller's size limit, and fingerprinted from there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import struct
import tempfile
from collections import Counter
from pathlib import Path
from typing import IO, Any

import blake3

try:  # the same CRC32 the engine uses; identical answers either way
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover
    from zlib import crc32

from modelhash._scan import fingerprint_exact
from modelhash.errors import MalformedFileError, ModelhashError, UploadTooLargeError
from modelhash.fingerprint import FileHashes, ModelFingerprint, Outcome, TensorDigest
from modelhash.fingerprint._content import canonical_names, content_digest
from modelhash.fingerprint._describe import describe
from modelhash.fingerprint._formats._safetensors import MAX_HEADER, SafetensorsReader
from modelhash.fingerprint._limits import load_json
from modelhash.fingerprint._pass import SpanHasher

__all__ = ["StreamFingerprinter"]

_AUTOV1_START, _AUTOV1_END, _AUTOV1_MIN = 0x100000, 0x110000, 2 * 1024 * 1024
_AUTOV3_HEADER_LIMIT = 16 * 1024 * 1024
_SNIFF = 9


class _FileHasher:
    """The file layer of a byte stream, exactly as the model sites define it."""

    def __init__(self) -> None:
        self.sha256 = hashlib.sha256()
        self.blake3 = blake3.blake3()
        self.crc = 0
        self.autov1 = bytearray()
        self.autov3: Any = None
        self.autov3_from = 0
        self.size = 0

    def start_autov3(self, offset: int) -> None:
        self.autov3 = hashlib.sha256()
        self.autov3_from = offset

    def update(self, view: memoryview) -> None:
        off, n = self.size, len(view)
        self.sha256.update(view)
        self.blake3.update(view)
        self.crc = crc32(view, self.crc)
        if off < _AUTOV1_END and off + n > _AUTOV1_START:
            self.autov1 += view[max(0, _AUTOV1_START - off) : _AUTOV1_END - off]
        if self.autov3 is not None and off + n > self.autov3_from:
            self.autov3.update(view[max(0, self.autov3_from - off) :])
        self.size += n

    def finish(self, name: str, *, autov3: bool) -> FileHashes:
        sha = self.sha256.hexdigest()
        return FileHashes(
            path=name,
            size=self.size,
            sha256=sha,
            blake3=self.blake3.hexdigest(),
            crc32=self.crc.to_bytes(4, "little").hex(),
            autov1=(
                hashlib.sha256(self.autov1).hexdigest()[:8] if self.size >= _AUTOV1_MIN else None
            ),
            autov2=sha[:10],
            autov3=self.autov3.hexdigest()[:12] if autov3 and self.autov3 is not None else None,
        )


def _claimed_size(header: bytes, n: int) -> int:
    """The file size a safetensors header implies; 8 + n when it cannot say."""
    try:
        entries = load_json("upload", header, "safetensors header", max_depth=3)  # bounded
        ends = [v["data_offsets"][1] for k, v in entries.items() if k != "__metadata__"]
        end = max(ends, default=0)
        return 8 + n + end if isinstance(end, int) and end >= 0 else 8 + n
    except Exception:
        return 8 + n


class StreamFingerprinter:
    """Feed the bytes of one file in order with :meth:`feed`; :meth:`finish` gives the
    :class:`~modelhash.fingerprint.Outcome` that ``fingerprint_path`` would.

    ``name`` is used in results and for the file-name suffix some formats are
    recognised by. More than ``max_bytes`` raises UploadTooLargeError at once.
    Not thread-safe; one per upload.
    """

    def __init__(
        self,
        name: str,
        *,
        max_bytes: int,
        spool_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.name = name
        self.max_bytes = max_bytes
        self._spool_dir = spool_dir
        self._head = bytearray()
        self._mode = "sniff"
        self._hasher = _FileHasher()
        self._error: ModelhashError | None = None
        self._spans: SpanHasher | None = None
        self._parsed: Any = None
        self._expected = 0
        self._spool: IO[bytes] | None = None
        self._spool_path: Path | None = None
        self._n = 0
        self.received = 0
        """Bytes fed so far."""

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """The next bytes of the file."""
        view = memoryview(data).cast("B")
        if not len(view):
            return
        if self.received + len(view) > self.max_bytes:
            self.close()
            raise UploadTooLargeError(self.name, self.max_bytes)
        self.received += len(view)
        if self._mode == "sniff":
            self._head += view
            if len(self._head) >= _SNIFF:
                self._decide()
            return
        if self._mode == "header":
            self._head += view
            self._try_header()
            return
        self._consume(view)

    def _decide(self) -> None:
        (n,) = struct.unpack("<Q", bytes(self._head[:8]))
        if 2 <= n <= MAX_HEADER and self._head[8:9] == b"{":
            self._n = n
            self._mode = "header"
            self._try_header()
        else:
            self._start_spool()

    def _try_header(self) -> None:
        n = self._n
        if len(self._head) < 8 + n:
            return
        head, rest = bytes(self._head[: 8 + n]), memoryview(bytes(self._head[8 + n :]))
        self._head = bytearray()
        self._hasher.start_autov3(8 + n if n < _AUTOV3_HEADER_LIMIT else 8)
        self._hasher.update(memoryview(head))
        try:
            self._expected = _claimed_size(head[8:], n)
            parsed = SafetensorsReader().parse(Path(self.name), self._expected, io.BytesIO(head))
        except ModelhashError as exc:
            self._error = exc
            self._mode = "bytes"
        else:
            self._parsed = parsed
            self._spans = SpanHasher([t.span for t in parsed.tensors if t.span is not None])
            self._mode = "tensors"
        if len(rest):
            self._consume(rest)

    def _consume(self, view: memoryview) -> None:
        if self._mode == "spool":
            assert self._spool is not None
            self._spool.write(view)
            return
        off = self._hasher.size
        self._hasher.update(view)
        if self._spans is not None:
            self._spans(off, view)

    def _start_spool(self) -> None:
        suffix = Path(self.name).suffix[:16]
        fd, path = tempfile.mkstemp(prefix="modelhash-upload-", suffix=suffix, dir=self._spool_dir)
        self._spool = os.fdopen(fd, "wb")
        self._spool_path = Path(path)
        self._mode = "spool"
        head, self._head = bytes(self._head), bytearray()
        self._spool.write(head)

    def close(self) -> None:
        """Drop any temporary file; called by :meth:`finish` and on errors."""
        if self._spool is not None:
            with contextlib.suppress(OSError):
                self._spool.close()
            self._spool = None
        if self._spool_path is not None:
            self._spool_path.unlink(missing_ok=True)
            self._spool_path = None

    def finish(self) -> Outcome:
        """The outcome for the whole stream: a fingerprint, or an error with file hashes."""
        try:
            if self._mode == "sniff":
                self._start_spool()
            if self._mode == "header":
                self._hasher.update(memoryview(bytes(self._head)))
                got = self._hasher.size
                err = MalformedFileError(
                    self.name,
                    f"safetensors header length {self._n} runs past the end of the file "
                    f"({got} bytes)",
                )
                return Outcome(self.name, error=err,
                               files=[self._hasher.finish(self.name, autov3=False)])
            if self._mode == "spool":
                return self._finish_spool()
            return self._finish_safetensors()
        finally:
            self.close()

    def _finish_spool(self) -> Outcome:
        assert self._spool is not None and self._spool_path is not None
        self._spool.close()
        self._spool = None
        (out,) = fingerprint_exact(self._spool_path)[:1]
        files = [dataclasses.replace(f, path=self.name) for f in out.files]
        fp = out.fingerprint
        if fp is not None:
            fp = dataclasses.replace(fp, path=self.name, files=files)
        error = out.error
        if error is not None:
            error = _renamed(error, str(self._spool_path), self.name)
        return Outcome(self.name, fingerprint=fp if error is None else None, error=error,
                       files=files)

    def _finish_safetensors(self) -> Outcome:
        size = self._hasher.size
        if self._error is None and size != self._expected:
            data_len = size - (self._expected - sum(t.nbytes for t in self._parsed.tensors))
            need = self._expected - size
            self._error = MalformedFileError(
                self.name,
                f"truncated: tensors need {need + data_len} data bytes, file has {data_len}"
                if need > 0 else f"{-need} trailing bytes after the last tensor",
            )
        if self._error is not None:
            files = [self._hasher.finish(self.name, autov3=False)]
            return Outcome(self.name, error=self._error, files=files)
        file_hashes = self._hasher.finish(self.name, autov3=True)
        assert self._spans is not None
        pf = self._parsed
        names = canonical_names([t.name for t in pf.tensors])
        tensors = [
            TensorDigest(n, t.dtype, t.shape, d)
            for n, t, d in zip(names, pf.tensors, self._spans.hexdigests(), strict=True)
        ]
        error: ModelhashError | None = None
        if not tensors:
            error = MalformedFileError(self.name, "holds no tensors")
        dupes = [n for n, c in Counter(t.name for t in tensors).items() if c > 1]
        if dupes:
            error = MalformedFileError(self.name, f"tensor {dupes[0]!r} appears more than once")
        if error is not None:
            return Outcome(self.name, error=error, files=[file_hashes])
        metadata = dict(pf.metadata)
        fp = ModelFingerprint(
            path=self.name,
            format=pf.format,
            files=[file_hashes],
            content=content_digest(tensors),
            tensors=tensors,
            model=describe([(t.name, t.dtype, t.shape) for t in tensors], metadata),
            metadata=metadata,
            notes=list(pf.notes),
        )
        return Outcome(self.name, fingerprint=fp, files=[file_hashes])


def _renamed(error: ModelhashError, temp: str, name: str) -> ModelhashError:
    """The same error, naming the upload instead of its temporary file."""
    for attr in ("path",):
        if getattr(error, attr, None) == temp:
            with contextlib.suppress(AttributeError):
                setattr(error, attr, name)
    error.args = tuple(a.replace(temp, name) if isinstance(a, str) else a for a in error.args)
    return error
