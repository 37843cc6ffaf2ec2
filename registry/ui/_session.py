"""Web UI sessions: sign in with an API key, a cookie for the session, CSRF tokens.

Signing in checks the key exactly as REST does and stores a session row holding the
SHA-256 of a random cookie token, the key's id and a random CSRF token; the key
itself is never stored or echoed. Every request re-reads the key row, so a revoked
key ends its sessions at once, and the role is always the key's current one.

The cookie is HttpOnly and SameSite=Strict, Secure when the request came over HTTPS
(or when ``ui_secure_cookie`` says so), and lasts ``ui_session_minutes``. Every form
carries the session's CSRF token and every POST compares it in constant time; the
sign-in form, which has no session yet, uses a double-submit cookie instead.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from fastapi import Request, Response
from sqlalchemy import delete
from sqlmodel import Session, col, select

from modelhash.registry._settings import Settings
from modelhash.registry.crud.audit import record
from modelhash.registry.crud.keys import Principal, _label, authenticate
from modelhash.registry.models import ApiKey, UiSession, utcnow

__all__ = [
    "COOKIE",
    "LOGIN_COOKIE",
    "UiUser",
    "csrf_ok",
    "end_session",
    "login_token",
    "resolve",
    "set_login_cookie",
    "set_session_cookie",
    "start_session",
]

COOKIE = "mh_session"
LOGIN_COOKIE = "mh_login_csrf"
_PATH = "/ui"


@dataclass(frozen=True)
class UiUser:
    """The signed-in analyst: the key's principal, the session's CSRF token and expiry."""

    principal: Principal
    csrf: str
    expires_at: datetime
    key_name: str | None


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def start_session(session: Session, *, key: str, settings: Settings) -> tuple[str, UiUser] | None:
    """Sign in with ``key``: the new cookie token and user, or None for a bad key."""
    principal = authenticate(session, key=key)
    if principal is None or principal.key_id is None:
        return None
    now = utcnow()
    token = secrets.token_urlsafe(32)
    row = UiSession(
        token_hash=_digest(token),
        key_id=principal.key_id,
        csrf=secrets.token_urlsafe(32),
        created_at=now,
        expires_at=now + timedelta(minutes=settings.ui_session_minutes),
    )
    # Expired sessions are removed as new ones start, so the table stays small.
    session.exec(delete(UiSession).where(col(UiSession.expires_at) < now))
    session.add(row)
    record(session, actor=principal, action="ui.signed_in", target_type="api_key",
           target_id=str(principal.key_id))
    session.commit()
    key_row = session.get(ApiKey, principal.key_id)
    return token, UiUser(principal, row.csrf, row.expires_at, key_row.name if key_row else None)


def resolve(session: Session, token: str | None) -> UiUser | None:
    """The user a cookie token stands for, or None if unknown, expired or its key revoked."""
    if not token or len(token) > 100:
        return None
    found = session.exec(
        select(UiSession, ApiKey)
        .join(ApiKey, col(ApiKey.id) == col(UiSession.key_id))
        .where(UiSession.token_hash == _digest(token))
    ).first()
    if found is None:
        return None
    row, key = found
    if row.expires_at <= utcnow() or key.revoked_at is not None or key.id is None:
        return None
    principal = Principal(key_id=key.id, role=key.role, label=_label(key))
    return UiUser(principal, row.csrf, row.expires_at, key.name)


def end_session(session: Session, token: str | None) -> None:
    """Sign out: the session row is deleted, so the cookie is worthless even if kept."""
    if token:
        session.exec(delete(UiSession).where(col(UiSession.token_hash) == _digest(token)))
        session.commit()


def csrf_ok(expected: str | None, given: str | None) -> bool:
    """Whether a form's CSRF token is the expected one (constant-time)."""
    if not expected or not given:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


def _secure(request: Request, settings: Settings) -> bool:
    if settings.ui_secure_cookie is not None:
        return settings.ui_secure_cookie
    return request.url.scheme == "https"


def set_session_cookie(
    response: Response, request: Request, settings: Settings, token: str
) -> None:
    """The session cookie: HttpOnly, SameSite=Strict, Secure behind TLS, for the lifetime."""
    response.set_cookie(
        COOKIE, token, max_age=settings.ui_session_minutes * 60, path=_PATH,
        httponly=True, samesite="strict", secure=_secure(request, settings),
    )
    response.delete_cookie(LOGIN_COOKIE, path=_PATH)


def login_token(request: Request) -> str:
    """The sign-in form's CSRF token: the one in the browser's cookie, or a new one."""
    token = request.cookies.get(LOGIN_COOKIE)
    if not token or len(token) > 100:
        token = secrets.token_urlsafe(32)
    return token


def set_login_cookie(response: Response, request: Request, settings: Settings, token: str) -> None:
    """The sign-in form's double-submit cookie: short-lived, HttpOnly, SameSite=Strict."""
    response.set_cookie(
        LOGIN_COOKIE, token, max_age=3600, path=_PATH, httponly=True, samesite="strict",
        secure=_secure(request, settings),
    )
