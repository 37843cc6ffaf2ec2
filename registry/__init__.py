"""The modelhash registry: flagged fingerprints behind a REST API.

Run it with ``modelhash serve``; build it in code with :func:`modelhash.registry.app.create_app`.
This package imports ``modelhash.fingerprint`` and ``modelhash.wire``; nothing in
``client`` imports it.
"""

from __future__ import annotations

if __name__ != "modelhash.registry":  # pragma: no cover - the repo's folder on sys.path
    raise ImportError(
        f"the registry imports as 'modelhash.registry', not {__name__!r}: "
        "pip install -e '.[server]' and use 'import modelhash.registry'"
    )

__all__: list[str] = []
