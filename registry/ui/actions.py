"""Sign-in, sign-out and the forms that change flags.

Every POST here needs the session's CSRF token (the sign-in form a double-submit
token); without it the answer is 403 and nothing changes. Flag actions and reports
call the same crud functions as REST, which check the role and write the audit.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlmodel import Session

from modelhash.registry.crud.flags import change_status
from modelhash.registry.crud.reports import REPORT_KINDS, create_report
from modelhash.registry.deps import SessionDep, SettingsDep
from modelhash.registry.errors import BadRequestError
from modelhash.registry.ui._deps import CsrfForm, CsrfRejected, render
from modelhash.registry.ui._session import (
    COOKIE,
    LOGIN_COOKIE,
    csrf_ok,
    end_session,
    login_token,
    resolve,
    set_login_cookie,
    set_session_cookie,
    start_session,
)

__all__ = ["router"]

router = APIRouter(prefix="/ui", include_in_schema=False)

_ACTIONS = ("dispute", "confirm", "revoke", "reinstate")
Reason = Annotated[str, Form(min_length=1, max_length=2000)]


def _safe_next(target: str | None) -> str:
    """Only a path inside the UI: never an open redirect."""
    if target and target.startswith("/ui/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/ui/"


@router.get("/login", response_class=HTMLResponse)
def login_form(
    request: Request, settings: SettingsDep, session: SessionDep,
    next: Annotated[str, Query(max_length=500)] = "/ui/",
) -> Response:
    """The sign-in form: an API key and a hidden CSRF token."""
    if resolve(session, request.cookies.get(COOKIE)) is not None:
        return RedirectResponse(_safe_next(next), status_code=303)
    return _login_page(request, settings, next, None, 200)


def _login_page(
    request: Request, settings: SettingsDep, next: str, error: str | None, status: int
) -> Response:
    token = login_token(request)
    page = render(request, "login.html", None, status_code=status, next=_safe_next(next),
                  error=error, csrf_token=token)
    set_login_cookie(page, request, settings, token)
    return page


@router.post("/login")
def login(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    api_key: Annotated[str, Form(max_length=200)] = "",
    csrf_token: Annotated[str, Form(max_length=100)] = "",
    next: Annotated[str, Form(max_length=500)] = "/ui/",
) -> Response:
    """Check the key as REST does; on success set the session cookie and go on."""
    if not csrf_ok(request.cookies.get(LOGIN_COOKIE), csrf_token):
        raise CsrfRejected("the sign-in form's CSRF token is missing or wrong: reload the page")
    started = start_session(session, key=api_key.strip(), settings=settings)
    if started is None:
        return _login_page(request, settings, next, "Unknown or revoked API key.", 401)
    cookie, _ = started
    response = RedirectResponse(_safe_next(next), status_code=303)
    set_session_cookie(response, request, settings, cookie)
    return response


@router.post("/logout")
def logout(request: Request, session: SessionDep, _: CsrfForm) -> Response:
    """End the session on the server and clear the cookie."""
    end_session(session, request.cookies.get(COOKIE))
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(COOKIE, path="/ui")
    return response


def _act(session: Session, user: CsrfForm, flag_id: str, action: str, reason: str) -> Response:
    if not reason.strip():
        raise BadRequestError("give a reason")
    change_status(
        session, flag_id=flag_id[:64], action=action, reason=reason.strip(), actor=user.principal
    )
    return RedirectResponse(f"/ui/flags/{quote(flag_id)}?done={action}", status_code=303)


@router.post("/flags/{flag_id}/{action}")
def flag_action(
    flag_id: str, action: str, session: SessionDep, user: CsrfForm, reason: Reason
) -> Response:
    """Dispute, confirm, revoke or reinstate, with a reason; or report (any role)."""
    if action in _ACTIONS:
        return _act(session, user, flag_id, action, reason)
    if action in REPORT_KINDS:
        create_report(session, flag_id=flag_id[:64], kind=action, note=reason.strip(),
                      actor=user.principal)
        return RedirectResponse(f"/ui/flags/{quote(flag_id)}?done=report", status_code=303)
    raise BadRequestError(f"unknown action {action!r}")
