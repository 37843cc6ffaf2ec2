"""Request dependencies: the database session and the calling principal with its role."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine
from sqlmodel import Session

from modelhash.registry._keycache import KeyCache
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

_bearer = HTTPBearer(
    auto_error=False,
    description="An API key (`Authorization: Bearer mh_...`); roles: reader < submitter < admin.",
)


async def get_session(request: Request) -> AsyncIterator[Session]:
    """One session per request, closed (and rolled back if uncommitted) afterwards.

    Async so that FastAPI does not hop to a worker thread to open it: making a
    session does no I/O. Closing it may, so that runs in the thread pool.
    """
    session = Session(request.app.state.engine, expire_on_commit=False)
    try:
        yield session
    finally:
        await run_in_threadpool(session.close)


SessionDep = Annotated[Session, Depends(get_session)]


async def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def _secrets(request: Request) -> Secrets:
    secrets: Secrets = request.app.state.secrets
    return secrets


SettingsDep = Annotated[Settings, Depends(_settings)]
SecretsDep = Annotated[Secrets, Depends(_secrets)]


async def _principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    if credentials is None:
        raise AuthenticationError("missing API key: send the header 'Authorization: Bearer KEY'")
    cache: KeyCache = request.app.state.key_cache
    principal = cache.get(credentials.credentials)
    if principal is None:
        engine = request.app.state.engine
        principal = await run_in_threadpool(_authenticate, engine, credentials.credentials)
        if principal is None:
            raise AuthenticationError("unknown or revoked API key")
        cache.put(credentials.credentials, principal)
    return principal


def _authenticate(engine: Engine, key: str) -> Principal | None:
    with Session(engine) as session:
        return authenticate(session, key=key)


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
