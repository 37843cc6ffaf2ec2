"""The JSON body guard: every request body is bounded in depth and must be valid Unicode.

It sits in front of every route, so no handler can forget it. A JSON body is parsed
once here (the size is already capped by :class:`~modelhash.registry._metrics.RequestMiddleware`),
and refused with 422 and one line when it

- nests objects and arrays deeper than :data:`MAX_DEPTH` levels (deep JSON is legal,
  but the database, the response serialiser and other readers choke on it, so it
  could be stored and then never be answered again), or
- holds text that is not valid Unicode, such as a lone UTF-16 surrogate
  (``"\\ud800"``): it can be neither stored in PostgreSQL nor written back as UTF-8.

A body that is not JSON at all is passed on untouched: FastAPI answers it with its
usual 422. The guard then replays the bytes it read, so the route sees the same body.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from modelhash.registry._metrics import send_error

__all__ = ["MAX_DEPTH", "JsonBodyGuard", "body_problem"]

MAX_DEPTH = 32
"""Deepest nesting of objects and arrays accepted in a body (the outermost is level 1)."""


def _where(path: list[str | int]) -> str:
    out = "body"
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += "." + part.encode("ascii", "backslashreplace").decode("ascii")
    return out


def _bad_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def body_problem(value: Any) -> str | None:
    """Why a parsed JSON value may not be accepted, or None. Iterative: no recursion."""
    stack: list[tuple[Any, int, list[str | int]]] = [(value, 1, [])]
    while stack:
        item, depth, path = stack.pop()
        if isinstance(item, str):
            if _bad_text(item):
                return f"{_where(path)}: text is not valid Unicode (a lone surrogate?)"
            continue
        if isinstance(item, dict):
            children: list[tuple[str | int, Any]] = []
            for key, child in item.items():
                if _bad_text(key):
                    return f"{_where(path)}: a key is not valid Unicode (a lone surrogate?)"
                children.append((key, child))
        elif isinstance(item, list):
            children = list(enumerate(item))
        else:
            continue
        if depth > MAX_DEPTH:
            return f"{_where(path)}: JSON nested deeper than {MAX_DEPTH} levels"
        for key, child in reversed(children):
            if isinstance(child, dict | list | str):
                stack.append((child, depth + 1, [*path, key]))
    return None


def _is_json(scope: Scope) -> bool:
    if scope.get("method") not in {"POST", "PUT", "PATCH", "DELETE"}:
        return False
    for name, value in scope.get("headers", []):
        if name == b"content-type":
            media = bytes(value).split(b";", 1)[0].strip().lower()
            return media == b"application/json" or media.endswith(b"+json")
    return False


class JsonBodyGuard:
    """Reads a JSON body, checks it with :func:`body_problem`, then replays it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _is_json(scope):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            try:
                message = await receive()
            except HTTPException as exc:  # the size cap, raised by the outer middleware
                await send_error(send, exc.status_code, str(exc.detail))
                return
            if message["type"] != "http.request":
                # The client went away; let the app see the disconnect.
                await self.app(scope, _replay([message]), send)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        problem = _check(body)
        if problem is not None:
            await send_error(send, 422, problem)
            return
        await self.app(scope, _replay([{"type": "http.request", "body": body}], receive), send)


def _check(body: bytes) -> str | None:
    if not body:
        return None
    try:
        parsed = json.loads(body)
    except RecursionError:
        return f"body: JSON nested deeper than {MAX_DEPTH} levels"
    except ValueError:
        return None  # not JSON: FastAPI says so in its own words
    return body_problem(parsed)


def _replay(messages: list[Message], then: Receive | None = None) -> Receive:
    pending = list(messages)

    async def receive() -> Message:
        if pending:
            return pending.pop(0)
        if then is not None:
            return await then()
        return {"type": "http.disconnect"}

    return receive
