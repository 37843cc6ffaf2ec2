"""A Hugging Face Hub webhook receiver as a plain ASGI app: no web framework needed.

Point a Hub webhook (Settings -> Webhooks) at it with a secret; on every model repo
created or updated it calls your ``on_event`` with the repo and its new commit.
``on_event`` should only enqueue (the Hub expects a quick answer);
:func:`background_checker` makes one that runs :func:`~client.hub_check` in a
worker thread and hands you each report::

    import os
    from modelhash import RegistryClient, WebhookReceiver, background_checker

    registry = RegistryClient()
    app = WebhookReceiver(
        os.environ["WEBHOOK_SECRET"],
        background_checker(registry, on_report=lambda event, report: ...),
    )
    # serve with any ASGI server: uvicorn hub_webhook:app --port 9001

Answers: 200 (queued, or ignored with a reason), 401 for a missing or wrong
secret (compared in constant time), 400 for a body that is not a Hub event, 405
for anything but POST, 413 for a body over 1 MiB.
"""

from __future__ import annotations

import hmac
import inspect
import json
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from modelhash._scan import Checker

__all__ = ["RepoEvent", "WebhookReceiver", "background_checker"]

_log = logging.getLogger("modelhash.webhook")

MAX_BODY = 1024 * 1024
_ACTIONS = ("create", "update")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class RepoEvent:
    """A model repo that was created or changed: what to check, at which commit."""

    repo_id: str
    action: str
    scope: str
    revision: str | None

    @property
    def ref(self) -> str:
        """``org/name@commit`` (or just the repo id when the Hub sent no commit)."""
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id


class _BadEvent(ValueError):
    pass


def parse_event(payload: object) -> RepoEvent | str:
    """The repo event in a Hub webhook payload, or why it is not one to check."""
    if not isinstance(payload, dict):
        raise _BadEvent("the body is not a JSON object")
    event, repo = payload.get("event"), payload.get("repo")
    if not isinstance(event, dict) or not isinstance(repo, dict):
        raise _BadEvent("no 'event' or 'repo' object")
    action, scope = event.get("action"), event.get("scope")
    kind, name = repo.get("type"), repo.get("name")
    if not all(isinstance(v, str) and v for v in (action, scope, kind, name)):
        raise _BadEvent("event.action, event.scope, repo.type and repo.name must be strings")
    assert isinstance(action, str) and isinstance(scope, str) and isinstance(name, str)
    if kind != "model":
        return f"a {kind} repo, not a model"
    if action not in _ACTIONS:
        return f"action {action!r} changes no weights"
    if not scope.startswith("repo"):
        return f"scope {scope!r} is not about the repo's content"
    head = repo.get("headSha")
    return RepoEvent(name, action, scope, head if isinstance(head, str) and head else None)


class WebhookReceiver:
    """The ASGI app. ``on_event`` may be a plain function or a coroutine function."""

    def __init__(
        self,
        secret: str,
        on_event: Callable[[RepoEvent], Awaitable[None] | None],
        *,
        max_body: int = MAX_BODY,
    ) -> None:
        if not secret:
            raise ValueError("a webhook secret is required")
        self._secret = secret.encode("utf-8")
        self._on_event = on_event
        self._max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        if scope.get("method") != "POST":
            await _answer(send, 405, {"error": "POST only"}, [(b"allow", b"POST")])
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        given = headers.get(b"x-webhook-secret", b"")
        if not hmac.compare_digest(given, self._secret):
            await _answer(send, 401, {"error": "missing or wrong X-Webhook-Secret"})
            return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self._max_body:
                await _answer(send, 413, {"error": "body too large"})
                return
        try:
            parsed = parse_event(json.loads(body))
        except (ValueError, RecursionError) as exc:
            reason = str(exc) if isinstance(exc, _BadEvent) else "the body is not JSON"
            await _answer(send, 400, {"error": reason})
            return
        if isinstance(parsed, str):
            await _answer(send, 200, {"status": "ignored", "reason": parsed})
            return
        result = self._on_event(parsed)
        if inspect.isawaitable(result):
            await result
        await _answer(send, 200, {"status": "queued", "repo": parsed.repo_id,
                                  "revision": parsed.revision})


async def _answer(
    send: Send, status: int, body: dict[str, Any], extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    raw = json.dumps(body).encode("utf-8")
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(raw)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": raw})


def background_checker(
    checker: Checker,
    on_report: Callable[[RepoEvent, Any], None],
    *,
    workers: int = 1,
    download: bool = True,
) -> Callable[[RepoEvent], None]:
    """An ``on_event`` that runs :func:`hub_check` on a thread pool.

    ``on_report(event, result)`` gets the :class:`HubReport`, or the exception if
    the check failed (the Hub or the registry down): re-queue those.
    """
    from modelhash._hf import hub_check

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="modelhash-hub")

    def run(event: RepoEvent) -> None:
        try:
            report: Any = hub_check(event.ref, checker, download=download)
        except Exception as exc:
            _log.warning("hub check of %s failed: %s", event.ref, exc)
            report = exc
        on_report(event, report)

    def enqueue(event: RepoEvent) -> None:
        pool.submit(run, event)

    return enqueue
