"""Many writers at once: one flag per fingerprint, and a feed whose cursors never go back."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import func
from sqlmodel import Session, select

from modelhash.registry._db import make_engine, session_scope
from modelhash.registry.crud.audit import list_changes
from modelhash.registry.crud.flags import create_flag
from modelhash.registry.crud.keys import CLI, Principal, create_key
from modelhash.registry.models import Fingerprint, Flag, Opinion
from modelhash.wire import FlagCreate
from tests.utils.registry import random_fingerprint

WRITERS = 12


def test_concurrent_flagging_of_one_fingerprint_makes_one_flag(db_url):
    engine = make_engine(db_url, pool_size=WRITERS)
    try:
        principals = []
        for i in range(WRITERS):
            with session_scope(engine) as s:
                row, _ = create_key(s, role="submitter", name=f"race-{i}", actor=CLI)
                principals.append(Principal(key_id=row.id, role="submitter", label=f"key:{row.id}"))
        fp = random_fingerprint()
        body = FlagCreate(category="ncii", fingerprint=fp)
        barrier = threading.Barrier(WRITERS)

        def flag(principal: Principal) -> tuple[str, bool]:
            barrier.wait()
            with session_scope(engine) as s:
                made, created = create_flag(s, data=body, actor=principal)
                return made.id, created

        with ThreadPoolExecutor(WRITERS) as pool:
            outcomes = list(pool.map(flag, principals))

        assert len({flag_id for flag_id, _ in outcomes}) == 1
        assert sum(created for _, created in outcomes) == 1
        (flag_id,) = {flag_id for flag_id, _ in outcomes}
        with Session(engine) as s:
            assert (
                s.exec(
                    select(func.count())
                    .select_from(Fingerprint)
                    .where(Fingerprint.value == fp["sha256"])
                ).one()
                == 1
            )
            assert (
                s.exec(select(func.count()).select_from(Flag).where(Flag.id == flag_id)).one() == 1
            )
            assert (
                s.exec(
                    select(func.count()).select_from(Opinion).where(Opinion.flag_id == flag_id)
                ).one()
                == WRITERS
            )
    finally:
        engine.dispose()


def test_concurrent_writers_and_a_reader_see_cursors_in_commit_order(db_url):
    engine = make_engine(db_url, pool_size=8)
    try:
        with session_scope(engine) as s:
            start = max((c.id or 0 for c in list_changes(s, since=0, limit=10**9)[0]), default=0)
        stop = threading.Event()
        seen: list[int] = []
        regressions: list[tuple[int, int]] = []

        def follow() -> None:
            cursor = start
            while not stop.is_set():
                with session_scope(engine) as s:
                    rows, _ = list_changes(s, since=cursor, limit=1000)
                for r in rows:
                    assert r.id is not None
                    if r.id <= cursor:
                        regressions.append((cursor, r.id))
                    seen.append(r.id)
                    cursor = r.id
                # A mirror polls; a loop with no pause only measures the GIL.
                stop.wait(0.002)

        def write(_: int) -> None:
            with session_scope(engine) as s:
                create_flag(
                    s,
                    data=FlagCreate(category="other", fingerprint=random_fingerprint()),
                    actor=CLI,
                )

        # Daemon, and stopped in ``finally``: a failing writer must fail the test,
        # not leave a thread that keeps the test process alive.
        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        try:
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(write, range(40)))
        finally:
            stop.set()
            follower.join(timeout=60)
        assert not follower.is_alive()
        with session_scope(engine) as s:
            rows, _ = list_changes(s, since=start, limit=10**6)
        committed = [r.id for r in rows]
        assert regressions == []
        # Whatever the follower read while writers raced, it read without gaps.
        assert seen == committed[: len(seen)]
    finally:
        engine.dispose()
