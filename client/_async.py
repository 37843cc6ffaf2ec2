"""The asynchronous registry client: :class:`RegistryClient`'s methods, awaited.

Example::

    from modelhash import AsyncRegistryClient

    async with AsyncRegistryClient() as registry:
        results = await registry.check([fingerprint.summary()])

Create one per process (or per event loop) and reuse it: it keeps a connection pool.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import httpx

from modelhash import _analyst, _calls
from modelhash._calls import Call, Checkable, check_batches, check_items, decode
from modelhash._policy import Decision, Unreachable, decide, unchecked
from modelhash._requests import (
    DEFAULT_TIMEOUT,
    PAGE,
    base_body,
    client_options,
    flag_body,
    hash_candidates,
    transport_reason,
)
from modelhash._retry import Retry
from modelhash._scan import PathResult, check_maps, check_outcomes, expand, fingerprint_all
from modelhash.errors import RegistryError, RegistryUnreachableError
from modelhash.fingerprint import Layers, ModelFingerprint
from modelhash.wire import (
    AuditRecord,
    BasePublic,
    ChangeEvent,
    ChangesPage,
    CheckResult,
    FlagDetail,
    FlagPage,
    ImportResult,
    KeyCreated,
    KeyPublic,
    LookupResult,
    PublicKey,
    RangeResult,
    ReportPublic,
    SignedExport,
)

__all__ = ["AsyncRegistryClient"]

T = TypeVar("T")


class AsyncRegistryClient:
    """Talks to a modelhash registry over HTTP; an async context manager.

    ``registry`` and ``api_key`` default to ``MODELHASH_REGISTRY`` and
    ``MODELHASH_API_KEY``. ``timeout`` is in seconds (or an ``httpx.Timeout``);
    ``retry`` the :class:`~client.Retry` policy; ``transport`` replaces the network
    (tests pass ``httpx.MockTransport``).
    """

    def __init__(
        self,
        registry: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        retry: Retry | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        options = client_options(registry, api_key, timeout)
        self.registry: str = options["base_url"]
        self.retry = retry or Retry()
        self._sleep = sleep
        self._http = httpx.AsyncClient(transport=transport, **options)

    async def __aenter__(self) -> AsyncRegistryClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def _run(self, call: Call[T]) -> T:
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await self._http.request(
                    call.method, call.path, json=call.body, params=call.params
                )
            except httpx.TransportError as exc:
                if attempt < self.retry.attempts and self.retry.retry_exception(
                    exc, idempotent=call.idempotent
                ):
                    await self._sleep(self.retry.delay(attempt))
                    continue
                raise RegistryUnreachableError(
                    call.method, self.registry + call.path, transport_reason(exc)
                ) from None
            if attempt < self.retry.attempts and self.retry.retry_status(
                response.status_code, idempotent=call.idempotent
            ):
                await response.aclose()
                await self._sleep(self.retry.delay(attempt, response))
                continue
            return decode(call, response)

    # Checks and lookups

    async def check(self, fingerprints: Iterable[Checkable]) -> list[CheckResult]:
        """Check models against the list: one result per fingerprint, in order.

        Each fingerprint is a :class:`~modelhash.fingerprint.ModelFingerprint`, a
        file's :class:`~modelhash.fingerprint.FileHashes`, or a ``summary()``-style map;
        each needs a strong hash (sha256, blake3 or content). Batches larger than the
        registry's limit are split; ``index`` in the answers counts across batches.
        """
        items = check_items(fingerprints)
        out: list[CheckResult] = []
        for batch in check_batches(items):
            for r in await self._run(_calls.check(batch)):
                out.append(r.model_copy(update={"index": len(out)}))
        return out

    async def check_paths(
        self,
        paths: Sequence[str | os.PathLike[str]],
        *,
        recursive: bool = False,
        workers: int = 1,
        layers: Layers = "all",
    ) -> list[PathResult]:
        """Fingerprint local files or model folders (in a worker thread) and check
        them. Every layer by default, so derivatives of flagged models match;
        ``layers="exact"`` sends only exact hashes and the results say so."""
        outcomes = [o for group in await asyncio.to_thread(
            fingerprint_all, expand(paths, recursive=recursive), workers=workers, layers=layers
        ) for o in group]
        flat = [m for o in outcomes for m in check_maps(o)[1]]
        answers = await self.check(flat) if flat else []
        return check_outcomes(outcomes, _Answered(answers), layers=layers)

    async def screen(
        self,
        fingerprints: Iterable[Checkable],
        *,
        unreachable: Unreachable | str = Unreachable.FAIL_CLOSED,
    ) -> list[Decision]:
        """Like :meth:`check`, but decide: block matches, allow clean models, and on a
        registry outage hold (``fail-closed``) or allow and mark for re-check
        (``fail-open``) every model. Non-outage errors (a bad key) still raise."""
        items = check_items(fingerprints)
        try:
            return [decide(r) for r in await self.check(items)]
        except RegistryError as exc:
            return [unchecked(exc, unreachable) for _ in items]

    async def lookup(self, algorithm: str, value: str) -> LookupResult:
        """Look one hash up by algorithm name (or wire key) and value."""
        return await self._run(_calls.lookup(algorithm, value))

    async def lookup_hash(self, text: str) -> list[LookupResult]:
        """Look up a pasted hash in any accepted form; bare hex tries every reading."""
        return [await self.lookup(d.algorithm, d.hex) for d in hash_candidates(text)]

    async def range(self, algorithm: str, prefix: str) -> RangeResult:
        """k-anonymity: flagged values starting with a 5-hex-digit prefix, among decoys."""
        return await self._run(_calls.range_query(algorithm, prefix))

    # Flags

    async def flag(
        self,
        fingerprint: ModelFingerprint | Mapping[str, str],
        *,
        category: str,
        severity: str = "high",
        note: str | None = None,
        evidence: str | None = None,
        force: bool = False,
    ) -> FlagDetail:
        """Flag a model (submitters). Flagging a flagged model returns its existing flag."""
        body = flag_body(fingerprint, category, severity, note, evidence, force)
        return await self._run(_calls.create_flag(body))

    async def get_flag(self, flag_id: str) -> FlagDetail:
        """One flag (redacted for readers)."""
        return await self._run(_calls.get_flag(flag_id))

    async def list_flags(self, *, status: str | None = None) -> AsyncIterator[FlagDetail]:
        """Every flag, newest first, fetched a page at a time (submitters)."""
        offset = 0
        while True:
            page = await self._run(_calls.list_flags(status, PAGE, offset))
            for flag in page:
                yield flag
            if len(page) < PAGE:
                return
            offset += len(page)

    async def revoke(self, flag_id: str, *, reason: str) -> FlagDetail:
        """Revoke a flag (admins); checks stop matching it at once."""
        return await self._run(_calls.flag_action(flag_id, "revoke", reason))

    async def dispute(self, flag_id: str, *, reason: str) -> FlagDetail:
        """Dispute a flag (submitters); it still matches until an admin decides."""
        return await self._run(_calls.flag_action(flag_id, "dispute", reason))

    async def confirm(self, flag_id: str, *, reason: str) -> FlagDetail:
        """Record agreement with a flag (submitters)."""
        return await self._run(_calls.flag_action(flag_id, "confirm", reason))

    async def reinstate(self, flag_id: str, *, reason: str) -> FlagDetail:
        """Make a disputed or revoked flag active again (admins)."""
        return await self._run(_calls.flag_action(flag_id, "reinstate", reason))

    # Analyst work

    async def search_flags(
        self, *, limit: int = PAGE, offset: int = 0, **filters: Any
    ) -> FlagPage:
        """One page of a flag search, with the total (submitters).

        Filters: ``q`` (any hash form, a flag id, or note text), ``status``,
        ``category``, ``severity``, ``submitter``, ``since``, ``until`` (aware
        datetimes) and ``reported``; the registry refuses unknown ones.
        """
        return await self._run(_analyst.search_flags(filters, limit, offset))

    async def audit(self, flag_id: str) -> list[AuditRecord]:
        """A flag's audit trail (admins, and the flag's own submitter)."""
        return await self._run(_analyst.audit(flag_id))

    async def report(self, flag_id: str, *, kind: str, note: str | None = None) -> ReportPublic:
        """Report a suspected ``false-positive`` or a ``confirmed-hit`` (any key)."""
        return await self._run(_analyst.report(flag_id, kind, note))

    async def reports(self, flag_id: str | None = None) -> list[ReportPublic]:
        """Reports on one flag, or the newest reports on all (submitters)."""
        return await self._run(_analyst.reports(flag_id))

    async def import_flags(
        self, text: str, *, format: str = "csv", category: str | None = None,
        severity: str | None = None, batch: int = _analyst.IMPORT_BATCH,
    ) -> ImportResult:
        """Flag every row of a CSV or a plain hash list, in batches; a result per row."""
        parts = []
        for part, first in _analyst.import_batches(text, format, batch):
            request = _analyst.import_request(part, format, category, severity, first)
            parts.append(await self._run(_analyst.import_call(request)))
        return _analyst.merge_results(parts)

    async def export_csv(self, **filters: Any) -> str:
        """Every flag matching the filters (as :meth:`search_flags`), as CSV text."""
        return await self._run(_analyst.export_csv(filters))

    # Bases and keys

    async def add_base(
        self,
        fingerprint: ModelFingerprint | Mapping[str, str],
        *,
        name: str,
        description: str | None = None,
    ) -> BasePublic:
        """Register a reference base (admins): a public model that is never flagged."""
        return await self._run(_calls.add_base(base_body(fingerprint, name, description)))

    async def list_bases(self) -> list[BasePublic]:
        """Every reference base."""
        return await self._run(_calls.list_bases())

    async def create_key(self, *, role: str, name: str | None = None) -> KeyCreated:
        """Make an API key (admins); its secret is in the answer only."""
        return await self._run(_calls.create_key(role, name))

    async def list_keys(self) -> list[KeyPublic]:
        """Every API key, without secrets (admins)."""
        return await self._run(_calls.list_keys())

    async def revoke_key(self, key_id: int) -> KeyPublic:
        """Revoke an API key at once (admins)."""
        return await self._run(_calls.revoke_key(key_id))

    # Mirrors

    async def changes(self, since: int = 0, *, limit: int = 500) -> ChangesPage:
        """One page of the change feed after cursor ``since``."""
        return await self._run(_calls.changes(since, limit))

    async def iter_changes(self, since: int = 0) -> AsyncIterator[ChangeEvent]:
        """Every change after ``since``, following pages until the feed is drained."""
        while True:
            page = await self.changes(since)
            for change in page.changes:
                yield change
            if not page.has_more or page.next_cursor <= since:
                return
            since = page.next_cursor

    async def export(self) -> SignedExport:
        """The signed export of the whole list (verify it before use)."""
        return await self._run(_calls.export())

    async def public_key(self) -> PublicKey:
        """The key exports are signed with; pin it."""
        return await self._run(_calls.public_key())

    async def ready(self) -> dict[str, Any]:
        """``/readyz``: raises when the registry or its database is not ready."""
        return await self._run(_calls.health())


class _Answered:
    """A checker that hands back answers already fetched, in order."""

    def __init__(self, answers: list[CheckResult]) -> None:
        self._answers = answers

    def check(self, fingerprints: Iterable[Checkable]) -> list[CheckResult]:
        return list(self._answers)
