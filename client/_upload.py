"""Upload hooks: fingerprint an upload while it streams in, then decide on it.

Example, in any web framework that hands you the body as chunks::

    from modelhash import RegistryClient, scan_upload

    registry = RegistryClient()                      # once per process: a connection pool

    verdict = scan_upload(chunks, name="model.safetensors", checker=registry,
                          max_bytes=20 * 2**30, unreachable="fail-closed")
    if not verdict.allow:
        reject(verdict.reason)

Every layer is computed by default, the sketch included, so re-saves, casts,
merges, converted and baked LoRAs of a flagged model are caught, not only its exact
bytes. A safetensors upload is fingerprinted by the engine's one pass as it
arrives, with no temporary file; other formats are spooled to a temporary file
(never more than ``max_bytes``) and go through the same pass. Only fingerprints go
to the registry, never the weights. ``layers="exact"`` skips the sketch; the
verdict then says ``layers: "exact"`` so nobody takes it for a full check.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
from collections.abc import AsyncIterable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Literal, TypeVar

from modelhash._async import AsyncRegistryClient
from modelhash._client import RegistryClient
from modelhash._policy import Unreachable, unchecked
from modelhash._scan import Checker, check_maps, layers_for
from modelhash._stream import Body, Pipe, chunks_of, fingerprint_body, fingerprint_parts
from modelhash.errors import RegistryError
from modelhash.fingerprint import FileHashes, Layers, ModelFingerprint, Outcome
from modelhash.wire import CheckResult, Match

__all__ = [
    "DEFAULT_MAX_UPLOAD",
    "UploadVerdict",
    "scan_upload",
    "scan_upload_async",
    "scan_upload_parts",
]

DEFAULT_MAX_UPLOAD = 64 * 1024**3
T = TypeVar("T")

Verdict = Literal["match", "clean", "error", "unchecked"]


@dataclass(frozen=True)
class UploadVerdict:
    """What became of one upload, and whether to accept it.

    ``verdict``: ``match`` (a flagged model), ``clean``, ``error`` (not a weight file
    we can read safely: hostile, broken or unsupported) or ``unchecked`` (the
    registry was down). ``allow`` applies the caller's choices: never for a match,
    always for a clean model, ``not reject_unreadable`` for an error, and the
    ``unreachable`` policy when unchecked. ``recheck`` asks for a later re-check.
    """

    name: str
    size: int
    verdict: Verdict
    allow: bool
    recheck: bool = False
    fingerprint: ModelFingerprint | None = None
    files: list[FileHashes] = field(default_factory=list)
    matches: list[Match] = field(default_factory=list)
    error: str | None = None
    reason: str = ""
    layers: Layers = "all"
    """``all``: every layer was checked; ``exact``: only the exact layers (asked for)."""

    def to_json(self) -> dict[str, Any]:
        """A JSON form for logs and API answers (the ``check --json`` fields, and more)."""
        shown = self.fingerprint.summary() if self.fingerprint is not None else (
            {"sha256": self.files[0].sha256} if len(self.files) == 1 else {}
        )
        return {
            "path": self.name,
            "size": self.size,
            "verdict": self.verdict,
            "allow": self.allow,
            "recheck": self.recheck,
            "fingerprint": shown,
            "matches": [m.model_dump(mode="json") for m in self.matches],
            "error": self.error,
            "reason": self.reason,
            "layers": self.layers,
        }


def _verdict(
    outcome: Outcome,
    size: int,
    results: list[CheckResult] | None,
    failure: RegistryError | None,
    unreachable: Unreachable | str,
    reject_unreadable: bool,
    layers: Layers,
) -> UploadVerdict:
    error = outcome.error.diagnostics() if outcome.error is not None else None
    base: dict[str, Any] = {
        "name": outcome.path,
        "size": size,
        "layers": layers,
        "fingerprint": outcome.fingerprint if outcome.error is None else None,
        "files": list(outcome.files),
        "error": error,
    }
    if failure is not None:
        decision = unchecked(failure, unreachable)
        return UploadVerdict(
            verdict="unchecked", allow=decision.allow, recheck=True,
            reason=f"not checked ({unreachable}): {failure.diagnostics()}", **base,
        )
    results = results or []
    matches: dict[str, Match] = {}
    for r in results:
        for m in r.matches:
            matches.setdefault(m.flag_id, m)
    if any(r.verdict == "match" for r in results):
        counted = [m for m in matches.values() if m.status != "revoked"]
        what = ", ".join(f"{m.category} flag {m.flag_id}" for m in counted)
        return UploadVerdict(verdict="match", allow=False, matches=list(matches.values()),
                             reason=f"matches {what}", **base)
    if error is not None:
        return UploadVerdict(verdict="error", allow=not reject_unreadable,
                             matches=list(matches.values()), reason=error, **base)
    reason = "not flagged" if layers == "all" else "not flagged (exact layers only)"
    return UploadVerdict(verdict="clean", allow=True, matches=list(matches.values()),
                         reason=reason, **base)


def _check(checker: Checker | None, outcomes: Sequence[Outcome]) -> tuple[
    list[list[CheckResult]] | None, RegistryError | None
]:
    """Ask the list about every outcome at once; the failure if it cannot answer."""
    own = checker is None
    active: Checker = RegistryClient() if checker is None else checker
    maps = [check_maps(o)[1] for o in outcomes]
    try:
        flat = [m for ms in maps for m in ms]
        answers = active.check(flat) if flat else []
    except RegistryError as exc:
        return None, exc
    finally:
        if own:
            assert isinstance(active, RegistryClient)
            active.close()
    out, pos = [], 0
    for ms in maps:
        out.append(answers[pos : pos + len(ms)])
        pos += len(ms)
    return out, None


def scan_upload(
    stream: Iterable[bytes] | BinaryIO,
    *,
    name: str,
    checker: Checker | None = None,
    max_bytes: int = DEFAULT_MAX_UPLOAD,
    unreachable: Unreachable | str = Unreachable.FAIL_CLOSED,
    reject_unreadable: bool = True,
    spool_dir: str | os.PathLike[str] | None = None,
    layers: Layers = "all",
) -> UploadVerdict:
    """Fingerprint ``stream`` (bytes chunks, or a binary file object) and check it.

    ``checker`` is a :class:`RegistryClient` (pass one shared client) or an offline
    :class:`MirrorIndex`; by default a client is made from the environment. Every
    layer is computed unless ``layers="exact"``. Raises UploadTooLargeError past
    ``max_bytes`` (having read no further), and RegistryError only for errors the
    ``unreachable`` policy does not cover (a bad API key).
    """
    layers = layers_for(checker, layers)
    body = Body(iter(chunks_of(stream)), name, max_bytes)
    outcome = fingerprint_body(body, layers=layers, spool_dir=spool_dir)
    results, failure = _check(checker, [outcome])
    return _verdict(outcome, body.received, results[0] if results else None, failure,
                    unreachable, reject_unreadable, layers)


def scan_upload_parts(
    parts: Sequence[tuple[str, Iterable[bytes] | BinaryIO]],
    *,
    checker: Checker | None = None,
    max_bytes: int = DEFAULT_MAX_UPLOAD,
    unreachable: Unreachable | str = Unreachable.FAIL_CLOSED,
    reject_unreadable: bool = True,
    spool_dir: str | os.PathLike[str] | None = None,
    layers: Layers = "all",
) -> list[UploadVerdict]:
    """:func:`scan_upload` for an upload of several files (a multi-file form): the
    parts, named by relative path, are read as the folder they make, so shards with
    their index or a diffusers layout are fingerprinted as one model. One verdict
    per model found; ``max_bytes`` applies to each part.
    """
    layers = layers_for(checker, layers)
    bodies = [(n, Body(iter(chunks_of(s)), n, max_bytes)) for n, s in parts]
    outcomes = fingerprint_parts(bodies, layers=layers, spool_dir=spool_dir)
    results, failure = _check(checker, outcomes)
    total = sum(b.received for _, b in bodies)
    sizes = {n: b.received for n, b in bodies}
    return [
        _verdict(o, sizes.get(o.path, total), results[i] if results else None, failure,
                 unreachable, reject_unreadable, layers)
        for i, o in enumerate(outcomes)
    ]


async def _in_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` in a thread of its own (not the loop's executor, which a long pass
    would occupy), awaiting its result without blocking the loop."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, exc: BaseException | None) -> None:
        if done.cancelled():
            return
        if exc is not None:
            done.set_exception(exc)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result = fn()
        except BaseException as exc:
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=run, name="modelhash-upload", daemon=True).start()
    return await done


async def scan_upload_async(
    stream: AsyncIterable[bytes] | Iterable[bytes] | BinaryIO,
    *,
    name: str,
    checker: AsyncRegistryClient | Checker | None = None,
    max_bytes: int = DEFAULT_MAX_UPLOAD,
    unreachable: Unreachable | str = Unreachable.FAIL_CLOSED,
    reject_unreadable: bool = True,
    spool_dir: str | os.PathLike[str] | None = None,
    layers: Layers = "all",
) -> UploadVerdict:
    """:func:`scan_upload` for ASGI apps. The pass runs in a worker thread and reads
    the body as the event loop receives it (a few MiB in flight at most), so the
    loop keeps serving other requests and nothing waits for the whole body."""
    layers = layers_for(checker, layers)
    pipe = Pipe()
    body = Body(pipe.chunks(), name, max_bytes)

    def work() -> Outcome:
        try:
            return fingerprint_body(body, layers=layers, spool_dir=spool_dir)
        finally:
            pipe.stop()

    running = asyncio.ensure_future(_in_thread(work))
    try:
        await pipe.pump(stream)
    except BaseException:
        pipe.stop()
        await asyncio.gather(running, return_exceptions=True)
        raise
    outcome = await running
    own = checker is None
    active: AsyncRegistryClient | Checker = AsyncRegistryClient() if checker is None else checker
    results, failure = None, None
    maps = check_maps(outcome)[1]
    try:
        if not maps:
            results = []
        elif isinstance(active, AsyncRegistryClient):
            results = await active.check(maps)
        else:
            got = await asyncio.to_thread(active.check, maps)
            results = await got if inspect.isawaitable(got) else got
    except RegistryError as exc:
        failure = exc
    finally:
        if own:
            assert isinstance(active, AsyncRegistryClient)
            await active.aclose()
    return _verdict(outcome, body.received, results, failure, unreachable, reject_unreadable,
                    layers)
