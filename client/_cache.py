"""The offline mirror: a verified copy of the list on disk, and checks answered from it.

``sync`` fetches the registry's signed export, verifies its ed25519 signature with a
pinned public key, then follows the change feed from the export's cursor, verifying
every page's signature too (the feed is signed with the same key). The mirror file
keeps the signed documents themselves, written atomically (temporary file, then
rename) to one file in the cache folder, readable by its owner only.

The key is pinned the first time (trust on first use, reported to the caller) unless
one is given; afterwards anything signed by another key is refused. Every load
re-verifies everything: the export, each stored page, that the pages follow each
other from the export's cursor, and that the file's unsigned fields (cursor, time,
key id) agree with the signed ones. Any edit is refused (:class:`MirrorError`, exit
3). Freshness (``max_age``) is measured from the registry's own signed
``generated_at``, never from a local clock value in the file, so replaying an old
export cannot pass it. An export older than the cached list (a lower cursor) is
refused as a rollback. When the registry rotates its key and the pinned key
endorses the new one (``GET /v1/export/public-key``), the mirror pins the new key
and fetches a full export; a new key without that endorsement is refused.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from modelhash._calls import Checkable, check_items
from modelhash._client import RegistryClient
from modelhash._config import default_cache_dir
from modelhash._export import (
    ExportVerificationError,
    key_id,
    load_public_key,
    verify_changes,
    verify_endorsement,
    verify_export,
)
from modelhash.errors import InputError, MirrorError
from modelhash.fingerprint import CONTENT_ALGORITHM
from modelhash.wire import STRONG_ALGORITHMS, CheckResult, Match, MatchEvidence

__all__ = ["MIRROR_FORMAT", "MirrorIndex", "OfflineCache", "SyncReport"]

MIRROR_FORMAT = "modelhash-mirror-v2"
_COUNTING = ("active", "disputed")
_MAX_PAGES = 100_000


@dataclass(frozen=True)
class SyncReport:
    """What a sync did: list size, changes applied, the cursor reached, the key used."""

    flags: int
    changes: int
    cursor: int
    key_id: str
    pinned_now: bool
    full: bool


@dataclass
class _Verified:
    """A mirror's content once every signature and link has been checked."""

    export: dict[str, Any]
    payload: dict[str, Any]
    pages: list[dict[str, Any]]
    changes: list[dict[str, Any]]
    cursor: int
    as_of: datetime


class OfflineCache:
    """The cache folder (default ``MODELHASH_CACHE`` or the XDG cache dir)."""

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_cache_dir()

    @property
    def path(self) -> Path:
        """The mirror file."""
        return self.directory / "mirror.json"

    @property
    def key_path(self) -> Path:
        """The pinned public key (PEM)."""
        return self.directory / "signing-key.pem"

    def pinned_key(self) -> str | None:
        """The pinned public key, or None before the first sync."""
        try:
            return self.key_path.read_text(encoding="ascii")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise MirrorError(f"{self.key_path}: cannot read the pinned key: {exc}") from None

    def sync(
        self,
        client: RegistryClient,
        *,
        public_key: str | None = None,
        full: bool = False,
    ) -> SyncReport:
        """Bring the mirror up to date; refuse (MirrorError) anything that fails to verify.

        ``public_key`` (PEM text) pins that key; without it the pinned key is used,
        or, on the first sync, the registry's key is fetched and pinned. ``full``
        fetches a new export even when the cache could be followed from its cursor;
        an export older than the verified cache is refused either way.
        """
        pem, pinned_now = self._key(client, public_key)
        kid = key_id(pem)
        previous: _Verified | None = None
        try:
            raw = self._read_state()
        except MirrorError:
            if not full:
                raise
            raw = None  # unreadable, or an older format: --full starts afresh
        if raw is not None and raw.get("registry") == client.registry and (
            raw.get("key_id") == kid
        ):
            try:
                previous = _verify_state(raw, pem, self.path)
            except MirrorError:
                if not full:
                    raise
        if public_key is None and not pinned_now:
            rotated = self._follow_rotation(client, pem)
            if rotated is not None:
                pem, kid, full = rotated, key_id(rotated), True
        if previous is None or full:
            document = client.export().model_dump(mode="json")
            try:
                payload = verify_export(document, pem)
            except ExportVerificationError as exc:
                raise MirrorError(
                    f"refused the export from {client.registry}: {exc.diagnostics()}"
                ) from None
            cursor = _cursor(payload)
            if previous is not None and cursor < previous.cursor:
                raise MirrorError(
                    f"refused the export from {client.registry}: it is older (cursor "
                    f"{cursor}) than the verified cache (cursor {previous.cursor}), a "
                    f"rollback or a replay; if the registry was restored from a backup, "
                    f"delete {self.path} and sync again"
                )
            full = True
            export, pages = document, []
        else:
            export, pages = previous.export, list(previous.pages)
            cursor = previous.cursor
        applied = 0
        for page in self._fetch_pages(client, pem, cursor):
            pages.append(page)
            applied += len(json.loads(page["payload"])["changes"])
        pages = _compact(pages)
        state: dict[str, Any] = {"format": MIRROR_FORMAT, "registry": client.registry,
                                 "key_id": kid, "export": export, "pages": pages}
        verified = _verify_state({**state, "cursor": None, "synced_at": None}, pem, self.path,
                                 check_fields=False)
        state["cursor"] = verified.cursor
        state["synced_at"] = verified.as_of.isoformat()
        self._write(self.path, json.dumps(state, separators=(",", ":")))
        flags = len(self.load().flags)
        return SyncReport(flags, applied, verified.cursor, kid, pinned_now, full)

    def _follow_rotation(self, client: RegistryClient, pinned: str) -> str | None:
        """The registry's new key if the pinned one endorses it (then pinned), else None."""
        offered = client.public_key()
        if offered.key_id == key_id(pinned) or offered.endorsement is None:
            return None
        try:
            new = verify_endorsement(offered.endorsement.model_dump(mode="json"), pinned)
        except ExportVerificationError:
            return None  # not vouched for: the export will be refused as foreign
        if key_id(new) != offered.key_id:
            return None
        self._write(self.key_path, new)
        return new

    def _fetch_pages(self, client: RegistryClient, pem: str, since: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for _ in range(_MAX_PAGES):
            page = client.changes(since)
            if page.signed is None:
                raise MirrorError(
                    f"{client.registry} sent an unsigned change feed: upgrade the registry"
                )
            signed = page.signed.model_dump(mode="json")
            try:
                payload = verify_changes(signed, pem)
            except ExportVerificationError as exc:
                raise MirrorError(
                    f"refused a change-feed page from {client.registry}: {exc.diagnostics()}"
                ) from None
            if payload["since"] != since:
                raise MirrorError(
                    f"refused a change-feed page from {client.registry}: it starts at "
                    f"{payload['since']}, not at {since}"
                )
            out.append(signed)
            if not payload.get("has_more") or payload["next_cursor"] == since:
                return out
            since = payload["next_cursor"]
        raise MirrorError(f"{client.registry}: the change feed does not end")

    def load(self, *, max_age: timedelta | None = None) -> MirrorIndex:
        """The verified list, with the change feed applied; MirrorError if it cannot be."""
        pem = self.pinned_key()
        if pem is None:
            raise MirrorError(f"no offline cache in {self.directory}: run 'modelhash sync' first")
        state = self._read_state()
        if state is None:
            raise MirrorError(f"no offline cache in {self.directory}: run 'modelhash sync' first")
        if state.get("key_id") != key_id(pem):
            raise MirrorError(
                f"{self.path}: not signed by the pinned key: run 'modelhash sync --full'"
            )
        verified = _verify_state(state, pem, self.path)
        if max_age is not None and datetime.now(UTC) - verified.as_of > max_age:
            raise MirrorError(
                f"the offline cache is current as of {verified.as_of.isoformat()} (the "
                f"registry's signed time), longer ago than allowed: run 'modelhash sync'"
            )
        index = MirrorIndex(synced_at=verified.as_of, registry=str(state.get("registry", "")))
        index.load_export(verified.payload)
        for change in verified.changes:
            index.apply(change)
        return index

    def _key(self, client: RegistryClient, given: str | None) -> tuple[str, bool]:
        if given is not None:
            try:
                load_public_key(given)
            except ExportVerificationError as exc:
                raise InputError(f"--public-key: {exc.diagnostics()}") from None
            if given != self.pinned_key():
                self._write(self.key_path, given)
            return given, False
        pinned = self.pinned_key()
        if pinned is not None:
            return pinned, False
        offered = client.public_key()
        try:
            if key_id(offered.public_key_pem) != offered.key_id:
                raise MirrorError(
                    f"{client.registry} offered a public key whose id does not match it"
                )
        except ExportVerificationError as exc:
            raise MirrorError(f"{client.registry} offered a bad public key: {exc}") from None
        self._write(self.key_path, offered.public_key_pem)
        return offered.public_key_pem, True

    def _read_state(self) -> dict[str, Any] | None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise MirrorError(f"{self.path}: cannot read: {exc.strerror or exc}") from None
        try:
            state = json.loads(text)
        except ValueError:
            raise MirrorError(f"{self.path}: not JSON: run 'modelhash sync --full'") from None
        if not isinstance(state, dict) or state.get("format") != MIRROR_FORMAT:
            raise MirrorError(
                f"{self.path}: not a {MIRROR_FORMAT} file: run 'modelhash sync --full'"
            )
        return state

    def _write(self, path: Path, text: str) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{path.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    fh.write(text)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise MirrorError(f"{path}: cannot write the cache: {exc.strerror or exc}") from None


def _signed_time(payload: dict[str, Any], what: str, path: Path) -> datetime:
    try:
        when = datetime.fromisoformat(str(payload["generated_at"]))
    except (KeyError, ValueError):
        raise MirrorError(f"{path}: {what} has no valid generated_at") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _verify_state(
    state: dict[str, Any], pem: str, path: Path, *, check_fields: bool = True
) -> _Verified:
    """Verify every signed document of a mirror file and how they link; MirrorError if not."""
    try:
        payload = verify_export(state.get("export") or {}, pem)
    except ExportVerificationError as exc:
        raise MirrorError(
            f"{path}: the stored export fails verification, refusing it: {exc.diagnostics()}"
        ) from None
    cursor = _cursor(payload)
    as_of = _signed_time(payload, "the export", path)
    pages = state.get("pages")
    if not isinstance(pages, list):
        raise MirrorError(f"{path}: the cache is damaged: run 'modelhash sync --full'")
    changes: list[dict[str, Any]] = []
    for n, page in enumerate(pages):
        try:
            body = verify_changes(page, pem)
        except ExportVerificationError as exc:
            raise MirrorError(
                f"{path}: stored change page {n} fails verification, refusing the cache: "
                f"{exc.diagnostics()}"
            ) from None
        if body["since"] != cursor:
            raise MirrorError(
                f"{path}: stored change page {n} starts at {body['since']}, not at {cursor}: "
                "the cache was edited; run 'modelhash sync --full'"
            )
        changes.extend(body["changes"])
        cursor = body["next_cursor"]
        as_of = max(as_of, _signed_time(body, f"change page {n}", path))
    stated = (state.get("cursor"), state.get("synced_at"))
    if check_fields and stated != (cursor, as_of.isoformat()):
        raise MirrorError(
            f"{path}: its cursor or time disagrees with the signed content: the cache was "
            "edited; run 'modelhash sync --full'"
        )
    return _Verified(dict(state.get("export") or {}), payload, pages, changes, cursor, as_of)


def _compact(pages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pages with changes, plus the newest (its signed time says how fresh the list is)."""
    if not pages:
        return pages
    kept = [p for p in pages[:-1] if json.loads(p["payload"])["changes"]]
    return [*kept, pages[-1]]


def _cursor(payload: dict[str, Any]) -> int:
    cursor = payload.get("cursor")
    if not isinstance(cursor, int) or isinstance(cursor, bool) or cursor < 0:
        raise MirrorError("the export has no valid cursor")
    return cursor


class MirrorIndex:
    """The list in memory: flags and their strong hashes, checked like the registry does.

    A mirror holds no sketches, so it matches the exact layers only (``layers``).
    """

    layers = "exact"
    """What this checker can match; results of checks against it say so."""

    def __init__(self, *, synced_at: datetime, registry: str) -> None:
        self.synced_at = synced_at
        self.registry = registry
        self.flags: dict[str, dict[str, str]] = {}
        self._owners: dict[tuple[str, str], str] = {}

    def load_export(self, payload: dict[str, Any]) -> None:
        """Add every flag of a verified export payload."""
        for flag in payload.get("flags", []):
            self._add_flag(flag["id"], flag, flag.get("fingerprints", {}))

    def _add_flag(self, flag_id: str, info: dict[str, Any], hashes: dict[str, Any]) -> None:
        self.flags[flag_id] = {
            "category": str(info.get("category", "")),
            "severity": str(info.get("severity", "")),
            "status": str(info.get("status", "active")),
        }
        for algorithm, values in hashes.items():
            for value in values:
                self._add_hash(flag_id, algorithm, value)

    def _add_hash(self, flag_id: str, algorithm: str, value: str) -> None:
        if algorithm in STRONG_ALGORITHMS:
            self._owners.setdefault((algorithm, value), flag_id)

    def apply(self, change: dict[str, Any]) -> None:
        """Apply one change-feed entry; kinds this version does not know are skipped."""
        kind, flag_id, data = change.get("kind"), change.get("flag_id"), change.get("data", {})
        if not isinstance(flag_id, str) or not isinstance(data, dict):
            return
        if kind == "flag.created":
            self._add_flag(flag_id, data, data.get("fingerprints", {}))
        elif kind == "fingerprint.added" and flag_id in self.flags:
            self._add_hash(flag_id, str(data.get("algorithm")), str(data.get("value")))
        elif kind == "flag.status" and flag_id in self.flags:
            self.flags[flag_id]["status"] = str(data.get("status"))

    def check(self, fingerprints: Iterable[Checkable]) -> list[CheckResult]:
        """One result per fingerprint, in order; only strong hashes match, as online."""
        out = []
        for index, item in enumerate(check_items(fingerprints)):
            matches: dict[str, Match] = {}
            for d in item.digests():
                flag_id = self._owners.get((d.algorithm, d.hex))
                if flag_id is None:
                    continue
                layer = "content" if d.algorithm == CONTENT_ALGORITHM else "file"
                seen = matches.get(flag_id)
                if seen is not None and (seen.evidence.layer == "file" or layer == "content"):
                    continue
                flag = self.flags[flag_id]
                matches[flag_id] = Match(
                    flag_id=flag_id,
                    category=flag["category"],
                    severity=flag["severity"],
                    status=flag["status"],
                    match="exact" if layer == "file" else "content",
                    score=1.0,
                    evidence=MatchEvidence(layer=layer, algorithm=d.algorithm),
                )
            listed = list(matches.values())
            verdict = "match" if any(m.status in _COUNTING for m in listed) else "clean"
            out.append(CheckResult(index=index, verdict=verdict, matches=listed))
        return out
