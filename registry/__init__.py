"""The modelhash registry: flagged fingerprints behind a REST API.

Run it with ``modelhash serve``; build it in code with :func:`registry.app.create_app`.
This package imports ``client.fingerprint`` and ``client.wire``; nothing in
``client`` imports it.
"""

from __future__ import annotations

__all__: list[str] = []
