"""A durable queue of pending Hub checks, in one SQLite file.

The webhook receiver answers the Hub at once and checks later; without a durable
queue, a restart between the two would lose the check. Each repo event is written
here before the Hub gets its 200. Workers claim jobs with a lease: a job whose
worker died (the process restarted) is claimed again once its lease ends. A check
that fails (the Hub or the registry down, the revision not yet visible) is retried
with exponential backoff, and given up after ``max_attempts``, its last error kept.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from modelhash.errors import InputError

__all__ = ["CheckQueue", "Job"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS hub_checks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    repo_id TEXT NOT NULL,
    revision TEXT,
    action TEXT NOT NULL,
    scope TEXT NOT NULL,
    state TEXT NOT NULL,          -- pending, running, done, failed
    attempts INTEGER NOT NULL DEFAULT 0,
    due REAL NOT NULL,            -- when a pending job may run next
    lease_until REAL,             -- when a running job's worker is presumed dead
    last_error TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS hub_checks_due ON hub_checks (state, due);
"""


@dataclass(frozen=True)
class Job:
    """One pending check: the event's fields, and how often it was tried."""

    id: int
    repo_id: str
    revision: str | None
    action: str
    scope: str
    attempts: int


class CheckQueue:
    """The queue file at ``path`` (created if missing); safe to share between threads.

    ``base_delay * 2**(attempts-1)`` seconds pass before a retry, at most
    ``max_delay``. ``lease`` is how long a claimed job may run before another worker
    may take it over.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        max_attempts: int = 8,
        base_delay: float = 30.0,
        max_delay: float = 3600.0,
        lease: float = 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_attempts < 1 or base_delay < 0 or max_delay < 0 or lease <= 0:
            raise InputError("queue: max_attempts >= 1, delays >= 0 and lease > 0 required")
        self.path = Path(path)
        self.max_attempts = max_attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.lease = lease
        self._clock = clock
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), check_same_thread=False,
                                       isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise InputError(f"{self.path}: cannot open the check queue: {exc}") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def put(self, repo_id: str, revision: str | None, action: str, scope: str) -> int:
        """Queue a check (durably, before returning); an identical pending one is reused."""
        now = self._clock()
        with self._lock:
            row = self._db.execute(
                "SELECT id FROM hub_checks WHERE repo_id = ? AND revision IS ? "
                "AND state = 'pending'", (repo_id, revision),
            ).fetchone()
            if row is not None:
                return int(row[0])
            cur = self._db.execute(
                "INSERT INTO hub_checks (repo_id, revision, action, scope, state, due, "
                "created, updated) VALUES (?, ?, ?, ?, 'pending', ?, ?, ?)",
                (repo_id, revision, action, scope, now, now, now),
            )
            return int(cur.lastrowid or 0)

    def claim(self) -> Job | None:
        """The oldest job that is due (or whose worker's lease ran out), now leased."""
        now = self._clock()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT id, repo_id, revision, action, scope, attempts FROM hub_checks "
                    "WHERE (state = 'pending' AND due <= ?) "
                    "OR (state = 'running' AND lease_until <= ?) ORDER BY due, id LIMIT 1",
                    (now, now),
                ).fetchone()
                if row is not None:
                    self._db.execute(
                        "UPDATE hub_checks SET state = 'running', attempts = attempts + 1, "
                        "lease_until = ?, updated = ? WHERE id = ?",
                        (now + self.lease, now, row[0]),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        if row is None:
            return None
        return Job(int(row[0]), row[1], row[2], row[3], row[4], int(row[5]) + 1)

    def done(self, job: Job) -> None:
        """The check ran to an answer."""
        self._finish(job, "done", None)

    def retry(self, job: Job, error: str) -> bool:
        """The check failed; schedule it again with backoff. False once given up."""
        if job.attempts >= self.max_attempts:
            self._finish(job, "failed", error)
            return False
        delay = min(self.max_delay, self.base_delay * 2 ** (job.attempts - 1))
        now = self._clock()
        with self._lock:
            self._db.execute(
                "UPDATE hub_checks SET state = 'pending', due = ?, lease_until = NULL, "
                "last_error = ?, updated = ? WHERE id = ?",
                (now + delay, error[:1000], now, job.id),
            )
        return True

    def give_up(self, job: Job, error: str) -> None:
        """The check can never succeed (a bad reference): no retry."""
        self._finish(job, "failed", error)

    def _finish(self, job: Job, state: str, error: str | None) -> None:
        now = self._clock()
        with self._lock:
            self._db.execute(
                "UPDATE hub_checks SET state = ?, lease_until = NULL, last_error = ?, "
                "updated = ? WHERE id = ?",
                (state, error[:1000] if error else None, now, job.id),
            )

    def counts(self) -> dict[str, int]:
        """How many jobs are in each state."""
        with self._lock:
            rows = self._db.execute(
                "SELECT state, COUNT(*) FROM hub_checks GROUP BY state"
            ).fetchall()
        return {str(s): int(n) for s, n in rows}

    def next_due(self) -> float | None:
        """When the next pending job becomes due (a clock time), if any."""
        with self._lock:
            row = self._db.execute(
                "SELECT MIN(due) FROM hub_checks WHERE state = 'pending'"
            ).fetchone()
        return float(row[0]) if row and row[0] is not None else None

    def last_error(self, job_id: int) -> str | None:
        with self._lock:
            row = self._db.execute(
                "SELECT last_error FROM hub_checks WHERE id = ?", (job_id,)
            ).fetchone()
        return str(row[0]) if row and row[0] is not None else None
