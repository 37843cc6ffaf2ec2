"""What both clients build the same way: connection options and request bodies."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx
from pydantic import ValidationError

from modelhash import __version__
from modelhash._config import ClientSettings
from modelhash.errors import InputError, InvalidHashError
from modelhash.fingerprint import Digest, ModelFingerprint, parse_hash
from modelhash.wire import BaseCreate, FlagCreate, encode_sketch

__all__ = [
    "DEFAULT_TIMEOUT",
    "PAGE",
    "base_body",
    "client_options",
    "flag_body",
    "hash_candidates",
    "transport_reason",
]

#: 5 s to connect, 30 s for everything else: a check of 1000 items is one query.
DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=5.0)
PAGE = 500


def client_options(
    registry: str | None, api_key: str | None, timeout: float | httpx.Timeout
) -> dict[str, Any]:
    """Keyword arguments for ``httpx.Client``/``AsyncClient``; explicit values beat env."""
    overrides: dict[str, Any] = {}
    if registry is not None:
        overrides["registry"] = registry
    if api_key is not None:
        overrides["api_key"] = api_key
    try:
        settings = ClientSettings(**overrides)
    except ValidationError as exc:
        raise InputError(str(exc.errors()[0].get("msg", "bad setting")).removeprefix(
            "Value error, "
        )) from None
    headers = {"User-Agent": f"modelhash/{__version__}", "Accept": "application/json"}
    if settings.api_key is not None:
        headers["Authorization"] = f"Bearer {settings.api_key.get_secret_value()}"
    return {
        "base_url": settings.registry,
        "headers": headers,
        "timeout": timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout),
        "follow_redirects": False,
        "limits": httpx.Limits(max_connections=20, max_keepalive_connections=10),
    }


def _fingerprint_fields(fingerprint: ModelFingerprint | Mapping[str, str]) -> dict[str, Any]:
    if isinstance(fingerprint, ModelFingerprint):
        out: dict[str, Any] = {
            "fingerprint": fingerprint.summary(),
            "model": fingerprint.model.to_json(),
        }
        if fingerprint.sketch is not None and len(fingerprint.sketch):
            out["sketch"] = encode_sketch(fingerprint.sketch)
        return out
    return {"fingerprint": dict(fingerprint)}


def _invalid(exc: ValidationError) -> InputError:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    reason = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    return InputError(f"{where}: {reason}" if where else reason)


def flag_body(
    fingerprint: ModelFingerprint | Mapping[str, str],
    category: str,
    severity: str,
    note: str | None,
    evidence: str | None,
    force: bool,
) -> FlagCreate:
    """A validated flag submission; the files' names and sizes go along as context."""
    data = _fingerprint_fields(fingerprint)
    if isinstance(fingerprint, ModelFingerprint):
        data["files"] = [
            {"name": f.path.replace("\\", "/").rsplit("/", 1)[-1], "size": f.size,
             "sha256": f.sha256}
            for f in fingerprint.files
        ]
    data.update(category=category, severity=severity, note=note, evidence=evidence, force=force)
    try:
        return FlagCreate.model_validate(data)
    except ValidationError as exc:
        raise _invalid(exc) from None


def base_body(
    fingerprint: ModelFingerprint | Mapping[str, str], name: str, description: str | None
) -> BaseCreate:
    """A validated reference-base submission."""
    data = _fingerprint_fields(fingerprint)
    if isinstance(fingerprint, ModelFingerprint) and (
        fingerprint.sketch is None or fingerprint.sketch.kind not in ("model", "lora")
    ):
        # A checkpoint is a base of deltas; a public adapter is a reference adapter.
        data.pop("sketch", None)
    data.update(name=name, description=description)
    try:
        return BaseCreate.model_validate(data)
    except ValidationError as exc:
        raise _invalid(exc) from None


def hash_candidates(text: str) -> list[Digest]:
    """Every reading of a pasted hash; raises InvalidHashError."""
    digests = parse_hash(text)
    if not digests:  # pragma: no cover - parse_hash raises instead
        raise InvalidHashError(f"{text!r} is no known hash")
    return digests


def transport_reason(exc: httpx.TransportError) -> str:
    """A one-line reason for a transport failure, without secrets."""
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({type(exc).__name__})"
    text = str(exc).strip().splitlines()
    detail = text[0][:200] if text else ""
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
