"""A Hugging Face Hub webhook receiver as a plain ASGI app: no web framework needed.

Point a Hub webhook (Settings -> Webhooks) at it with a secret; on every model repo
created or updated it calls your ``on_event`` with the repo and its new commit.
``on_event`` should only enqueue (the Hub expects a quick answer);
:func:`background_checker` makes one that writes the event to a durable queue (a
SQLite file, so a restart loses nothing), runs :func:`~client.hub_check` with
every layer in worker threads, retries repos that could not be fetched with
backoff, and hands you each report::

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
for anything but POST, 413 for a body over 1 MiB, 503 when the event could not be
queued (the Hub retries).
"""

from __future__ import annotations

import hmac
import inspect
import json
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelhash._config import default_cache_dir
from modelhash._hubqueue import CheckQueue, Job
from modelhash._scan import Checker
from modelhash.errors import InputError, ModelhashError
from modelhash.fingerprint import Layers

__all__ = ["BackgroundChecker", "RepoEvent", "WebhookReceiver", "background_checker"]

QUEUE_FILE = "hub-check-queue.sqlite3"

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
        try:
            result = self._on_event(parsed)
            if inspect.isawaitable(result):
                await result
        except Exception as exc:  # the queue is full or its file unwritable: let the Hub retry
            _log.error("could not queue %s: %s: %s", parsed.ref, type(exc).__name__, exc)
            await _answer(send, 503, {"error": "could not queue the check; retry later"})
            return
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


class BackgroundChecker:
    """An ``on_event`` that queues each event durably and checks it in the background.

    Calling it writes the event to ``queue`` (a :class:`CheckQueue` or its file path;
    default ``hub-check-queue.sqlite3`` in the modelhash cache folder) and returns at
    once. ``workers`` threads (0: none, the queue only fills) run :func:`hub_check`
    on due jobs, oldest first, with
    every layer unless ``layers="exact"``; jobs left by a previous process are
    picked up on start. ``on_report(event, report)`` gets each
    :class:`~modelhash.HubReport`; a check that fails is retried with backoff
    (the queue's ``base_delay``, doubling) and only after its last attempt is
    ``on_report`` called with the exception. A bad repo reference is not retried.
    """

    def __init__(
        self,
        checker: Checker,
        on_report: Callable[[RepoEvent, Any], None],
        *,
        queue: CheckQueue | str | os.PathLike[str] | None = None,
        workers: int = 1,
        download: bool = True,
        layers: Layers = "all",
        poll: float = 5.0,
    ) -> None:
        self._own = not isinstance(queue, CheckQueue)
        self.queue = queue if isinstance(queue, CheckQueue) else CheckQueue(
            Path(queue) if queue is not None else default_cache_dir() / QUEUE_FILE
        )
        self._checker = checker
        self._on_report = on_report
        self._download = download
        self._layers: Layers = layers
        self._poll = poll
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._busy = 0
        self._busy_lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._loop, name=f"modelhash-hub-{i}", daemon=True)
            for i in range(max(0, workers))
        ]
        for t in self._threads:
            t.start()

    def __call__(self, event: RepoEvent) -> None:
        self.queue.put(event.repo_id, event.revision, event.action, event.scope)
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                with self._busy_lock:
                    job = self.queue.claim()
                    if job is not None:
                        self._busy += 1
                due = self.queue.next_due() if job is None else None
            except Exception as exc:  # the queue file failed (disk full, locked): keep going
                _log.error("check queue: %s: %s", type(exc).__name__, exc)
                self._wake.wait(self._poll)
                continue
            if job is None:
                wait = self._poll if due is None else max(0.01, min(self._poll, due - time.time()))
                self._wake.wait(wait)
                self._wake.clear()
                continue
            try:
                self._run(job)
            except Exception as exc:  # the job stays leased and runs again when that ends
                _log.error("check of %s: %s: %s", job.repo_id, type(exc).__name__, exc)
            finally:
                with self._busy_lock:
                    self._busy -= 1

    def _run(self, job: Job) -> None:
        from modelhash._hf import hub_check, parse_repo_ref

        event = RepoEvent(job.repo_id, job.action, job.scope, job.revision)
        report: Any
        try:
            parse_repo_ref(event.ref)
        except InputError as exc:  # a bad reference never gets better: no retry
            self.queue.give_up(job, exc.diagnostics())
            _log.warning("hub check of %r refused: %s", event.ref, exc.diagnostics())
            report = exc
        else:
            try:
                report = hub_check(event.ref, self._checker, download=self._download,
                                   layers=self._layers)
            except Exception as exc:
                why = exc.diagnostics() if isinstance(exc, ModelhashError) else (
                    f"{type(exc).__name__}: {exc}")
                if self.queue.retry(job, why):
                    _log.warning("hub check of %s failed (attempt %d), will retry: %s",
                                 event.ref, job.attempts, why)
                    return
                _log.warning("hub check of %s failed for good: %s", event.ref, why)
                report = exc
            else:
                self.queue.done(job)
        try:
            self._on_report(event, report)
        except Exception:
            _log.exception("on_report failed for %s", event.ref)

    def idle(self) -> bool:
        """True when no job is running and none is due now."""
        with self._busy_lock:
            if self._busy:
                return False
            due = self.queue.next_due()
            return due is None or due > time.time()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until :meth:`idle` (for tests and a graceful shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.idle():
                return True
            self._wake.set()
            time.sleep(0.05)
        return self.idle()

    def close(self) -> None:
        """Stop the workers after their current job; pending jobs stay queued."""
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join()
        if self._own:
            self.queue.close()


def background_checker(
    checker: Checker,
    on_report: Callable[[RepoEvent, Any], None],
    *,
    workers: int = 1,
    download: bool = True,
    queue: CheckQueue | str | os.PathLike[str] | None = None,
    layers: Layers = "all",
) -> BackgroundChecker:
    """A :class:`BackgroundChecker`: the ``on_event`` to give :class:`WebhookReceiver`."""
    return BackgroundChecker(checker, on_report, queue=queue, workers=workers,
                             download=download, layers=layers)
