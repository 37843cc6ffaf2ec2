"""The synchronous registry client.

Example::

    from modelhash import RegistryClient
    from modelhash.fingerprint import fingerprint_file

    with RegistryClient() as registry:          # MODELHASH_REGISTRY, MODELHASH_API_KEY
        (result,) = registry.check([fingerprint_file("upload.safetensors")])
        if result.verdict == "match":
            ...

One client keeps one connection pool: create it once and reuse it. Idempotent
calls are retried with backoff and jitter (see :class:`client.Retry`); every
failure is a :class:`modelhash.errors.RegistryError` subclass.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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
from modelhash._scan import PathResult, check_paths
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

__all__ = ["RegistryClient"]

T = TypeVar("T")


class RegistryClient:
    """Talks to a modelhash registry over HTTP; a context manager that closes its pool.

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
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        options = client_options(registry, api_key, timeout)
        self.registry: str = options["base_url"]
        self.retry = retry or Retry()
        self._sleep = sleep
        self._http = httpx.Client(transport=transport, **options)

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def _run(self, call: Call[T]) -> T:
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self._http.request(
                    call.method, call.path, json=call.body, params=call.params
                )
            except httpx.TransportError as exc:
                if attempt < self.retry.attempts and self.retry.retry_exception(
                    exc, idempotent=call.idempotent
                ):
                    self._sleep(self.retry.delay(attempt))
                    continue
                raise RegistryUnreachableError(
                    call.method, self.registry + call.path, transport_reason(exc)
                ) from None
            if attempt < self.retry.attempts and self.retry.retry_status(
                response.status_code, idempotent=call.idempotent
            ):
                response.close()
                self._sleep(self.retry.delay(attempt, response))
                continue
            return decode(call, response)

    # Checks and lookups

    def check(self, fingerprints: Iterable[Checkable]) -> list[CheckResult]:
        """Check models against the list: one result per fingerprint, in order.

        Each fingerprint is a :class:`~modelhash.fingerprint.ModelFingerprint`, a
        file's :class:`~modelhash.fingerprint.FileHashes`, or a ``summary()``-style map;
        each needs a strong hash (sha256, blake3 or content). Batches larger than the
        registry's limit are split; ``index`` in the answers counts across batches.
        """
        items = check_items(fingerprints)
        out: list[CheckResult] = []
        for batch in check_batches(items):
            for r in self._run(_calls.check(batch)):
                out.append(r.model_copy(update={"index": len(out)}))
        return out

    def check_paths(
        self,
        paths: Sequence[str | os.PathLike[str]],
        *,
        recursive: bool = False,
        workers: int = 1,
        layers: Layers = "all",
    ) -> list[PathResult]:
        """Fingerprint local files or model folders and check them: what ``modelhash
        check`` does. Every layer by default, so derivatives of flagged models match;
        ``layers="exact"`` sends only exact hashes and the results say so."""
        return check_paths(paths, self, recursive=recursive, workers=workers, layers=layers)

    def screen(
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
            return [decide(r) for r in self.check(items)]
        except RegistryError as exc:
            return [unchecked(exc, unreachable) for _ in items]

    def lookup(self, algorithm: str, value: str) -> LookupResult:
        """Look one hash up by algorithm name (or wire key) and value."""
        return self._run(_calls.lookup(algorithm, value))

    def lookup_hash(self, text: str) -> list[LookupResult]:
        """Look up a pasted hash in any accepted form; bare hex tries every reading."""
        return [self.lookup(d.algorithm, d.hex) for d in hash_candidates(text)]

    def range(self, algorithm: str, prefix: str) -> RangeResult:
        """k-anonymity: flagged values starting with a 5-hex-digit prefix, among decoys."""
        return self._run(_calls.range_query(algorithm, prefix))

    # Flags

    def flag(
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
        return self._run(_calls.create_flag(body))

    def get_flag(self, flag_id: str) -> FlagDetail:
        """One flag (redacted for readers)."""
        return self._run(_calls.get_flag(flag_id))

    def list_flags(self, *, status: str | None = None) -> Iterator[FlagDetail]:
        """Every flag, newest first, fetched a page at a time (submitters)."""
        offset = 0
        while True:
            page = self._run(_calls.list_flags(status, PAGE, offset))
            yield from page
            if len(page) < PAGE:
                return
            offset += len(page)

    def revoke(self, flag_id: str, *, reason: str) -> FlagDetail:
        """Revoke a flag (admins); checks stop matching it at once."""
        return self._run(_calls.flag_action(flag_id, "revoke", reason))

    def dispute(self, flag_id: str, *, reason: str) -> FlagDetail:
        """Dispute a flag (submitters); it still matches until an admin decides."""
        return self._run(_calls.flag_action(flag_id, "dispute", reason))

    def confirm(self, flag_id: str, *, reason: str) -> FlagDetail:
        """Record agreement with a flag (submitters)."""
        return self._run(_calls.flag_action(flag_id, "confirm", reason))

    def reinstate(self, flag_id: str, *, reason: str) -> FlagDetail:
        """Make a disputed or revoked flag active again (admins)."""
        return self._run(_calls.flag_action(flag_id, "reinstate", reason))

    # Analyst work

    def search_flags(
        self, *, limit: int = PAGE, offset: int = 0, **filters: Any
    ) -> FlagPage:
        """One page of a flag search, with the total (submitters).

        Filters: ``q`` (any hash form, a flag id, or note text), ``status``,
        ``category``, ``severity``, ``submitter``, ``since``, ``until`` (aware
        datetimes) and ``reported``; the registry refuses unknown ones.
        """
        return self._run(_analyst.search_flags(filters, limit, offset))

    def audit(self, flag_id: str) -> list[AuditRecord]:
        """A flag's audit trail (admins, and the flag's own submitter)."""
        return self._run(_analyst.audit(flag_id))

    def report(self, flag_id: str, *, kind: str, note: str | None = None) -> ReportPublic:
        """Report a suspected ``false-positive`` or a ``confirmed-hit`` (any key)."""
        return self._run(_analyst.report(flag_id, kind, note))

    def reports(self, flag_id: str | None = None) -> list[ReportPublic]:
        """Reports on one flag, or the newest reports on all (submitters)."""
        return self._run(_analyst.reports(flag_id))

    def import_flags(
        self, text: str, *, format: str = "csv", category: str | None = None,
        severity: str | None = None, batch: int = _analyst.IMPORT_BATCH,
    ) -> ImportResult:
        """Flag every row of a CSV or a plain hash list, in batches; a result per row."""
        parts = []
        for part, first in _analyst.import_batches(text, format, batch):
            request = _analyst.import_request(part, format, category, severity, first)
            parts.append(self._run(_analyst.import_call(request)))
        return _analyst.merge_results(parts)

    def export_csv(self, **filters: Any) -> str:
        """Every flag matching the filters (as :meth:`search_flags`), as CSV text."""
        return self._run(_analyst.export_csv(filters))

    # Bases and keys

    def add_base(
        self,
        fingerprint: ModelFingerprint | Mapping[str, str],
        *,
        name: str,
        description: str | None = None,
    ) -> BasePublic:
        """Register a reference base (admins): a public model that is never flagged."""
        return self._run(_calls.add_base(base_body(fingerprint, name, description)))

    def list_bases(self) -> list[BasePublic]:
        """Every reference base."""
        return self._run(_calls.list_bases())

    def create_key(self, *, role: str, name: str | None = None) -> KeyCreated:
        """Make an API key (admins); its secret is in the answer only."""
        return self._run(_calls.create_key(role, name))

    def list_keys(self) -> list[KeyPublic]:
        """Every API key, without secrets (admins)."""
        return self._run(_calls.list_keys())

    def revoke_key(self, key_id: int) -> KeyPublic:
        """Revoke an API key at once (admins)."""
        return self._run(_calls.revoke_key(key_id))

    # Mirrors

    def changes(self, since: int = 0, *, limit: int = 500) -> ChangesPage:
        """One page of the change feed after cursor ``since``."""
        return self._run(_calls.changes(since, limit))

    def iter_changes(self, since: int = 0) -> Iterator[ChangeEvent]:
        """Every change after ``since``, following pages until the feed is drained."""
        while True:
            page = self.changes(since)
            yield from page.changes
            if not page.has_more or page.next_cursor <= since:
                return
            since = page.next_cursor

    def export(self) -> SignedExport:
        """The signed export of the whole list (verify it before use)."""
        return self._run(_calls.export())

    def public_key(self) -> PublicKey:
        """The key exports are signed with; pin it."""
        return self._run(_calls.public_key())

    def ready(self) -> dict[str, Any]:
        """``/readyz``: raises when the registry or its database is not ready."""
        return self._run(_calls.health())
