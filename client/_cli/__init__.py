"""The ``modelhash`` command line: argument parsing and printing only.

Logic lives in ``modelhash.fingerprint`` and the SDK (and, for the server commands,
in ``modelhash.registry``, imported only when such a command runs). Each command is
a click command in its own module, loaded on first use (see ``_app.COMMANDS``).
"""

from __future__ import annotations

from modelhash._cli._app import cli, main

__all__ = ["cli", "main"]
