"""Read paths: batch checks, exact lookups and k-anonymity range queries.

A check reads only the ``fingerprint`` table, which holds strong hashes, so a
truncated model-site hash can never make a match. An item that carries a sketch and
matched no active or disputed flag by hash is then compared by sketch
(:mod:`modelhash.registry.crud.sketches`). Lookups read both tables and say
when a hit is only a weak (possibly chance) one. Range answers are built from
:func:`range_values` by :mod:`modelhash.registry.crud.ranges`.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from sqlalchemy import and_, or_
from sqlmodel import Session, col, select

from modelhash.fingerprint import ALGORITHMS, CONTENT_ALGORITHM, Digest
from modelhash.registry.crud.flags import COUNTING_STATUSES
from modelhash.registry.crud.sketches import find_matches
from modelhash.registry.errors import UnprocessableError
from modelhash.registry.models import Fingerprint, Flag, WeakHash
from modelhash.wire import (
    STRONG_ALGORITHMS,
    CheckItem,
    CheckResult,
    LookupFlag,
    LookupResult,
    Match,
    MatchEvidence,
)

__all__ = ["PREFIX_LEN", "check", "lookup", "range_values"]

PREFIX_LEN = 5

_WEAK_NOTE = (
    "{algorithm} keeps only {bits} bits of a hash: different models share a value by "
    "chance, so a hit here is a lead to verify with a full hash, never a match"
)


def check(session: Session, *, items: list[CheckItem]) -> list[CheckResult]:
    """One result per item, in order; ``match`` only if an active or disputed flag matched."""
    wanted: dict[str, set[str]] = defaultdict(set)
    for item in items:
        for d in item.digests():
            if d.algorithm in STRONG_ALGORITHMS:
                wanted[d.algorithm].add(d.hex)
    owners: dict[Digest, str] = {}
    if wanted:
        clauses = [
            and_(col(Fingerprint.algorithm) == a, col(Fingerprint.value).in_(sorted(v)))
            for a, v in wanted.items()
        ]
        rows = session.exec(
            select(Fingerprint.algorithm, Fingerprint.value, Fingerprint.flag_id).where(
                or_(*clauses)
            )
        )
        owners = {Digest(a, v): f for a, v, f in rows}
    found: dict[Digest, tuple[str, str, str, str]] = {}
    if owners:
        flags = {
            i: (i, c, s, st)
            for i, c, s, st in session.exec(
                select(Flag.id, Flag.category, Flag.severity, Flag.status).where(
                    col(Flag.id).in_(sorted(set(owners.values())))
                )
            )
        }
        found = {d: flags[f] for d, f in owners.items()}
    results = [_result(i, item, found) for i, item in enumerate(items)]
    for index, (item, result) in enumerate(zip(items, results, strict=True)):
        if item.sketch is None or result.verdict == "match":
            continue
        # Decoded here, one item at a time, and dropped after: a batch never holds
        # more than one decoded sketch (the request validated them the same way).
        try:
            upload = item.parsed_sketch()
        except ValueError as exc:
            raise UnprocessableError(f"items[{index}].{exc}") from None
        if upload is None:
            continue
        hits = find_matches(session, upload, exclude=[m.flag_id for m in result.matches])
        for hit in hits:
            v = hit.verdict
            result.matches.append(
                Match(
                    flag_id=hit.flag_id,
                    category=hit.category,
                    severity=hit.severity,
                    status=hit.status,
                    match=v.match,
                    score=round(v.score, 4),
                    evidence=MatchEvidence.model_validate(v.evidence),
                )
            )
        if any(m.status in COUNTING_STATUSES for m in result.matches):
            result.verdict = "match"
    return results


def _result(
    index: int, item: CheckItem, found: dict[Digest, tuple[str, str, str, str]]
) -> CheckResult:
    matches: dict[str, Match] = {}
    for d in item.digests():
        hit = found.get(d)
        if hit is None:
            continue
        flag_id, category, severity, status = hit
        layer = "content" if d.algorithm == CONTENT_ALGORITHM else "file"
        previous = matches.get(flag_id)
        if previous is not None and (previous.evidence.layer == "file" or layer == "content"):
            continue
        matches[flag_id] = Match(
            flag_id=flag_id,
            category=category,
            severity=severity,
            status=status,
            match="exact" if layer == "file" else "content",
            score=1.0,
            evidence=MatchEvidence(layer=layer, algorithm=d.algorithm),
        )
    listed = list(matches.values())
    verdict = "match" if any(m.status in COUNTING_STATUSES for m in listed) else "clean"
    return CheckResult(index=index, verdict=verdict, matches=listed)


def lookup(session: Session, *, digest: Digest) -> LookupResult:
    """Every flag carrying ``digest``; weak algorithms are marked ambiguous."""
    strong = digest.algorithm in STRONG_ALGORITHMS
    table: Any = Fingerprint if strong else WeakHash
    rows = session.exec(
        select(Flag.id, Flag.category, Flag.severity, Flag.status)
        .join(table, col(table.flag_id) == col(Flag.id))
        .where(col(table.algorithm) == digest.algorithm, col(table.value) == digest.hex)
        .order_by(col(Flag.created_at), col(Flag.id))
    )
    flags = [LookupFlag(flag_id=i, category=c, severity=s, status=st) for i, c, s, st in rows]
    note = None
    if not strong:
        bits = ALGORITHMS[digest.algorithm].canonical_len * 4
        note = _WEAK_NOTE.format(algorithm=digest.algorithm, bits=bits)
    return LookupResult(
        algorithm=digest.algorithm,
        value=digest.hex,
        strength="strong" if strong else "weak",
        flagged=any(f.status in COUNTING_STATUSES for f in flags),
        ambiguous=not strong,
        note=note,
        flags=flags,
    )


def range_values(session: Session, *, algorithm: str, prefix: str) -> list[str]:
    """Distinct values of ``algorithm`` starting with ``prefix`` on unrevoked flags.

    The prefix is turned into a half-open range so the (algorithm, value) B-tree
    index answers it under any collation.
    """
    table: Any = Fingerprint if algorithm in STRONG_ALGORITHMS else WeakHash
    upper = int(prefix, 16) + 1
    query = (
        select(table.value)
        .join(Flag, col(Flag.id) == col(table.flag_id))
        .where(
            col(table.algorithm) == algorithm,
            col(table.value) >= prefix,
            col(Flag.status).in_(COUNTING_STATUSES),
        )
        .distinct()
    )
    if upper < 16**PREFIX_LEN:
        query = query.where(col(table.value) < f"{upper:0{PREFIX_LEN}x}")
    return sorted(v for v in session.exec(query) if v.startswith(prefix))
