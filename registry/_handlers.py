"""Exception handlers: every error becomes ``{"detail": ...}`` with its status.

Registry errors carry their status, malformed hashes are 400, validation failures
422, and any database error 503 (a database that is down, restarting, not migrated,
or a connection killed mid-request): never a 500 or a dropped connection.

The 422 body is built from the validation errors with every echoed value made safe:
text is escaped to ASCII and cut short, containers are left out. A value that cannot
be encoded (a lone surrogate) or is huge can therefore never break the error answer.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, SQLAlchemyError

from modelhash.errors import InvalidHashError
from modelhash.registry.errors import AuthenticationError, ServiceError

__all__ = ["install_handlers", "safe_errors"]

_log = logging.getLogger("modelhash.registry")

_ECHO_CHARS = 120


def _safe_text(value: str) -> str:
    text = value.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) > _ECHO_CHARS:
        text = text[:_ECHO_CHARS] + "..."
    return text


def _safe_scalar(value: Any) -> Any:
    """``value`` if JSON can always carry it; text escaped and shortened; else None."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return _safe_text(value)
    return None


def safe_errors(errors: Any) -> list[dict[str, Any]]:
    """Validation errors with only renderable fields: type, loc, msg, and a scalar input."""
    out: list[dict[str, Any]] = []
    for error in list(errors)[:20]:
        if not isinstance(error, dict):
            continue
        item: dict[str, Any] = {
            "type": _safe_text(str(error.get("type", "invalid"))),
            "loc": [
                p if isinstance(p, int) else _safe_text(str(p)) for p in error.get("loc", ())
            ],
            "msg": _safe_text(str(error.get("msg", "invalid value"))),
        }
        echoed = _safe_scalar(error.get("input"))
        if echoed is not None:
            item["input"] = echoed
        out.append(item)
    return out


def install_handlers(app: FastAPI) -> None:
    """Register the handlers described in the module docstring on ``app``."""

    async def service_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, AuthenticationError) else None
        if exc.status >= 500:
            _log.error("request failed", exc_info=exc)
        return JSONResponse(
            {"detail": _safe_text_long(str(exc))}, status_code=exc.status, headers=headers
        )

    async def invalid_hash(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": _safe_text_long(str(exc))}, status_code=400)

    async def invalid_request(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return JSONResponse({"detail": safe_errors(exc.errors())}, status_code=422)

    async def database_down(_: Request, exc: Exception) -> JSONResponse:
        _log.error("database error", exc_info=exc)
        return JSONResponse(
            {"detail": "the database is unavailable or not migrated; retry later"},
            status_code=503,
            headers={"Retry-After": "1"},
        )

    async def unstorable(_: Request, exc: Exception) -> JSONResponse:
        # Input that passed validation but that the database refuses; its message
        # quotes the parameters, so only the class is logged.
        _log.warning("value refused by the database: %s", type(exc).__name__)
        return JSONResponse({"detail": "a value in the request cannot be stored"}, status_code=400)

    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(DataError, unstorable)
    app.add_exception_handler(InvalidHashError, invalid_hash)
    app.add_exception_handler(SQLAlchemyError, database_down)


def _safe_text_long(value: str) -> str:
    return value.encode("utf-8", "backslashreplace").decode("utf-8")
