"""The offline mirror: a verified copy of the list on disk, and checks answered from it.

``sync`` fetches the registry's signed export, verifies its ed25519 signature with a
pinned public key, then follows the change feed from the export's cursor. The
result is written atomically (temporary file, then rename) to one file in the
cache folder, readable by its owner only: the list is for members.

The key is pinned the first time (trust on first use, reported to the caller) unless
one is given; afterwards an export signed by any other key is refused. Checks
re-verify the stored export every time they load it, so a cache edited on disk is
refused too. The change feed after the export is not signed: it is only as
trustworthy as the connection it came over, and ``sync(full=True)`` replaces it with
a freshly verified export.
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
from modelhash._export import ExportVerificationError, key_id, load_public_key, verify_export
from modelhash.errors import InputError, MirrorError
from modelhash.fingerprint import CONTENT_ALGORITHM
from modelhash.wire import STRONG_ALGORITHMS, CheckResult, Match, MatchEvidence

__all__ = ["MIRROR_FORMAT", "MirrorIndex", "OfflineCache", "SyncReport"]

MIRROR_FORMAT = "modelhash-mirror-v1"
_COUNTING = ("active", "disputed")


@dataclass(frozen=True)
class SyncReport:
    """What a sync did: list size, changes applied, the cursor reached, the key used."""

    flags: int
    changes: int
    cursor: int
    key_id: str
    pinned_now: bool
    full: bool


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
        """Bring the mirror up to date; refuse (MirrorError) an export that fails to verify.

        ``public_key`` (PEM text) pins that key; without it the pinned key is used,
        or, on the first sync, the registry's key is fetched and pinned.
        """
        pem, pinned_now = self._key(client, public_key)
        kid = key_id(pem)
        state = None if full else self._read_state()
        if state is not None and (state.get("registry") != client.registry or
                                  state.get("key_id") != kid):
            state = None
        if state is None:
            full = True
            document = client.export().model_dump(mode="json")
            try:
                payload = verify_export(document, pem)
            except ExportVerificationError as exc:
                raise MirrorError(
                    f"refused the export from {client.registry}: {exc.diagnostics()}"
                ) from None
            state = {"export": document, "changes": [], "cursor": _cursor(payload)}
            flags = len(payload.get("flags", []))
        else:
            flags = -1
        cursor = int(state["cursor"])
        applied = 0
        for change in client.iter_changes(cursor):
            state["changes"].append(change.model_dump(mode="json"))
            cursor = max(cursor, change.cursor)
            applied += 1
        state.update(
            format=MIRROR_FORMAT,
            registry=client.registry,
            key_id=kid,
            cursor=cursor,
            synced_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        self._write(self.path, json.dumps(state, separators=(",", ":")))
        if flags < 0:
            flags = len(self.load().flags)
        return SyncReport(flags, applied, cursor, kid, pinned_now, full)

    def load(self, *, max_age: timedelta | None = None) -> MirrorIndex:
        """The verified list, with the change feed applied; MirrorError if it cannot be."""
        pem = self.pinned_key()
        if pem is None:
            raise MirrorError(f"no offline cache in {self.directory}: run 'modelhash sync' first")
        state = self._read_state()
        if state is None:
            raise MirrorError(f"no offline cache in {self.directory}: run 'modelhash sync' first")
        try:
            payload = verify_export(state.get("export") or {}, pem)
        except ExportVerificationError as exc:
            raise MirrorError(
                f"{self.path}: the stored export fails verification, refusing it: "
                f"{exc.diagnostics()}"
            ) from None
        try:
            synced = datetime.fromisoformat(str(state["synced_at"]))
            changes = list(state["changes"])
        except (KeyError, TypeError, ValueError):
            raise MirrorError(f"{self.path}: the cache is damaged: run 'modelhash sync --full'")\
                from None
        if max_age is not None and datetime.now(UTC) - synced > max_age:
            raise MirrorError(
                f"the offline cache was last synced at {synced.isoformat()}, "
                f"longer ago than allowed: run 'modelhash sync'"
            )
        index = MirrorIndex(synced_at=synced, registry=str(state.get("registry", "")))
        index.load_export(payload)
        for change in changes:
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
            raise MirrorError(f"{self.path}: not a {MIRROR_FORMAT} file")
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
