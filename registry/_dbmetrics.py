"""Metrics read from the database at scrape time: flags by status, bank rows, build info.

They describe shared state, so they are computed by whichever process answers the
scrape, never added up across workers. A database that cannot be read makes
``modelhash_database_up`` 0 and leaves the counts out, so a scrape never fails.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, col

from modelhash import __version__
from modelhash.registry.models import Fingerprint, Flag, SketchRow, SketchSignature, WeakHash

__all__ = ["DatabaseCollector"]

_log = logging.getLogger("modelhash.registry")

_STATUSES = ("active", "disputed", "revoked")


class DatabaseCollector(Collector):
    """Yields the gauges described in the module docstring for one engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        info = GaugeMetricFamily(
            "modelhash_build_info",
            "The running version: always 1, the labels carry the facts.",
            labels=["version", "python", "database"],
        )
        info.add_metric([__version__, platform.python_version(), self.engine.dialect.name], 1)
        yield info
        up = GaugeMetricFamily("modelhash_database_up", "1 if the database answered the scrape.")
        try:
            counts = self._counts()
        except SQLAlchemyError as exc:
            _log.warning("metrics: database unavailable: %s", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        flags = GaugeMetricFamily("modelhash_flags", "Flags by status.", labels=["status"])
        by_status = counts.flags
        for status in sorted(set(_STATUSES) | set(by_status)):
            flags.add_metric([status], by_status.get(status, 0))
        yield flags
        hashes = GaugeMetricFamily(
            "modelhash_hashes", "Stored hashes by strength.", labels=["strength"]
        )
        hashes.add_metric(["strong"], counts.strong)
        hashes.add_metric(["weak"], counts.weak)
        yield hashes
        bank = GaugeMetricFamily(
            "modelhash_sketch_bank_rows",
            "Signature rows every process holds in memory for sketch retrieval, and "
            "stored sketches by owner.",
            labels=["table"],
        )
        bank.add_metric(["signatures"], counts.signatures)
        bank.add_metric(["sketches"], counts.sketches)
        yield bank

    def _counts(self) -> _Counts:
        with Session(self.engine) as session:
            status = col(Flag.status)
            by_status = {
                str(s): int(n)
                for s, n in session.execute(select(status, func.count()).group_by(status))
            }
            return _Counts(
                flags=by_status,
                strong=_count(session, Fingerprint),
                weak=_count(session, WeakHash),
                signatures=_count(session, SketchSignature),
                sketches=_count(session, SketchRow),
            )


@dataclass(frozen=True)
class _Counts:
    flags: dict[str, int]
    strong: int
    weak: int
    signatures: int
    sketches: int


def _count(session: Session, table: type) -> int:
    return int(session.execute(select(func.count()).select_from(table)).scalar_one())
