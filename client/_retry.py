"""When to retry a registry call, and how long to wait first.

A call is retried only when repeating it cannot do harm: any call whose connection
was never made (the request never left), and idempotent calls (reads, checks, and
flag submissions, which the registry de-duplicates) after a timeout, a dropped
connection, or a 429/502/503/504. Waits grow exponentially with full jitter, so
many clients that failed together do not come back together; a ``Retry-After``
header is honoured up to a cap.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime

import httpx

__all__ = ["RETRY_STATUSES", "Retry"]

RETRY_STATUSES: frozenset[int] = frozenset({429, 502, 503, 504})


@dataclass(frozen=True)
class Retry:
    """A retry policy: ``attempts`` tries in all, waits from ``backoff`` up to ``max_backoff``.

    ``Retry(attempts=1)`` never retries.
    """

    attempts: int = 4
    backoff: float = 0.25
    max_backoff: float = 8.0
    max_retry_after: float = 30.0
    statuses: frozenset[int] = RETRY_STATUSES
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1")
        if self.backoff < 0 or self.max_backoff < 0:
            raise ValueError("backoff times cannot be negative")

    def retry_exception(self, exc: httpx.TransportError, *, idempotent: bool) -> bool:
        """Whether a transport failure may be retried."""
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
            return True
        return idempotent and isinstance(
            exc, httpx.TimeoutException | httpx.NetworkError | httpx.RemoteProtocolError
        )

    def retry_status(self, status: int, *, idempotent: bool) -> bool:
        """Whether an answer with ``status`` may be retried."""
        return idempotent and status in self.statuses

    def delay(self, attempt: int, response: httpx.Response | None = None) -> float:
        """Seconds to wait before try ``attempt + 1`` (``attempt`` counts from 1)."""
        ceiling = min(self.max_backoff, self.backoff * (2 ** (attempt - 1)))
        wait = self.rng.uniform(0, ceiling)
        if response is not None:
            after = _retry_after(response)
            if after is not None:
                wait = max(wait, min(after, self.max_retry_after))
        return wait


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    date = response.headers.get("date")
    try:
        now = parsedate_to_datetime(date) if date else None
    except (TypeError, ValueError):
        now = None
    if now is None:
        from datetime import UTC, datetime

        now = datetime.now(UTC)
    return max(0.0, (when - now).total_seconds())
