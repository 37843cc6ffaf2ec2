"""Verify a signed registry export, or a signed change-feed page, offline, with no server code.

A mirror fetches ``GET /v1/export`` and the registry's public key once (out of band
is best), then checks every later export before trusting it::

    from modelhash._export import verify_export

    payload = verify_export(export_json, public_key_pem)
    for flag in payload["flags"]:
        ...

The signature covers the exact bytes of ``payload`` (UTF-8 of the canonical JSON:
sorted keys, no spaces, ASCII only), so nothing has to be re-serialised to verify.
Each page of the change feed (``GET /v1/changes``) carries the same kind of signed
document in its ``signed`` field, with a ``modelhash-changes-v1`` payload
(:func:`verify_changes`), so a mirror applies only changes the registry signed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from modelhash.errors import ExportVerificationError

__all__ = [
    "CHANGES_FORMAT",
    "ENDORSEMENT_FORMAT",
    "EXPORT_FORMAT",
    "ExportVerificationError",
    "canonical_json",
    "key_id",
    "load_public_key",
    "verify_changes",
    "verify_endorsement",
    "verify_export",
]

EXPORT_FORMAT = "modelhash-export-v1"
CHANGES_FORMAT = "modelhash-changes-v1"
ENDORSEMENT_FORMAT = "modelhash-key-endorsement-v1"


def canonical_json(value: Any) -> str:
    """The one serialisation that gets signed: sorted keys, no spaces, ASCII."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def load_public_key(public_key: str | bytes | Ed25519PublicKey) -> Ed25519PublicKey:
    """Load an ed25519 public key from PEM text or bytes."""
    if isinstance(public_key, Ed25519PublicKey):
        return public_key
    data = public_key.encode("ascii") if isinstance(public_key, str) else public_key
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise ExportVerificationError(f"not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ExportVerificationError("the public key is not an ed25519 key")
    return key


def key_id(public_key: str | bytes | Ed25519PublicKey) -> str:
    """A short, stable name for a public key: 16 hex digits of SHA-256 of its raw bytes."""
    raw = load_public_key(public_key).public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return hashlib.sha256(raw).hexdigest()[:16]


def verify_export(
    document: Mapping[str, Any] | str | bytes,
    public_key: str | bytes | Ed25519PublicKey,
) -> dict[str, Any]:
    """Check an export's signature against ``public_key`` and return its payload.

    ``document`` is the JSON answer of ``GET /v1/export``, parsed or not. Raises
    :class:`ExportVerificationError` unless the document is well formed, names the
    given key, and carries a valid ed25519 signature over its payload.
    """
    return _verify(document, public_key, EXPORT_FORMAT)


def verify_changes(
    document: Mapping[str, Any] | str | bytes,
    public_key: str | bytes | Ed25519PublicKey,
) -> dict[str, Any]:
    """Check a change-feed page's ``signed`` document and return its payload.

    The payload holds ``since``, ``next_cursor``, ``has_more``, ``generated_at``
    and ``changes`` (each with ``cursor``, ``at``, ``kind``, ``flag_id``, ``data``).
    Raises like :func:`verify_export`, and when the cursors are not consistent.
    """
    payload = _verify(document, public_key, CHANGES_FORMAT)
    since, nxt = payload.get("since"), payload.get("next_cursor")
    changes = payload.get("changes")
    if not isinstance(since, int) or not _is_cursor(since) or not _is_cursor(nxt) or not (
        isinstance(changes, list)
    ):
        raise ExportVerificationError("change page lacks since, next_cursor or changes")
    last = since
    for change in changes:
        cursor = change.get("cursor") if isinstance(change, dict) else None
        if not isinstance(cursor, int) or not _is_cursor(cursor) or cursor <= last:
            raise ExportVerificationError("change page cursors do not increase")
        last = cursor
    if last != nxt:
        raise ExportVerificationError("change page next_cursor does not follow its changes")
    return payload


def verify_endorsement(
    document: Mapping[str, Any] | str | bytes,
    pinned_key: str | bytes | Ed25519PublicKey,
) -> str:
    """The new public key (PEM) that ``pinned_key`` endorses in ``document``.

    ``document`` is the ``endorsement`` of ``GET /v1/export/public-key`` during a
    key rotation. Raises :class:`ExportVerificationError` unless the pinned key
    signed it and the key id it names is that of the PEM it carries.
    """
    payload = _verify(document, pinned_key, ENDORSEMENT_FORMAT)
    pem = payload.get("public_key_pem")
    if not isinstance(pem, str) or key_id(pem) != payload.get("key_id"):
        raise ExportVerificationError("the endorsement names a key that does not match it")
    return pem


def _is_cursor(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _verify(
    document: Mapping[str, Any] | str | bytes,
    public_key: str | bytes | Ed25519PublicKey,
    expected: str,
) -> dict[str, Any]:
    if isinstance(document, str | bytes):
        try:
            document = json.loads(document)
        except ValueError as exc:
            raise ExportVerificationError(f"export is not JSON: {exc}") from None
    if not isinstance(document, Mapping):
        raise ExportVerificationError("export is not a JSON object")
    if document.get("algorithm") != "ed25519":
        raise ExportVerificationError(
            f"unsupported signature algorithm {document.get('algorithm')!r}"
        )
    payload, signature = document.get("payload"), document.get("signature")
    if not isinstance(payload, str) or not isinstance(signature, str):
        raise ExportVerificationError("export lacks a payload or a signature")
    key = load_public_key(public_key)
    if document.get("key_id") != key_id(key):
        raise ExportVerificationError(
            f"export is signed by key {document.get('key_id')!r}, not by {key_id(key)!r}"
        )
    try:
        raw_signature = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        raise ExportVerificationError("signature is not base64") from None
    try:
        key.verify(raw_signature, payload.encode("utf-8"))
    except InvalidSignature:
        raise ExportVerificationError("signature does not match the payload") from None
    parsed = json.loads(payload)
    if not isinstance(parsed, dict) or parsed.get("format") != expected:
        raise ExportVerificationError(f"payload is not a {expected} document")
    return parsed
