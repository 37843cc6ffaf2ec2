"""A short-lived, in-process cache of authenticated API keys.

Checks come in thousands a day per platform; looking the key up in the database on
each one roughly doubles the cost of a single check. Entries live for
``MODELHASH_KEY_CACHE_SECONDS`` (default 5; 0 turns the cache off). Revoking a key
through the API clears this process's cache at once; other worker processes stop
accepting it within that many seconds. Only successful look-ups are cached, keyed
by the key's SHA-256, so random keys cannot fill memory.
"""

from __future__ import annotations

import threading
import time

from modelhash.registry.crud.keys import Principal, hash_key

__all__ = ["KeyCache"]

_MAX_ENTRIES = 10_000


class KeyCache:
    """Maps a key's hash to its principal for ``ttl`` seconds."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[Principal, float]] = {}

    def get(self, key: str) -> Principal | None:
        """The cached principal for ``key``, if fresh."""
        if self.ttl <= 0:
            return None
        digest = hash_key(key)
        with self._lock:
            hit = self._entries.get(digest)
            if hit is None:
                return None
            if hit[1] < time.monotonic():
                del self._entries[digest]
                return None
            return hit[0]

    def put(self, key: str, principal: Principal) -> None:
        """Remember that ``key`` authenticates as ``principal``."""
        if self.ttl <= 0:
            return
        with self._lock:
            if len(self._entries) >= _MAX_ENTRIES:
                self._entries.clear()
            self._entries[hash_key(key)] = (principal, time.monotonic() + self.ttl)

    def clear(self) -> None:
        """Forget every key (after a revocation)."""
        with self._lock:
            self._entries.clear()
