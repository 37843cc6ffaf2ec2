"""Upload hooks: fingerprint an upload while it streams in, then decide on it.

Example, in any web framework that hands you the body as chunks::

    from modelhash import RegistryClient, scan_upload

    registry = RegistryClient()                      # once per process: a connection pool

    verdict = scan_upload(chunks, name="model.safetensors", checker=registry,
                          max_bytes=20 * 2**30, unreachable="fail-closed")
    if not verdict.allow:
        reject(verdict.reason)

A safetensors upload is fingerprinted in one pass with no temporary file; other
formats are spooled to a temporary file (never more than ``max_bytes``). Only
fingerprints go to the registry, never the weights.
"""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import AsyncIterable, Iterable
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Literal

from modelhash._async import AsyncRegistryClient
from modelhash._client import RegistryClient
from modelhash._policy import Unreachable, unchecked
from modelhash._scan import Checker, check_maps
from modelhash._stream import StreamFingerprinter
from modelhash.errors import RegistryError
from modelhash.fingerprint import FileHashes, ModelFingerprint, Outcome
from modelhash.wire import CheckResult, Match

__all__ = ["DEFAULT_MAX_UPLOAD", "UploadVerdict", "scan_upload", "scan_upload_async"]

DEFAULT_MAX_UPLOAD = 64 * 1024**3
_CHUNK = 1024 * 1024

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
        }


def _verdict(
    outcome: Outcome,
    size: int,
    results: list[CheckResult] | None,
    failure: RegistryError | None,
    unreachable: Unreachable | str,
    reject_unreadable: bool,
) -> UploadVerdict:
    error = outcome.error.diagnostics() if outcome.error is not None else None
    base: dict[str, Any] = {
        "name": outcome.path,
        "size": size,
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
    return UploadVerdict(verdict="clean", allow=True, matches=list(matches.values()),
                         reason="not flagged", **base)


def _chunks(stream: Iterable[bytes] | BinaryIO) -> Iterable[bytes]:
    read = getattr(stream, "read", None)
    if read is None:
        yield from stream
        return
    while block := read(_CHUNK):
        yield block


def scan_upload(
    stream: Iterable[bytes] | BinaryIO,
    *,
    name: str,
    checker: Checker | None = None,
    max_bytes: int = DEFAULT_MAX_UPLOAD,
    unreachable: Unreachable | str = Unreachable.FAIL_CLOSED,
    reject_unreadable: bool = True,
    spool_dir: str | os.PathLike[str] | None = None,
) -> UploadVerdict:
    """Fingerprint ``stream`` (bytes chunks, or a binary file object) and check it.

    ``checker`` is a :class:`RegistryClient` (pass one shared client) or an offline
    :class:`MirrorIndex`; by default a client is made from the environment. Raises
    UploadTooLargeError past ``max_bytes`` (having read no further), and
    RegistryError only for errors the ``unreachable`` policy does not cover (a bad
    API key).
    """
    fp = StreamFingerprinter(name, max_bytes=max_bytes, spool_dir=spool_dir)
    try:
        for block in _chunks(stream):
            fp.feed(block)
        outcome = fp.finish()
    finally:
        fp.close()
    own = checker is None
    active: Checker = RegistryClient() if checker is None else checker
    results, failure = None, None
    try:
        results = active.check(check_maps(outcome)[1]) if outcome.files else []
    except RegistryError as exc:
        failure = exc
    finally:
        if own:
            assert isinstance(active, RegistryClient)
            active.close()
    return _verdict(outcome, fp.received, results, failure, unreachable, reject_unreadable)


async def scan_upload_async(
    stream: AsyncIterable[bytes] | Iterable[bytes] | BinaryIO,
    *,
    name: str,
    checker: AsyncRegistryClient | Checker | None = None,
    max_bytes: int = DEFAULT_MAX_UPLOAD,
    unreachable: Unreachable | str = Unreachable.FAIL_CLOSED,
    reject_unreadable: bool = True,
    spool_dir: str | os.PathLike[str] | None = None,
) -> UploadVerdict:
    """:func:`scan_upload` for ASGI apps: hashing runs in a worker thread, 1 MiB at a
    time, so the event loop keeps serving other requests."""
    fp = StreamFingerprinter(name, max_bytes=max_bytes, spool_dir=spool_dir)
    pending = bytearray()
    try:
        if isinstance(stream, AsyncIterable):
            async for block in stream:
                pending += block
                if len(pending) >= _CHUNK:
                    data, pending = bytes(pending), bytearray()
                    await asyncio.to_thread(fp.feed, data)
        else:
            for block in _chunks(stream):
                await asyncio.to_thread(fp.feed, block)
        if pending:
            await asyncio.to_thread(fp.feed, bytes(pending))
        outcome = await asyncio.to_thread(fp.finish)
    finally:
        fp.close()
    own = checker is None
    active: AsyncRegistryClient | Checker = AsyncRegistryClient() if checker is None else checker
    results, failure = None, None
    maps = check_maps(outcome)[1]
    try:
        if not outcome.files:
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
    return _verdict(outcome, fp.received, results, failure, unreachable, reject_unreadable)
