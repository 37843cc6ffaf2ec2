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

import contextlib
import functools
import hashlib
import mmap
import os
import queue
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import blake3

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
    "SpanCopier",
    "SpanHasher",
    "Work",
    "file_layer_work",
    "run_pass",
]

CHUNK = 8 * 1024 * 1024

AUTOV1_START = 0x100000
AUTOV1_END = 0x110000
AUTOV1_MIN_SIZE = 2 * 1024 * 1024

# Relative CPU cost per byte, SHA-256 being 1. BLAKE3's and CRC32's depend on the
# vector units (BLAKE3 is about 0.25 of SHA-NI's cost with AVX-512, 0.5 with AVX2
# alone), so they are measured once per process (see relative_costs); these are the
# values used if that measurement cannot be made.
COST_SHA256 = 1.0
COST_BLAKE3 = 0.25
COST_CRC32 = 0.05


@functools.cache
def relative_costs() -> tuple[float, float]:
    """BLAKE3's and CRC32's CPU cost per byte relative to SHA-256's, on this machine.

    Timed on 1 MiB (best of three; about 3 ms in all). Only the packing of work
    into lanes uses it, never a digest.
    """
    block = bytes(range(256)) * 4096
    times = []
    for fn in (lambda: hashlib.sha256(block), lambda: blake3.blake3(block),
               lambda: crc32(block)):
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        times.append(best)
    sha, b3, crc = times
    if not sha > 0:
        return COST_BLAKE3, COST_CRC32
    return min(2.0, max(0.05, b3 / sha)), min(1.0, max(0.01, crc / sha))


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
    """Where a pass reads from: ``readinto`` fills a buffer, returning 0 at the end.

    A source may also have ``view(limit)``: the next up to ``limit`` bytes as a
    buffer that stays valid and unchanged while the pass holds it, without a copy;
    None when it cannot give one now (the pass then copies through ``readinto``),
    and an empty buffer at the end.
    """

    def readinto(self, buf: memoryview) -> int:
        """Copy the next bytes into ``buf``; the count, 0 only at the end."""
        ...


MAP_MIN_BYTES = 16 * 1024 * 1024
"""Files smaller than this are read, not mapped: mapping saves nothing there."""

# Filesystems whose pages are local (``overlay``: a container's layers): a mapped page
# of one of them fails only if the file is cut short while the pass reads it, or the
# disk itself fails. On a network or FUSE filesystem a failed read of a mapped page,
# which is routine there, kills the process (SIGBUS) instead of raising, so those
# are read with ``readinto``, which turns every failure into an error.
LOCAL_FILESYSTEMS = frozenset({
    "ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "ramfs", "f2fs", "zfs", "bcachefs",
    "jfs", "reiserfs", "hfsplus", "apfs", "overlay",
})


def _filesystem(dev: int) -> str | None:
    """The type of the mounted filesystem whose device is ``dev``, if Linux says
    (elsewhere None: files are then read, never mapped)."""
    if not sys.platform.startswith("linux"):
        return None
    want = f"{os.major(dev)}:{os.minor(dev)}"
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                fields = line.split()
                if len(fields) > 3 and fields[2] == want and "-" in fields:
                    at = fields.index("-")
                    return fields[at + 1] if at + 1 < len(fields) else None
    except OSError:
        return None
    return None


def may_map(st: os.stat_result) -> bool:
    """Whether a regular file with this stat is read through a memory map.

    ``MODELHASH_NO_MMAP=1`` turns mapping off (every file is then copied through a
    buffer: slower, never a SIGBUS, whatever another process does to the file).
    """
    if os.environ.get("MODELHASH_NO_MMAP", "") not in ("", "0"):
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_size < MAP_MIN_BYTES:
        return False
    return _filesystem(st.st_dev) in LOCAL_FILESYSTEMS


class FileSource:
    """A file on disk, read front to back: through a read-only memory map where
    :func:`may_map` allows it (no copy), else without Python-level buffering."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._fh = path.open("rb", buffering=0)
        except OSError as exc:
            raise MalformedFileError(path, f"cannot open: {exc.strerror or exc}") from None
        self._map: mmap.mmap | None = None
        self._mv: memoryview | None = None
        self._pos = 0
        self._populate = True
        try:
            st = os.fstat(self._fh.fileno())
            if may_map(st):
                self._map = mmap.mmap(self._fh.fileno(), st.st_size, prot=mmap.PROT_READ)
                self._map.madvise(mmap.MADV_SEQUENTIAL)
                self._mv = memoryview(self._map)
        except (OSError, ValueError):  # not mappable after all: read it
            self._map = self._mv = None

    def view(self, limit: int) -> memoryview | None:
        if self._mv is None:
            return None
        out = self._mv[self._pos : self._pos + limit]
        if len(out) and os.fstat(self._fh.fileno()).st_size < self._pos + len(out):
            # Cut short since it was mapped: its missing pages would be a SIGBUS. The
            # check narrows that to a race with the lanes reading this chunk.
            raise MalformedFileError(self.path, "file changed while reading (truncated)")
        if self._populate and len(out):
            # Map the chunk's pages here, in the reading thread, which is otherwise
            # idle, rather than by page faults in the lanes that hash it.
            start = self._pos - self._pos % mmap.PAGESIZE
            try:
                self._map.madvise(MADV_POPULATE_READ, start, self._pos + len(out) - start)  # type: ignore[union-attr]
            except OSError:  # a kernel before 5.14: the lanes fault the pages in
                self._populate = False
        self._pos += len(out)
        return out

    def done(self, offset: int, length: int) -> None:
        """The pass is finished with bytes ``offset:offset+length`` of a lent view:
        drop their pages from this process's map (they stay in the page cache), so
        its resident memory stays at the chunks in flight, not the file's size."""
        if self._map is None or not length:
            return
        start = offset - offset % mmap.PAGESIZE
        stop = offset + length
        if stop < self._map.size():  # a partial last page may still be read
            stop -= stop % mmap.PAGESIZE
        if stop > start:
            with contextlib.suppress(OSError, ValueError):
                self._map.madvise(mmap.MADV_DONTNEED, start, stop - start)

    def readinto(self, buf: memoryview) -> int:
        if self._mv is not None:  # a mapped file is read from the map, in step
            got = self.view(len(buf))
            assert got is not None
            buf[: len(got)] = got
            return len(got)
        try:
            return self._fh.readinto(buf) or 0
        except OSError as exc:
            raise MalformedFileError(
                self.path, f"read error: {exc.strerror or exc}"
            ) from None

    def close(self) -> None:
        if self._mv is not None:
            self._mv.release()
            self._mv = None
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a view still held: freed with it
                self._map.close()
            self._map = None
        self._fh.close()


MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
"""Linux's madvise advice (5.14 and later) that maps a range's pages in advance."""

ZERO_COPY_MIN = 256 * 1024
"""Body chunks at least this large are passed on without a copy; smaller ones are
gathered into a buffer, so the pass never handles many tiny pieces."""


class ChunkSource:
    """An iterator of byte chunks (an upload body as it arrives) seen as a source.

    ``head`` holds bytes already taken from the front of the stream (a sniffed
    header); they come first. Chunks of any size, empty ones included, give the
    same bytes, so results never depend on how the body was cut. A chunk that is
    ``bytes`` (immutable) and large is handed to the pass as it is (:meth:`view`);
    anything else is copied, since its producer may reuse the buffer.
    """

    def __init__(self, chunks: Iterator[bytes | bytearray | memoryview], head: bytes = b"") -> None:
        self._chunks = chunks
        self._view = memoryview(head)
        self._immutable = True
        self._ended = False

    def _next(self) -> bool:
        nxt = next(self._chunks, None)
        if nxt is None:
            self._ended = True
            return False
        self._view = memoryview(nxt).cast("B")
        self._immutable = isinstance(nxt, bytes)
        return True

    def view(self, limit: int) -> memoryview | None:
        while not len(self._view):
            if self._ended or not self._next():
                return self._view[:0]
        if not self._immutable or len(self._view) < min(limit, ZERO_COPY_MIN):
            return None
        out = self._view[:limit]
        self._view = self._view[len(out) :]
        return out

    def readinto(self, buf: memoryview) -> int:
        while not len(self._view):
            if self._ended or not self._next():
                return 0
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
        # limit is process-wide while the pass runs. Without numpy loaded no work item
        # can reach a BLAS, and the exact layers skip loading threadpoolctl at all.
        limit: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
        if "numpy" in sys.modules:
            from threadpoolctl import threadpool_limits

            limit = threadpool_limits(limits=1, user_api="blas")
        with limit:
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
    slots = max(2, buffers)
    # A slot holds either a view the source lent (no copy) or a view of its own
    # buffer, made on first use, so a pass that copies nothing allocates nothing.
    pool: list[bytearray | None] = [None] * slots
    views: list[memoryview | None] = [None] * slots
    free: queue.SimpleQueue[int] = queue.SimpleQueue()
    for i in range(slots):
        free.put(i)
    pending = [0] * slots
    lock = threading.Lock()
    errors: list[BaseException] = []
    queues: list[_Queue] = [
        queue.SimpleQueue() for _ in lanes
    ]
    lend: Callable[[int], memoryview | None] | None = getattr(src, "view", None)
    forget: Callable[[int, int], None] | None = getattr(src, "done", None)
    lent: list[tuple[int, int] | None] = [None] * slots

    def release(i: int) -> None:
        with lock:
            pending[i] -= 1
            done = pending[i] == 0
        if done:
            views[i] = None  # drop a lent view: the source may free what it shows
            span = lent[i]
            if span is not None and forget is not None:
                lent[i] = None
                forget(*span)
            free.put(i)

    def worker(lane: Callable[[int, memoryview], None], q: _Queue) -> None:
        while (item := q.get()) is not None:
            i, off, n = item
            try:
                if not errors:
                    view = views[i]
                    assert view is not None and len(view) == n
                    lane(off, view)
            except BaseException as exc:  # re-raised in the reading thread
                errors.append(exc)
            finally:
                release(i)

    def take(i: int, offset: int) -> memoryview:
        got = lend(chunk) if lend is not None else None
        if got is not None:
            lent[i] = (offset, len(got))
            return got
        buf = pool[i]
        if buf is None:
            buf = pool[i] = bytearray(chunk)
        return memoryview(buf)[: _fill(src, buf)]

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
            view = take(i, offset)
            n = len(view)
            if n == 0:
                free.put(i)
                break
            if lanes:
                views[i] = view
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
        views[:] = [None] * slots
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

    cost_b3, cost_crc = relative_costs()
    works = [
        Work(sha, COST_SHA256),
        Work(b3, cost_b3),
        Work(crc, cost_crc),
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


class SpanCopier:
    """Work that copies a few named byte spans of the source as they pass.

    For bytes a later step needs after a stream has gone by: the weight scales the
    sketch reads back, the matrices the invariant layer measures. The copies are
    exact whichever chunks the spans are cut into; memory is the spans' total size.
    """

    def __init__(self, spans: Mapping[str, tuple[int, int]]) -> None:
        self.spans = dict(spans)
        self.data = {name: bytearray(length) for name, (_, length) in spans.items()}

    def __call__(self, off: int, view: memoryview) -> None:
        end = off + len(view)
        for name, (start, length) in self.spans.items():
            lo, hi = max(start, off), min(start + length, end)
            if hi > lo:
                self.data[name][lo - start : hi - start] = view[lo - off : hi - off]
