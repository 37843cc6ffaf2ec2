"""One sequential read of a source that feeds every hasher at once.

The source is a file, or the body of an upload as it arrives (any iterable of
byte chunks, see :class:`ChunkSource`): the pass does not care which, so every
layer is computed by the same work items whatever the bytes come from. It is
read in fixed-size chunks into a small pool of alternating buffers. Each chunk is
handed to every :class:`Work` item; the items are packed into one *lane* per core
by their relative cost, and lanes run on worker threads (hashlib and blake3 release
the GIL on large buffers) while the main thread reads the next chunk. A work item
sees every chunk in file order, so it can keep running state, and never sees a
chunk after its buffer has been reused. Digests therefore do not depend on the
chunk size or the packing, which tests check.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import blake3
from threadpoolctl import threadpool_limits

try:  # ISA-L's CRC32 is about 4x zlib's; same polynomial, same answers.
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - a platform without isal wheels
    from zlib import crc32

from modelhash.errors import MalformedFileError
from modelhash.fingerprint._result import FileHashes

__all__ = [
    "CHUNK",
    "ChunkSource",
    "FileSource",
    "Source",
    "SpanHasher",
    "Work",
    "file_layer_work",
    "run_pass",
]

CHUNK = 8 * 1024 * 1024

AUTOV1_START = 0x100000
AUTOV1_END = 0x110000
AUTOV1_MIN_SIZE = 2 * 1024 * 1024

# Relative CPU cost per byte, SHA-256 (with SHA-NI) being 1.
COST_SHA256 = 1.0
COST_BLAKE3 = 0.25
COST_CRC32 = 0.05


_Queue = queue.SimpleQueue[tuple[int, int, int] | None]


@dataclass(frozen=True)
class Work:
    """A consumer of chunks, called with each chunk's file offset and bytes."""

    fn: Callable[[int, memoryview], None]
    cost: float


def _pack(works: Sequence[Work], lanes: int) -> list[Callable[[int, memoryview], None]]:
    """Longest-processing-time-first packing of work items into ``lanes`` lanes."""
    bins: list[list[Work]] = [[] for _ in range(max(1, min(lanes, len(works))))]
    loads = [0.0] * len(bins)
    for w in sorted(works, key=lambda w: -w.cost):
        i = loads.index(min(loads))
        bins[i].append(w)
        loads[i] += w.cost

    def lane(items: list[Work]) -> Callable[[int, memoryview], None]:
        fns = [w.fn for w in items]

        def run(off: int, view: memoryview) -> None:
            for fn in fns:
                fn(off, view)

        return run

    return [lane(b) for b in bins if b]


class Source(Protocol):
    """Where a pass reads from: ``readinto`` fills a buffer, returning 0 at the end."""

    def readinto(self, buf: memoryview) -> int:
        """Copy the next bytes into ``buf``; the count, 0 only at the end."""
        ...


class FileSource:
    """A file on disk, read front to back without Python-level buffering."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._fh = path.open("rb", buffering=0)
        except OSError as exc:
            raise MalformedFileError(path, f"cannot open: {exc.strerror or exc}") from None

    def readinto(self, buf: memoryview) -> int:
        try:
            return self._fh.readinto(buf) or 0
        except OSError as exc:
            raise MalformedFileError(
                self.path, f"read error: {exc.strerror or exc}"
            ) from None

    def close(self) -> None:
        self._fh.close()


class ChunkSource:
    """An iterator of byte chunks (an upload body as it arrives) seen as a source.

    ``head`` holds bytes already taken from the front of the stream (a sniffed
    header); they come first. Chunks of any size, empty ones included, give the
    same bytes, so results never depend on how the body was cut.
    """

    def __init__(self, chunks: Iterator[bytes | bytearray | memoryview], head: bytes = b"") -> None:
        self._chunks = chunks
        self._view = memoryview(head)

    def readinto(self, buf: memoryview) -> int:
        while not len(self._view):
            nxt = next(self._chunks, None)
            if nxt is None:
                return 0
            self._view = memoryview(nxt).cast("B")
        n = min(len(buf), len(self._view))
        buf[:n] = self._view[:n]
        self._view = self._view[n:]
        return n


def run_pass(
    source: Source | Path,
    size: int | None,
    works: Sequence[Work],
    *,
    chunk: int = CHUNK,
    advance: Callable[[int], None] | None = None,
    threads: int | None = None,
    buffers: int = 4,
) -> int:
    """Read ``source`` once, front to back, giving every chunk to every work item.

    A :class:`~pathlib.Path` is read as a :class:`FileSource`, and must then hold
    exactly ``size`` bytes. For any other source ``size`` may be None (unknown);
    the number of bytes read is returned either way, and the caller judges it.

    Each lane has its own queue and runs at its own pace; a buffer goes back to
    the reader once every lane is done with it, so memory stays at
    ``buffers * chunk`` bytes and no lane waits for a slower one per chunk.
    """
    path = source if isinstance(source, Path) else None
    src: Source = FileSource(source) if isinstance(source, Path) else source
    try:
        # Lanes already use every core; a multi-threaded BLAS inside a lane (the sketch
        # projections) would spin up threads of its own that fight the hashing lanes
        # (measured: all layers 4.1 s instead of 2.0 s on a 1 GiB file, 2 cores). The
        # limit is process-wide while the pass runs.
        with threadpool_limits(limits=1, user_api="blas"):
            got = _run_pass(src, works, chunk=chunk, advance=advance, threads=threads,
                            buffers=buffers)
    finally:
        if isinstance(src, FileSource):
            src.close()
    if path is not None and size is not None and got != size:
        raise MalformedFileError(path, f"file changed while reading ({got} of {size} bytes)")
    return got


def _run_pass(
    src: Source,
    works: Sequence[Work],
    *,
    chunk: int,
    advance: Callable[[int], None] | None,
    threads: int | None,
    buffers: int,
) -> int:
    lanes = _pack(works, threads or os.cpu_count() or 1)
    pool = [bytearray(chunk) for _ in range(max(2, buffers))]
    free: queue.SimpleQueue[int] = queue.SimpleQueue()
    for i in range(len(pool)):
        free.put(i)
    pending = [0] * len(pool)
    lock = threading.Lock()
    errors: list[BaseException] = []
    queues: list[_Queue] = [
        queue.SimpleQueue() for _ in lanes
    ]

    def release(i: int) -> None:
        with lock:
            pending[i] -= 1
            done = pending[i] == 0
        if done:
            free.put(i)

    def worker(lane: Callable[[int, memoryview], None], q: _Queue) -> None:
        while (item := q.get()) is not None:
            i, off, n = item
            try:
                if not errors:
                    lane(off, memoryview(pool[i])[:n])
            except BaseException as exc:  # re-raised in the reading thread
                errors.append(exc)
            finally:
                release(i)

    workers = [
        threading.Thread(target=worker, args=(lane, q), daemon=True)
        for lane, q in zip(lanes, queues, strict=True)
    ]
    for t in workers:
        t.start()
    offset = 0
    try:
        while not errors:
            i = free.get()
            n = _fill(src, pool[i])
            if n == 0:
                free.put(i)
                break
            if lanes:
                pending[i] = len(lanes)
                for q in queues:
                    q.put((i, offset, n))
            else:
                free.put(i)
            offset += n
            if advance is not None:
                advance(n)
    finally:
        for q in queues:
            q.put(None)
        for t in workers:
            t.join()
    if errors:
        raise errors[0]
    return offset


def _fill(src: Source, buf: bytearray) -> int:
    """Fill ``buf`` as far as the source allows; short only at its end."""
    view = memoryview(buf)
    got = 0
    while got < len(buf):
        n = src.readinto(view[got:])
        if not n:
            break
        got += n
    return got


@dataclass
class _FileState:
    sha256: hashlib._Hash
    blake3: blake3.blake3
    crc: int
    autov3: hashlib._Hash | None
    autov3_from: int
    autov1: bytearray
    size: int = 0


def file_layer_work(
    path: Path | str, size: int | None, autov3_offset: int | None
) -> tuple[list[Work], Callable[[], FileHashes]]:
    """Work items that compute the file layer, and a function that finishes it.

    ``size`` may be None for a stream of unknown length: the hashes count the bytes
    they see, and AutoV1 (defined only for files of 2 MiB or more) is decided at
    the end. Two SHA-256 passes (the file, and AutoV3's post-header slice) are the bulk of
    the work and are unavoidable: the model sites define both.
    """
    st = _FileState(
        sha256=hashlib.sha256(),
        blake3=blake3.blake3(),
        crc=0,
        autov3=hashlib.sha256() if autov3_offset is not None else None,
        autov3_from=autov3_offset or 0,
        autov1=bytearray(),
    )

    def sha(off: int, view: memoryview) -> None:
        st.sha256.update(view)

    def autov3(off: int, view: memoryview) -> None:
        if st.autov3 is not None and off + len(view) > st.autov3_from:
            st.autov3.update(view[max(0, st.autov3_from - off) :])

    def autov1(off: int, view: memoryview) -> None:
        st.size = off + len(view)
        if off < AUTOV1_END and off + len(view) > AUTOV1_START:
            st.autov1 += view[max(0, AUTOV1_START - off) : AUTOV1_END - off]

    def b3(off: int, view: memoryview) -> None:
        st.blake3.update(view)

    def crc(off: int, view: memoryview) -> None:
        st.crc = crc32(view, st.crc)

    def finish() -> FileHashes:
        sha = st.sha256.hexdigest()
        autov1 = None
        if st.size >= AUTOV1_MIN_SIZE:
            autov1 = hashlib.sha256(st.autov1).hexdigest()[:8]
        return FileHashes(
            path=str(path),
            size=st.size,
            sha256=sha,
            blake3=st.blake3.hexdigest(),
            crc32=st.crc.to_bytes(4, "little").hex(),
            autov1=autov1,
            autov2=sha[:10],
            autov3=st.autov3.hexdigest()[:12] if st.autov3 is not None else None,
        )

    works = [
        Work(sha, COST_SHA256),
        Work(b3, COST_BLAKE3),
        Work(crc, COST_CRC32),
        Work(autov1, 0.0),
    ]
    if autov3_offset is not None:
        works.append(Work(autov3, COST_SHA256))
    return works, finish


class SpanHasher:
    """Work that hashes many byte spans of the file, each with its own BLAKE3.

    Spans may overlap (tensors sharing a storage); each sees exactly its bytes. A
    hasher exists only while its span is being read, so memory follows the spans
    open at once, not the number of tensors in the file.
    """

    def __init__(self, spans: Sequence[tuple[int, int]]) -> None:
        self._order = sorted(range(len(spans)), key=lambda i: spans[i][0])
        self._spans = list(spans)
        self._digests: list[str | None] = [None] * len(spans)
        self._next = 0
        self._active: list[tuple[int, blake3.blake3]] = []

    def __call__(self, off: int, view: memoryview) -> None:
        end = off + len(view)
        while self._next < len(self._order):
            i = self._order[self._next]
            if self._spans[i][0] >= end:
                break
            self._active.append((i, blake3.blake3()))
            self._next += 1
        still: list[tuple[int, blake3.blake3]] = []
        for i, h in self._active:
            start, length = self._spans[i]
            stop = start + length
            lo, hi = max(start, off), min(stop, end)
            if hi > lo:
                h.update(view[lo - off : hi - off])
            if stop > end:
                still.append((i, h))
            else:
                self._digests[i] = h.hexdigest()
        self._active = still

    def hexdigests(self) -> list[str]:
        """The BLAKE3 of each span, in the order the spans were given."""
        for i, h in self._active:
            self._digests[i] = h.hexdigest()
        out: list[str] = []
        for d, (_, length) in zip(self._digests, self._spans, strict=True):
            if d is None:
                if length:
                    raise ValueError("a tensor span was never read")
                d = blake3.blake3().hexdigest()
            out.append(d)
        return out
