"""Read-only pages: dashboard, flag list, flag page and review queue.

Each page reads through the same crud functions as REST and applies the same
roles: a reader sees flags redacted and can only look them up by hash; listing,
notes and opinions need a submitter key; audit trails an admin or the flag's
submitter. These pages are plain HTML and work without JavaScript.
"""

from __future__ import annotations

import math
import time
from collections import deque
from datetime import UTC, date, datetime, timedelta
from datetime import time as dtime
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse
from sqlalchemy import select as sa_select
from sqlmodel import Session, col

from modelhash.errors import InvalidHashError
from modelhash.fingerprint import parse_hash
from modelhash.registry._metrics import Metrics
from modelhash.registry.crud.audit import list_audit
from modelhash.registry.crud.flags import _ACTIONS, fingerprints_of, get_flag
from modelhash.registry.crud.reports import count_reports, list_reports, reports_of
from modelhash.registry.crud.search import FlagQuery, activity, counts, search_flags
from modelhash.registry.deps import SessionDep
from modelhash.registry.models import Flag, ReferenceBase, SketchRow
from modelhash.registry.routes.flags import _detail as flag_detail
from modelhash.registry.routes.flags import may_read_audit
from modelhash.registry.ui._deps import UserDep, render
from modelhash.registry.ui._session import UiUser
from modelhash.wire import CATEGORIES, SEVERITIES

__all__ = ["available_actions", "router"]

router = APIRouter(prefix="/ui", include_in_schema=False)

PAGE = 25
_STATUSES = ("active", "disputed", "revoked")


@router.get("/", response_class=HTMLResponse)
def dashboard(request: Request, session: SessionDep, user: UserDep) -> HTMLResponse:
    """Counts by status and category, checks over time, and recent activity."""
    by_status = counts(session, "status")
    by_category = counts(session, "category")
    recent: list[Any] = []
    if user.principal.allows("admin"):
        recent, _ = activity(session, limit=12)
    recent_flags: list[Flag] = []
    if user.principal.allows("submitter"):
        recent_flags, _ = search_flags(session, FlagQuery(), limit=8, offset=0)
    reports = count_reports(session) if user.principal.allows("submitter") else 0
    series = _sample(request)
    return render(
        request, "dashboard.html", user,
        by_status=by_status, by_category=by_category, total=sum(by_status.values()),
        statuses=_STATUSES, categories=CATEGORIES, recent=recent, recent_flags=recent_flags,
        reports=reports, series=series, checks=series[-1] if series else None,
    )


def _counter(metrics: Metrics, verdict: str) -> float:
    value = metrics.registry.get_sample_value("modelhash_checked_items_total", {"verdict": verdict})
    return float(value or 0.0)


def _sample(request: Request) -> list[dict[str, Any]]:
    """This process's check counters, sampled at most once a minute when the dashboard
    is viewed: (time, clean, match). A restart starts a new series."""
    state = request.app.state
    history: deque[dict[str, Any]] = getattr(state, "ui_check_history", None) or deque(maxlen=240)
    state.ui_check_history = history
    metrics: Metrics = state.metrics
    now = time.time()
    point = {"at": datetime.fromtimestamp(now, UTC), "clean": _counter(metrics, "clean"),
             "match": _counter(metrics, "match")}
    if history and now - history[-1]["at"].timestamp() < 60:
        history[-1] = point
    else:
        history.append(point)
    return list(history)


def _day(value: str | None, name: str, end: bool = False) -> datetime | None:
    if not value:
        return None
    try:
        day = date.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{name}: {value!r} is not a date (YYYY-MM-DD)") from None
    start = datetime.combine(day, dtime.min, tzinfo=UTC)
    return start + timedelta(days=1) if end else start


def _is_hash(q: str) -> bool:
    try:
        parse_hash(q)
    except InvalidHashError:
        return False
    return True


@router.get("/flags", response_class=HTMLResponse)
def flags(
    request: Request,
    session: SessionDep,
    user: UserDep,
    q: Annotated[str, Query(max_length=200)] = "",
    status: Annotated[str, Query(max_length=16)] = "",
    category: Annotated[str, Query(max_length=32)] = "",
    severity: Annotated[str, Query(max_length=16)] = "",
    submitter: Annotated[str, Query(max_length=64)] = "",
    since: Annotated[str, Query(max_length=10)] = "",
    until: Annotated[str, Query(max_length=10)] = "",
    reported: Annotated[str, Query(max_length=4)] = "",
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
) -> HTMLResponse:
    """The flag list: search (any hash form, an id, or note text), filters and pages.

    A reader may only look flags up by hash or id, as REST allows.
    """
    form = {"q": q.strip(), "status": status, "category": category, "severity": severity,
            "submitter": submitter, "since": since, "until": until, "reported": reported}
    problems = [
        f"unknown {name} {value!r}"
        for name, value, allowed in (
            ("status", status, _STATUSES), ("category", category, CATEGORIES),
            ("severity", severity, SEVERITIES),
        )
        if value and value not in allowed
    ]
    try:
        since_at, until_at = _day(since, "from"), _day(until, "to", end=True)
    except ValueError as exc:
        problems.append(str(exc))
        since_at = until_at = None
    can_list = user.principal.allows("submitter")
    rows: list[Any] = []
    total = 0
    if not can_list and not (form["q"] and (_is_hash(form["q"]) or len(form["q"]) == 36)):
        problems.append("a reader key looks flags up by hash or id; listing needs a submitter key")
    if not problems:
        query = FlagQuery(
            q=form["q"] or None, status=status or None, category=category or None,
            severity=severity or None, submitter=(submitter or None) if can_list else None,
            since=since_at, until=until_at, reported=bool(reported) and can_list,
            text=can_list,
        )
        found, total = search_flags(session, query, limit=PAGE, offset=(page - 1) * PAGE)
        hashes = fingerprints_of(session, flag_ids=[f.id for f in found])
        rows = [flag_detail(session, f, user.principal, hashes[f.id]) for f in found]
    pages = max(1, math.ceil(total / PAGE))
    kept = {k: v for k, v in form.items() if v}
    return render(
        request, "flags.html", user, status_code=400 if problems and can_list else 200,
        rows=rows, total=total, page=page, pages=pages, form=form, problems=problems,
        statuses=_STATUSES, categories=CATEGORIES, severities=SEVERITIES, can_list=can_list,
        link=lambda p: "/ui/flags?" + urlencode({**kept, "page": p}),
        export_link="/ui/export.csv?" + urlencode(kept),
    )


def available_actions(user: UiUser, status: str) -> list[str]:
    """The actions this user's role may take on a flag with ``status`` (as REST checks)."""
    return [
        action for action, (role, allowed, _) in _ACTIONS.items()
        if user.principal.allows(role) and status in allowed
    ]


def _sketch_summary(session: Session, flag_id: str) -> list[dict[str, Any]]:
    rows = session.execute(
        sa_select(col(SketchRow.kind), col(SketchRow.base_id), col(SketchRow.tensors),
                  col(SketchRow.algorithm), col(ReferenceBase.name))
        .join(ReferenceBase, col(ReferenceBase.id) == col(SketchRow.base_id), isouter=True)
        .where(col(SketchRow.owner_type) == "flag", col(SketchRow.owner_id) == flag_id)
        .order_by(col(SketchRow.id))
    )
    return [
        {"kind": kind, "base_id": base_id, "base": name, "tensors": tensors, "algorithm": alg}
        for kind, base_id, tensors, alg, name in rows
    ]


@router.get("/flags/{flag_id}", response_class=HTMLResponse)
def flag_page(
    request: Request, flag_id: str, session: SessionDep, user: UserDep,
    done: Annotated[str, Query(max_length=32)] = "",
) -> HTMLResponse:
    """Fingerprints, model description, sketch summary, opinions, reports, audit, actions."""
    flag = get_flag(session, flag_id=flag_id[:64])
    detail = flag_detail(session, flag, user.principal)
    submitter = user.principal.allows("submitter")
    trail = (
        list_audit(session, target_type="flag", target_id=flag.id)
        if may_read_audit(user.principal, flag) else None
    )
    return render(
        request, "flag.html", user,
        flag=detail, sketches=_sketch_summary(session, flag.id) if submitter else [],
        reports=reports_of(session, flag_id=flag.id) if submitter else [],
        trail=trail, actions=available_actions(user, flag.status), done=done,
    )


@router.get("/review", response_class=HTMLResponse)
def review(request: Request, session: SessionDep, user: UserDep) -> HTMLResponse:
    """Disputed flags waiting for an admin, and what platforms reported."""
    if not user.principal.allows("submitter"):
        return render(request, "review.html", user, status_code=403, disputed=[], reports=[],
                      denied=True)
    disputed, n_disputed = search_flags(
        session, FlagQuery(status="disputed", text=True), limit=100, offset=0
    )
    return render(
        request, "review.html", user, disputed=disputed, n_disputed=n_disputed,
        reports=list_reports(session, limit=100), denied=False,
    )
