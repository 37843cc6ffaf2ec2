"""Checks, exact lookups and k-anonymity range queries: what readers may do."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Path, Request

from modelhash.errors import InvalidHashError
from modelhash.fingerprint import ALGORITHMS, parse_hash_as
from modelhash.registry._memory import release_freed_memory
from modelhash.registry._metrics import Metrics
from modelhash.registry.crud.lookup import PREFIX_LEN, check, lookup
from modelhash.registry.crud.ranges import range_answer
from modelhash.registry.deps import ReaderDep, SecretsDep, SessionDep, SettingsDep
from modelhash.registry.errors import BadRequestError
from modelhash.registry.routes._common import errors
from modelhash.wire import WIRE_KEYS, CheckRequest, CheckResponse, LookupResult, RangeResult

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["lookups"], responses=errors(401, 403, 503))

_PREFIX = re.compile(rf"[0-9a-fA-F]{{{PREFIX_LEN}}}")


@router.post("/check", responses=errors(413, 422))
def check_fingerprints(
    body: CheckRequest, session: SessionDep, _: ReaderDep, request: Request
) -> CheckResponse:
    """Check up to 1000 fingerprints; one result per item, in order.

    Only strong hashes (sha256, blake3, content) can match. Revoked flags are listed
    with status ``revoked`` but do not make the verdict ``match``.
    """
    results = check(session, items=body.items)
    if any(item.sketch is not None for item in body.items):
        release_freed_memory()
    matched = sum(r.verdict == "match" for r in results)
    request.state.matched = matched > 0
    request.state.items = len(results)
    metrics: Metrics = request.app.state.metrics
    if matched:
        metrics.checked.labels("match").inc(matched)
    if len(results) > matched:
        metrics.checked.labels("clean").inc(len(results) - matched)
    return CheckResponse(results=results)


@router.get("/hashes/{algorithm}/{value}", responses=errors(400, 422))
def lookup_hash(
    algorithm: Annotated[str, Path(max_length=64)],
    value: Annotated[str, Path(max_length=200)],
    session: SessionDep,
    _: ReaderDep,
    request: Request,
) -> LookupResult:
    """Look one hash up, in any accepted form (either case; AutoV2/V3 as 10/12 or 64 digits).

    A weak (truncated) algorithm answers with every hit and ``ambiguous: true``.
    """
    try:
        digest = parse_hash_as(WIRE_KEYS.get(algorithm.lower(), algorithm), value)
    except InvalidHashError as exc:
        raise BadRequestError(str(exc)) from None
    result = lookup(session, digest=digest)
    request.state.matched = bool(result.flags)
    metrics: Metrics = request.app.state.metrics
    metrics.lookups.labels(result.strength, "yes" if result.flags else "no").inc()
    return result


@router.get("/range/{algorithm}/{prefix}", responses=errors(400, 422))
def range_query(
    algorithm: Annotated[str, Path(max_length=64)],
    prefix: Annotated[str, Path(max_length=64)],
    session: SessionDep,
    _: ReaderDep,
    secrets: SecretsDep,
    settings: SettingsDep,
) -> RangeResult:
    """Every flagged value starting with 5 hex digits, hidden among decoys.

    This protects the caller's full hash: the registry sees only 5 digits. The
    answer always has the same size (64 unless more are real) and is stable when
    asked again; AutoV2 answers are the SHA-256 answer cut to 10 digits, so the two
    never single out a value; a new flag at the prefix replaces 8 decoys at once.
    Someone who polls a prefix over many changes can still tell which values stay:
    the list is not secret from readers (they may read the export). Compare locally.
    """
    name = WIRE_KEYS.get(algorithm.strip().lower(), algorithm.strip().lower())
    if name not in ALGORITHMS:
        known = ", ".join(sorted(ALGORITHMS))
        raise BadRequestError(f"unknown hash algorithm {algorithm!r} (known: {known})")
    if not _PREFIX.fullmatch(prefix):
        raise BadRequestError(f"a range prefix is exactly {PREFIX_LEN} hex digits")
    prefix = prefix.lower()
    values = range_answer(
        session,
        algorithm=name,
        prefix=prefix,
        secret=secrets.range_secret(),
        bucket=settings.range_bucket,
    )
    return RangeResult(algorithm=name, prefix=prefix, values=values)
