"""Upload bodies as sources for the one fingerprint pass.

This module only adapts bytes that arrive over time to what the engine reads:

- a safetensors body puts its header first: once the header is in, the engine's
  pass (:func:`~modelhash.fingerprint._engine.fingerprint_source`) reads the rest
  of the body as it arrives, with every layer's work items, the sketch included,
  and no temporary file;
- formats that need random access (PyTorch zips and pickles, GGUF) are spooled to
  a temporary file, never past ``max_bytes``, and fingerprinted from there by the
  same engine;
- a model that arrives as several files (shards with their index, a diffusers
  folder) is spooled to a temporary folder and fingerprinted as one model.

Results name the upload, never the temporary file.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import os
import queue
import shutil
import struct
import tempfile
import threading
from collections.abc import AsyncIterable, Iterable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from modelhash.errors import InputError, MalformedFileError, ModelhashError, UploadTooLargeError
from modelhash.fingerprint import Layers, Outcome, fingerprint_path
from modelhash.fingerprint._engine import fingerprint_source, hash_source
from modelhash.fingerprint._formats._safetensors import MAX_HEADER, SafetensorsReader
from modelhash.fingerprint._limits import load_json
from modelhash.fingerprint._pass import ChunkSource, Source

__all__ = [
    "Body",
    "Pipe",
    "StreamFingerprinter",
    "chunks_of",
    "fingerprint_body",
    "fingerprint_parts",
]

READ_BLOCK = 1024 * 1024
"""How much is read at a time from a file object, and carried per async hop."""
_SNIFF = 9

Chunks = Iterable[bytes | bytearray | memoryview]


def chunks_of(stream: Chunks | BinaryIO) -> Iterator[bytes | bytearray | memoryview]:
    """Iterate a body given as chunks or as a binary file object."""
    read = getattr(stream, "read", None)
    if read is None:
        yield from stream
        return
    while block := read(READ_BLOCK):
        yield block


class Body:
    """An upload body as a pass :class:`Source`: counts bytes, enforces ``max_bytes``.

    Raises UploadTooLargeError as soon as the body passes the limit, having read no
    further; ``received`` is the number of bytes taken so far.
    """

    def __init__(self, chunks: Iterator[bytes | bytearray | memoryview], name: str,
                 max_bytes: int) -> None:
        self.name = name
        self.max_bytes = max_bytes
        self.received = 0
        self.failure: BaseException | None = None
        """Why the body could not be read to its end (too large, the client gone):
        raised to the caller, never turned into a verdict about the file."""
        self._chunks = chunks
        self._src = ChunkSource(self._limited())

    def _limited(self) -> Iterator[bytes | bytearray | memoryview]:
        try:
            for block in self._chunks:
                n = memoryview(block).nbytes
                if self.received + n > self.max_bytes:
                    raise UploadTooLargeError(self.name, self.max_bytes)
                self.received += n
                yield block
        except BaseException as exc:
            self.failure = exc
            raise

    def readinto(self, buf: memoryview) -> int:
        return self._src.readinto(buf)

    def view(self, limit: int) -> memoryview | None:
        """The next bytes without a copy, when they arrived as a large ``bytes``."""
        return self._src.view(limit)

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; fewer only at the end of the body. Memory grows with
        what arrives, not with ``n`` (a header length is the sender's claim)."""
        out = bytearray()
        buf = bytearray(min(n, READ_BLOCK))
        view = memoryview(buf)
        while len(out) < n:
            k = self._src.readinto(view[: n - len(out)])
            if not k:
                break
            out += view[:k]
        return bytes(out)


class _Prefixed:
    """``head`` first, then the rest of ``rest``: bytes already sniffed are not lost."""

    def __init__(self, head: bytes, rest: Source) -> None:
        self._head = memoryview(head)
        self._rest = rest

    def readinto(self, buf: memoryview) -> int:
        if len(self._head):
            n = min(len(buf), len(self._head))
            buf[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        return self._rest.readinto(buf)

    def view(self, limit: int) -> memoryview | None:
        if len(self._head):
            return None  # the head is small: copied with what follows it
        lend = getattr(self._rest, "view", None)
        return lend(limit) if lend is not None else None


def _claimed_size(header: bytes, n: int) -> int:
    """The file size a safetensors header implies; 8 + n when it cannot say."""
    try:
        entries = load_json("upload", header, "safetensors header", max_depth=3)  # bounded
        ends = [v["data_offsets"][1] for k, v in entries.items() if k != "__metadata__"]
        end = max(ends, default=0)
        return 8 + n + end if isinstance(end, int) and end >= 0 else 8 + n
    except Exception:
        return 8 + n


def fingerprint_body(
    body: Body,
    *,
    layers: Layers = "all",
    spool_dir: str | os.PathLike[str] | None = None,
) -> Outcome:
    """The outcome ``fingerprint_path`` would give for the body's bytes as a file.

    Errors in the body (truncated, hostile, unsupported) come back in the outcome,
    with the file layer of the bytes received; UploadTooLargeError is raised.
    """
    name = body.name
    head = body.read(_SNIFF)
    n = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else 0
    if not (len(head) == _SNIFF and 2 <= n <= MAX_HEADER and head[8:9] == b"{"):
        return _spooled(body, head, layers=layers, spool_dir=spool_dir)
    head += body.read(8 + n - _SNIFF)
    reader = SafetensorsReader()

    def as_file(size: int) -> ModelhashError | None:
        """The error a file of ``size`` bytes starting with ``head`` gives, if any."""
        try:
            reader.parse(Path(name), size, io.BytesIO(head))
        except ModelhashError as exc:
            return exc
        return None

    if len(head) < 8 + n:  # the body ended inside the header
        err = as_file(len(head)) or MalformedFileError(name, "ended inside its header")
        return Outcome(name, error=err, files=[hash_source(name, _Prefixed(head, body))])
    claimed = _claimed_size(head[8:], n)
    try:
        pf = reader.parse(Path(name), claimed, io.BytesIO(head))
    except ModelhashError as exc:
        files = [hash_source(name, _Prefixed(head, body))]
        # Judged as the file the whole body makes, as fingerprint_path would.
        err = as_file(files[0].size) or exc
        return Outcome(name, error=err, files=files)

    if layers == "all":  # only the sketch needs numpy, which _scaled loads
        from modelhash.fingerprint._scaled import scales_follow_weights

        if scales_follow_weights(pf.tensors):  # a stream cannot go back for a scale
            return _spooled(body, head, layers=layers, spool_dir=spool_dir)

    def verify(got: int) -> None:
        if got != claimed:
            raise as_file(got) or MalformedFileError(
                name, f"body of {got} bytes, its header describes {claimed}"
            )

    out = fingerprint_source(name, pf, _Prefixed(head, body), verify, layers=layers)
    if body.failure is not None:
        raise body.failure
    return out


def _spooled(
    body: Body, head: bytes, *, layers: Layers, spool_dir: str | os.PathLike[str] | None
) -> Outcome:
    # The suffix helps recognise some formats; only plain characters are kept.
    suffix = "." + "".join(c for c in PurePosixPath(body.name).suffix[1:17] if c.isalnum())
    fd, raw = tempfile.mkstemp(prefix="modelhash-upload-", suffix=suffix, dir=spool_dir)
    path = Path(raw)
    try:
        with os.fdopen(fd, "wb") as fh:
            _copy(_Prefixed(head, body), fh)
        (out,) = fingerprint_path(path, layers=layers)[:1]
        return _renamed_outcome(out, {str(path): body.name})
    finally:
        path.unlink(missing_ok=True)


def _copy(src: Source, fh: BinaryIO) -> None:
    buf = bytearray(READ_BLOCK)
    view = memoryview(buf)
    while n := src.readinto(view):
        fh.write(view[:n])


def _safe_relative(name: str) -> PurePosixPath:
    """A part's name as a relative path inside the spool folder; refuses escapes."""
    p = PurePosixPath(name.replace("\\", "/"))
    if (not name or p.is_absolute() or any(s in ("", ".", "..") for s in p.parts)
            or any(s.startswith(".") for s in p.parts) or len(p.parts) > 8 or len(name) > 512):
        raise InputError(f"upload part name {name[:100]!r} is not a plain relative path")
    return p


def fingerprint_parts(
    parts: Sequence[tuple[str, Body]],
    *,
    layers: Layers = "all",
    spool_dir: str | os.PathLike[str] | None = None,
) -> list[Outcome]:
    """Fingerprint the files of one upload (a multi-file form, a sharded or diffusers
    model) as the folder they make: one outcome per model, as ``fingerprint_path``.

    ``max_bytes`` applies to each part's :class:`Body`. Part names are relative paths
    (``unet/diffusion_pytorch_model.safetensors``); anything else is an InputError.
    """
    rels = [_safe_relative(name) for name, _ in parts]
    if len(set(rels)) != len(rels):
        raise InputError("two upload parts have the same name")
    folder = Path(tempfile.mkdtemp(prefix="modelhash-upload-", dir=spool_dir))
    try:
        for rel, (_, body) in zip(rels, parts, strict=True):
            dst = folder.joinpath(*rel.parts)
            dst.parent.mkdir(parents=True, exist_ok=True)
            with dst.open("wb") as fh:
                _copy(body, fh)
        names = {str(folder.joinpath(*r.parts)): str(r) for r in rels}
        names[str(folder)] = "upload"
        return [_renamed_outcome(o, names) for o in fingerprint_path(folder, layers=layers)]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _rename(text: str, names: dict[str, str]) -> str:
    for temp in sorted(names, key=len, reverse=True):
        if temp in text:
            rest = text.replace(temp, names[temp])
            return rest.replace(names[temp] + os.sep, names[temp] + "/")
    return text


def _renamed_outcome(out: Outcome, names: dict[str, str]) -> Outcome:
    """The same outcome, naming the upload's files instead of the temporary ones."""
    files = [dataclasses.replace(f, path=_rename(f.path, names)) for f in out.files]
    fp = out.fingerprint
    if fp is not None:
        fp = dataclasses.replace(fp, path=_rename(fp.path, names), files=files)
    error = out.error
    if error is not None:
        error = _renamed(error, names)
    return Outcome(_rename(out.path, names), fingerprint=fp if error is None else None,
                   error=error, files=files)


def _renamed(error: ModelhashError, names: dict[str, str]) -> ModelhashError:
    """The same error, naming the upload instead of its temporary file."""
    path = getattr(error, "path", None)
    if isinstance(path, str | Path):
        with contextlib.suppress(AttributeError):
            error.path = _rename(str(path), names)  # type: ignore[attr-defined]
    error.args = tuple(_rename(a, names) if isinstance(a, str) else a for a in error.args)
    return error


class Pipe:
    """Hands an upload body, pushed by one side, to a pass reading in another thread.

    At most ``depth`` blocks wait in between, so a fast client cannot fill memory
    while the pass is busy. The producer pushes with :meth:`put` (blocking) or
    :meth:`aput` (from an event loop, never blocking it and never holding an
    executor thread), then :meth:`end`. The consumer reads :meth:`chunks` and calls
    :meth:`stop` when it will read no more, which releases a waiting producer.
    """

    _END = object()

    def __init__(self, depth: int = 8) -> None:
        self._q: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._stopped = threading.Event()
        self._space: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def stop(self) -> None:
        """The consumer will read no more."""
        self._stopped.set()
        self._wake()

    def _wake(self) -> None:
        if self._loop is not None and self._space is not None:
            with contextlib.suppress(RuntimeError):  # the loop may be closed
                self._loop.call_soon_threadsafe(self._space.set)

    def put(self, item: object) -> bool:
        """Queue ``item``, waiting for room; False if the consumer has stopped."""
        while not self._stopped.is_set():
            try:
                self._q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    async def aput(self, item: object) -> bool:
        """:meth:`put` for a coroutine: waits on the loop for room."""
        if self._space is None:
            self._loop = asyncio.get_running_loop()
            self._space = asyncio.Event()
        while not self._stopped.is_set():
            try:
                self._q.put_nowait(item)
                return True
            except queue.Full:
                self._space.clear()
                if not self._q.full():
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._space.wait(), 0.5)
        return False

    def end(self, failure: BaseException | None = None) -> None:
        """No more blocks: the body ended, or failed with ``failure``."""
        self.put(self._END if failure is None else failure)

    async def aend(self, failure: BaseException | None = None) -> None:
        await self.aput(self._END if failure is None else failure)

    def chunks(self) -> Iterator[bytes]:
        """The body's blocks, for the consumer; a producer failure becomes InputError."""
        while True:
            item = self._q.get()
            self._wake()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise InputError(f"the upload body failed: {type(item).__name__}: {item}"[:300])
            assert isinstance(item, bytes)
            yield item

    async def pump(self, stream: AsyncIterable[bytes] | Chunks | BinaryIO) -> None:
        """Forward a body (async or sync chunks, or a file object) coalesced into
        blocks of about :data:`READ_BLOCK`, then its end; stops early if the consumer
        does. A failure of the body is passed on to the consumer and re-raised."""
        pending = bytearray()
        try:
            if isinstance(stream, AsyncIterable):
                async for block in stream:
                    pending += block
                    if len(pending) >= READ_BLOCK:
                        data, pending = bytes(pending), bytearray()
                        if not await self.aput(data):
                            return
            else:
                for piece in chunks_of(stream):
                    if not await self.aput(bytes(piece)):
                        return
            if pending and not await self.aput(bytes(pending)):
                return
            await self.aend()
        except BaseException as exc:
            await self.aend(exc)
            raise


class StreamFingerprinter:
    """Push-style fingerprinting: :meth:`feed` the bytes of one file in order, then
    :meth:`finish` gives the :class:`~modelhash.fingerprint.Outcome` that
    ``fingerprint_path`` would for the same bytes, every layer included by default.

    The pass runs in a thread of its own, reading what ``feed`` hands it (at most
    a few blocks wait in between). More than ``max_bytes`` raises
    UploadTooLargeError at once. Not thread-safe; one per upload.
    """

    def __init__(
        self,
        name: str,
        *,
        max_bytes: int,
        spool_dir: str | os.PathLike[str] | None = None,
        layers: Layers = "all",
    ) -> None:
        self.name = name
        self.max_bytes = max_bytes
        self.received = 0
        """Bytes fed so far."""
        self._pipe = Pipe()
        self._result: Outcome | None = None
        self._error: BaseException | None = None
        body = Body(self._pipe.chunks(), name, max_bytes)

        def run() -> None:
            try:
                self._result = fingerprint_body(body, layers=layers, spool_dir=spool_dir)
            except BaseException as exc:
                self._error = exc
            finally:
                self._pipe.stop()

        self._thread = threading.Thread(target=run, name="modelhash-stream", daemon=True)
        self._thread.start()

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """The next bytes of the file."""
        n = memoryview(data).nbytes
        if not n:
            return
        if self.received + n > self.max_bytes:
            self.close()
            raise UploadTooLargeError(self.name, self.max_bytes)
        self.received += n
        if not self._pipe.put(bytes(data)):
            self._raise()

    def _raise(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error

    def finish(self) -> Outcome:
        """The outcome for the whole stream: a fingerprint, or an error with file hashes."""
        self._pipe.end()
        self._raise()
        assert self._result is not None
        return self._result

    def close(self) -> None:
        """Abandon the stream (the pass stops and drops any temporary file)."""
        if self._thread.is_alive():
            self._pipe.end(InputError("the upload was abandoned"))
            self._thread.join()
