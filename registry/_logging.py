"""Structured logs: one JSON object per line.

Fields are chosen, never dumped: a request is logged by its route template, status,
latency and whether it matched, never by its path, query or body, so a hash that
matched nothing is never written anywhere.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from datetime import UTC, datetime
from typing import Any

__all__ = ["ACCESS_FIELDS", "JsonFormatter", "configure_logging"]

ACCESS_FIELDS = ("method", "route", "status", "duration_ms", "matched", "items")


class JsonFormatter(logging.Formatter):
    """Formats a record as JSON with time, level, logger, message and known extras."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in ACCESS_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info and record.exc_info[0] is not None:
            # The class and the frames, not the message: database errors quote
            # the parameters they were given, and those may be hashes.
            out["error"] = record.exc_info[0].__name__
            out["trace"] = [
                f"{f.filename}:{f.lineno} {f.name}"
                for f in traceback.extract_tb(record.exc_info[2])
            ][-8:]
        return json.dumps(out, separators=(",", ":"))


def configure_logging(level: str = "INFO") -> None:
    """Send every log record to stderr as JSON lines, and silence the server's access log.

    Called by ``create_app``, so every way of running the app (``modelhash serve``,
    ``uvicorn --factory ... --workers N``, gunicorn with uvicorn workers) logs the
    same way: the server's own access log (``uvicorn.access``) would write request
    paths, and a path holds the looked-up hash, so it is switched off here; the
    registry writes its own access line without the path. Idempotent. Handlers
    that write to stdout or stderr are replaced; others (files, test capture) stay.
    """
    root = logging.getLogger()
    kept = [
        h
        for h in root.handlers
        if not (
            isinstance(h, logging.StreamHandler)
            and getattr(h, "stream", None) in (sys.stderr, sys.stdout)
        )
    ]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.handlers[:] = [*kept, handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "gunicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    for name in ("uvicorn.access", "gunicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = False
        logger.disabled = True
