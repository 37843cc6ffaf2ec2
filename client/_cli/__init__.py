"""The ``modelhash`` command line: argument parsing and printing only.

Logic lives in ``modelhash.fingerprint`` (and, for the server commands, in
``registry``, imported only when such a command runs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from modelhash._cli._app import load_commands, main

if TYPE_CHECKING:
    from modelhash._cli._app import app

__all__ = ["app", "load_commands", "main"]


def __getattr__(name: str) -> Any:
    # ``app`` with every command registered (``main`` registers only what it needs).
    if name == "app":
        return load_commands()
    raise AttributeError(f"module 'modelhash._cli' has no attribute {name!r}")
