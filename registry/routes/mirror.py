"""Offline mirrors: the change feed, the signed export and the public key to verify it."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request

from modelhash._export import CHANGES_FORMAT, ENDORSEMENT_FORMAT, canonical_json
from modelhash.registry.crud.audit import latest_cursor, list_changes
from modelhash.registry.crud.export import export_document
from modelhash.registry.deps import ReaderDep, SecretsDep, SessionDep
from modelhash.registry.routes._common import errors
from modelhash.wire import ChangeEvent, ChangesPage, PublicKey, SignedExport

__all__ = ["ExportCache", "router"]

router = APIRouter(prefix="/v1", tags=["mirror"], responses=errors(503))


class ExportCache:
    """The last signed export, reused until the change feed moves on."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.cursor: int | None = None
        self.export: SignedExport | None = None


@router.get("/changes", responses=errors(401, 403, 422))
def changes(
    session: SessionDep,
    _: ReaderDep,
    secrets: SecretsDep,
    since: Annotated[int, Query(ge=0, le=2**31 - 1, description="The last cursor you have.")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 500,
) -> ChangesPage:
    """Changes after ``since``, oldest first. Store ``next_cursor``; call again while ``has_more``.

    Cursors only grow, and writers are serialised, so a change never appears below
    a cursor you have already read past. ``signed`` holds the same page signed with
    the export key (payload format ``modelhash-changes-v1``, with ``since`` and the
    server's ``generated_at``): mirrors verify it and apply only what it says.
    """
    rows, more = list_changes(session, since=since, limit=limit)
    next_cursor = (rows[-1].id or since) if rows else since
    events = [
        ChangeEvent(cursor=r.id or 0, at=r.at, kind=r.kind, flag_id=r.flag_id, data=r.data)
        for r in rows
    ]
    payload = canonical_json(
        {
            "format": CHANGES_FORMAT,
            "since": since,
            "next_cursor": next_cursor,
            "has_more": more,
            "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "changes": [e.model_dump(mode="json") for e in events],
        }
    )
    signer = secrets.signer()
    signed = SignedExport(
        payload=payload,
        signature=signer.sign(payload.encode("utf-8")),
        key_id=signer.key_id,
        algorithm="ed25519",
    )
    return ChangesPage(changes=events, next_cursor=next_cursor, has_more=more, signed=signed)


@router.get("/export", responses=errors(401, 403))
def export(
    session: SessionDep, _: ReaderDep, secrets: SecretsDep, request: Request
) -> SignedExport:
    """The whole list, signed with ed25519: verify ``signature`` over ``payload`` with the
    public key, then follow ``/v1/changes?since=<payload.cursor>``."""
    cache: ExportCache = request.app.state.export_cache
    with cache.lock:
        if cache.export is not None and cache.cursor == latest_cursor(session):
            return cache.export
        document = export_document(session)
        payload = canonical_json(document)
        signer = secrets.signer()
        cache.export = SignedExport(
            payload=payload,
            signature=signer.sign(payload.encode("utf-8")),
            key_id=signer.key_id,
            algorithm="ed25519",
        )
        cache.cursor = document["cursor"]
        return cache.export


@router.get("/export/public-key")
def public_key(secrets: SecretsDep) -> PublicKey:
    """The key exports are signed with. Public on purpose: anyone holding an export
    may verify it. Pin it once; a changed ``key_id`` means the key was rotated, and
    while ``endorsement`` is present the old key vouches for the new one."""
    signer = secrets.signer()
    previous = secrets.previous_signer()
    endorsement = None
    if previous is not None and previous.key_id != signer.key_id:
        payload = canonical_json(
            {
                "format": ENDORSEMENT_FORMAT,
                "key_id": signer.key_id,
                "public_key_pem": signer.public_pem,
            }
        )
        endorsement = SignedExport(
            payload=payload,
            signature=previous.sign(payload.encode("utf-8")),
            key_id=previous.key_id,
            algorithm="ed25519",
        )
    return PublicKey(
        algorithm="ed25519",
        key_id=signer.key_id,
        public_key_pem=signer.public_pem,
        endorsement=endorsement,
    )
