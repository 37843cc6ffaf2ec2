"""Range answers: every flagged value with a 5-digit prefix, hidden among decoys.

What a range query protects is the querier's full hash: the registry sees five hex
digits, shared by about one in a million values. What it cannot protect is the list
itself from its own readers (they may download the export and follow the change
feed anyway), so the decoys are only about not making the answers themselves say
more than they must:

- **Fixed size.** An answer has ``bucket`` values (the next power of two when more
  are real), so it does not say how many real values share the prefix.
- **Stable.** Decoys come from a keyed stream, HMAC(secret, root:prefix:j), so
  asking again returns the same answer.
- **Consistent across algorithms that share bits.** An AutoV2 is the first 10
  digits of the file's SHA-256 (:data:`TRUNCATIONS`), so both are answered from one
  set of full-length values: the AutoV2 answer is the SHA-256 answer cut to 10
  digits. Comparing the two then singles out nothing; with independent decoys,
  their intersection was exactly the flagged value. A flagged AutoV2 whose SHA-256
  is unknown joins the set extended by a keyed tail, like a decoy.
- **Rotating with the real count.** The decoys are a window on that stream which
  moves :data:`ROTATE` steps for each real value at the prefix. A new flag
  therefore replaces ROTATE decoys at once: someone polling the prefix before and
  after sees ROTATE new values, the real one among them, instead of exactly one.
  Someone who keeps polling over many changes still learns which values stay:
  real values never leave while decoys do. That cannot be hidden by padding.
"""

from __future__ import annotations

import hashlib
import hmac

from sqlmodel import Session

from modelhash.fingerprint import ALGORITHMS
from modelhash.registry.crud.lookup import PREFIX_LEN, range_values

__all__ = ["ROTATE", "TRUNCATIONS", "range_answer"]

TRUNCATIONS: dict[str, str] = {"autov2": "sha256"}
"""Algorithms whose values are a prefix of another's: algorithm -> the full one."""

ROTATE = 8
"""Decoys replaced for each real value added at a prefix."""


def _stream(secret: bytes, root: str, prefix: str, j: int, length: int) -> str:
    mac = hmac.new(secret, f"{root}:{prefix}:{j}".encode(), hashlib.sha256).hexdigest()
    mac += hmac.new(secret, f"{root}:{prefix}:{j}:2".encode(), hashlib.sha256).hexdigest()
    return prefix + mac[: length - len(prefix)]


def _lift(secret: bytes, root: str, value: str, length: int) -> str:
    """A member value extended to the root's length by a keyed, stable tail."""
    mac = hmac.new(secret, f"lift:{root}:{value}".encode(), hashlib.sha256).hexdigest() * 2
    return value + mac[: length - len(value)]


def range_answer(
    session: Session, *, algorithm: str, prefix: str, secret: bytes, bucket: int
) -> list[str]:
    """The sorted answer for ``algorithm`` and ``prefix`` (see the module docstring)."""
    root = TRUNCATIONS.get(algorithm, algorithm)
    root_len = ALGORITHMS[root].canonical_len
    real = set(range_values(session, algorithm=root, prefix=prefix))
    for member, parent in TRUNCATIONS.items():
        if parent != root:
            continue
        cut = ALGORITHMS[member].canonical_len
        covered = {v[:cut] for v in real}
        for value in range_values(session, algorithm=member, prefix=prefix):
            if value not in covered:
                real.add(_lift(secret, root, value, root_len))
    size = bucket
    while size < len(real):
        size *= 2
    length = ALGORITHMS[algorithm].canonical_len
    size = min(size, 16 ** (length - PREFIX_LEN))
    out = set(real)
    j = len(real) * ROTATE
    if algorithm == root:
        while len(out) < size:
            out.add(_stream(secret, root, prefix, j, root_len))
            j += 1
        return sorted(out)
    answer = {v[:length] for v in out}
    while len(answer) < size:
        answer.add(_stream(secret, root, prefix, j, root_len)[:length])
        j += 1
    return sorted(answer)
