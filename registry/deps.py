"""Request dependencies: the database session and the calling principal with its role."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session

from modelhash.registry._settings import Settings
from modelhash.registry._signing import Secrets
from modelhash.registry.crud.keys import Principal, authenticate
from modelhash.registry.errors import AuthenticationError, PermissionDeniedError

__all__ = [
    "AdminDep",
    "ReaderDep",
    "SecretsDep",
    "SessionDep",
    "SettingsDep",
    "SubmitterDep",
    "get_session",
    "require",
]

_log = logging.getLogger("modelhash.registry")

_bearer = HTTPBearer(
    auto_error=False,
    description="An API key (`Authorization: Bearer mh_...`); roles: reader < submitter < admin.",
)


async def get_session(request: Request) -> AsyncIterator[Session]:
    """One session per request, closed (and rolled back if uncommitted) afterwards.

    Async so that FastAPI does not hop to a worker thread to open it: making a
    session does no I/O. Closing it may, so that runs in the thread pool.

    It is closed when the route returns, before the answer is sent (the
    dependency's ``scope="function"``), and closing never raises: a connection
    the database dropped (a restart, a killed backend) is discarded from the pool
    and logged. Anything left uncommitted was rolled back by the database with
    the connection, so the answer, already decided, stands. Raising here instead
    would happen after the response started and drop the connection unanswered.
    """
    session = Session(request.app.state.engine, expire_on_commit=False)
    try:
        yield session
    finally:
        await run_in_threadpool(_close, session)


def _close(session: Session) -> None:
    try:
        session.close()
    except SQLAlchemyError as exc:
        _log.warning("discarding a broken database connection: %s", type(exc).__name__)
        with contextlib.suppress(SQLAlchemyError):
            session.invalidate()


SessionDep = Annotated[Session, Depends(get_session, scope="function")]


async def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def _secrets(request: Request) -> Secrets:
    secrets: Secrets = request.app.state.secrets
    return secrets


SettingsDep = Annotated[Settings, Depends(_settings)]
SecretsDep = Annotated[Secrets, Depends(_secrets)]


async def _principal(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The key's principal, read from the database on every request.

    No cache: a revoked key fails on its very next request on every process and
    replica. The look-up is one indexed read on the request's own session and
    connection, so it costs a round trip, not a connection.
    """
    if credentials is None:
        raise AuthenticationError("missing API key: send the header 'Authorization: Bearer KEY'")
    principal = await run_in_threadpool(authenticate, session, key=credentials.credentials)
    if principal is None:
        raise AuthenticationError("unknown or revoked API key")
    return principal


def require(role: str) -> Callable[[Principal], Coroutine[Any, Any, Principal]]:
    """A dependency that admits keys whose role includes ``role``."""

    async def check(principal: Annotated[Principal, Depends(_principal)]) -> Principal:
        if not principal.allows(role):
            raise PermissionDeniedError(f"this needs a {role} key; yours is a {principal.role} key")
        return principal

    return check


ReaderDep = Annotated[Principal, Depends(require("reader"))]
SubmitterDep = Annotated[Principal, Depends(require("submitter"))]
AdminDep = Annotated[Principal, Depends(require("admin"))]
