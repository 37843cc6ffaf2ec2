"""What to do with an upload when the registry cannot answer: the caller decides.

``fail-closed`` holds the upload until a check succeeds; ``fail-open`` lets it
through and marks it for a re-check. Only outages count (no answer, a 5xx or 429,
or an answer that is not the wire format): a bad API key, a forbidden role or a
refused request is a configuration error that no policy should hide, so those
still raise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

from modelhash.errors import (
    RegistryError,
    RegistryHTTPError,
    RegistryResponseError,
    RegistryUnreachableError,
)
from modelhash.wire import CheckResult, Match

__all__ = ["Decision", "Unreachable", "decide", "is_outage", "unchecked"]


class Unreachable(StrEnum):
    """The policy for a registry outage."""

    FAIL_CLOSED = "fail-closed"
    FAIL_OPEN = "fail-open"


@dataclass(frozen=True)
class Decision:
    """The verdict on one model, and whether the platform should let it through.

    ``verdict`` is ``match``, ``clean`` or ``unchecked`` (the registry was down).
    ``allow`` is false for a match, true for a clean model, and follows the policy
    when unchecked; ``recheck`` is true when the model must be checked again later.
    """

    verdict: Literal["match", "clean", "unchecked"]
    allow: bool
    recheck: bool = False
    matches: list[Match] = field(default_factory=list)
    reason: str | None = None


def is_outage(exc: RegistryError) -> bool:
    """True for errors a retry later may cure: no answer, 5xx, 429, garbage."""
    if isinstance(exc, RegistryUnreachableError | RegistryResponseError):
        return True
    return isinstance(exc, RegistryHTTPError) and (exc.status >= 500 or exc.status == 429)


def decide(result: CheckResult) -> Decision:
    """The decision for a registry answer."""
    if result.verdict == "match":
        return Decision("match", allow=False, matches=list(result.matches))
    return Decision("clean", allow=True, matches=list(result.matches))


def unchecked(exc: RegistryError, policy: Unreachable | str) -> Decision:
    """The decision when the registry failed with ``exc``; re-raises non-outages."""
    if not is_outage(exc):
        raise exc
    allow = Unreachable(policy) is Unreachable.FAIL_OPEN
    return Decision("unchecked", allow=allow, recheck=True, reason=exc.diagnostics())
