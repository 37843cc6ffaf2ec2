"""Bases and references, API keys (admins) and the audit log search (admins)."""

from __future__ import annotations

import math
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Form, Path, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from modelhash.registry.crud.bases import base_fingerprints, base_sketch_kinds, list_bases
from modelhash.registry.crud.keys import ROLE_RANK, create_key, list_keys, revoke_key
from modelhash.registry.crud.search import activity
from modelhash.registry.deps import SessionDep
from modelhash.registry.errors import BadRequestError
from modelhash.registry.ui._deps import CsrfForm, UserDep, render, require_role
from modelhash.registry.ui.pages import _day

__all__ = ["router"]

router = APIRouter(prefix="/ui", include_in_schema=False)

_AUDIT_PAGE = 50


@router.get("/bases", response_class=HTMLResponse)
def bases(request: Request, session: SessionDep, user: UserDep) -> HTMLResponse:
    """Reference bases and public references: never flagged, deltas are measured from them."""
    require_role(user, "reader")
    rows = list_bases(session)
    ids = [b.id for b in rows]
    return render(request, "bases.html", user, bases=rows,
                  hashes=base_fingerprints(session, base_ids=ids),
                  kinds=base_sketch_kinds(session, base_ids=ids))


def _keys_page(request: Request, session: SessionDep, user: UserDep, created: str | None,
               status_code: int = 200) -> HTMLResponse:
    return render(request, "keys.html", user, status_code=status_code, keys=list_keys(session),
                  roles=list(ROLE_RANK), created=created)


@router.get("/keys", response_class=HTMLResponse)
def keys(request: Request, session: SessionDep, user: UserDep) -> HTMLResponse:
    """Every API key with its role (admins); secrets are never shown after creation."""
    require_role(user, "admin")
    return _keys_page(request, session, user, None)


@router.post("/keys", response_class=HTMLResponse)
def new_key(
    request: Request, session: SessionDep, user: CsrfForm,
    role: Annotated[str, Form(max_length=16)],
    name: Annotated[str, Form(max_length=200)] = "",
) -> HTMLResponse:
    """Make a key; its secret is shown once, on this answer only."""
    require_role(user, "admin")
    if role not in ROLE_RANK:
        raise BadRequestError(f"unknown role {role!r}")
    _, key = create_key(session, role=role, name=name.strip() or None, actor=user.principal)
    response = _keys_page(request, session, user, key, status_code=201)
    response.headers["Cache-Control"] = "no-store"
    return response


@router.post("/keys/{key_id}/revoke")
def drop_key(
    request: Request, key_id: Annotated[int, Path(ge=1, le=2**31 - 1)], session: SessionDep,
    user: CsrfForm,
) -> RedirectResponse:
    """Revoke a key at once (its UI sessions end with it), then show the list again."""
    require_role(user, "admin")
    revoke_key(session, key_id=key_id, actor=user.principal)
    return RedirectResponse("/ui/keys", status_code=303)


@router.get("/audit", response_class=HTMLResponse)
def audit(
    request: Request, session: SessionDep, user: UserDep,
    actor: Annotated[str, Query(max_length=64)] = "",
    action: Annotated[str, Query(max_length=64)] = "",
    target: Annotated[str, Query(max_length=64)] = "",
    since: Annotated[str, Query(max_length=10)] = "",
    until: Annotated[str, Query(max_length=10)] = "",
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
) -> HTMLResponse:
    """Search the audit log (admins): who did what, to which record, when and why."""
    require_role(user, "admin")
    try:
        since_at, until_at = _day(since, "from"), _day(until, "to", end=True)
    except ValueError as exc:
        raise BadRequestError(str(exc)) from None
    rows, total = activity(
        session, actor=actor.strip() or None, action=action.strip() or None,
        target=target.strip() or None, since=since_at, until=until_at,
        limit=_AUDIT_PAGE, offset=(page - 1) * _AUDIT_PAGE,
    )
    form = {"actor": actor, "action": action, "target": target, "since": since, "until": until}
    kept = {k: v for k, v in form.items() if v}
    return render(
        request, "audit.html", user, rows=rows, total=total, page=page, form=form,
        pages=max(1, math.ceil(total / _AUDIT_PAGE)),
        link=lambda p: "/ui/audit?" + urlencode({**kept, "page": p}),
    )
