"""What every router shares: the error body and the error responses it documents."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

__all__ = ["ERRORS", "ErrorBody", "errors"]


class ErrorBody(BaseModel):
    """Every 4xx and 5xx answer: one human-readable ``detail``."""

    detail: Any


_TEXT = {
    400: "A malformed hash, prefix or parameter.",
    401: "No API key, or an unknown or revoked one.",
    403: "The key's role may not do this.",
    404: "Not found.",
    409: "Conflicts with what is stored.",
    413: "Request body too large.",
    422: "The request body or a parameter failed validation.",
    503: "The database is unreachable or not migrated.",
}

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text} for code, text in _TEXT.items()
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The documented error responses for ``codes``."""
    return {c: ERRORS[c] for c in codes}
