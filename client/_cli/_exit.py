"""Exit codes, as documented for scripts."""

from __future__ import annotations

from enum import IntEnum


class Exit(IntEnum):
    """Process exit codes of ``modelhash``."""

    OK = 0
    MATCH = 1
    BAD_INPUT = 2
    REGISTRY = 3
    INTERNAL = 4
