"""Server-generated secrets that must survive restarts and be shared by workers."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from modelhash.registry._db import begin_write
from modelhash.registry.models import ServerState

__all__ = ["get_or_create"]


def get_or_create(session: Session, *, name: str, make: Callable[[], str]) -> str:
    """The stored value called ``name``; the first caller stores ``make()``.

    Two workers starting at once both try to insert; the loser's insert fails on the
    primary key and it reads the winner's value instead.
    """
    row = session.get(ServerState, name)
    if row is not None:
        return row.value
    begin_write(session)
    row = session.get(ServerState, name)
    if row is not None:
        return row.value
    session.add(ServerState(name=name, value=make()))
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
    row = session.get(ServerState, name)
    if row is None:
        raise RuntimeError(f"server state {name!r} vanished")
    return row.value
