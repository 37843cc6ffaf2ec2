"""modelhash client: fingerprints of model weights, and the registry SDK.

Platforms install this package alone; it never imports the server.

Example::

    from modelhash import RegistryClient
    from modelhash.fingerprint import fingerprint_file

    with RegistryClient("https://registry.example", api_key="mh_...") as registry:
        (decision,) = registry.screen([fingerprint_file("upload.safetensors")])
        if not decision.allow:
            ...  # reject, or hold for review
"""

from __future__ import annotations

if __name__ != "modelhash":  # pragma: no cover - the repo's client/ folder on sys.path
    raise ImportError(
        f"this package imports as 'modelhash', not {__name__!r}: install it "
        "(pip install -e .) and use 'import modelhash'"
    )

__version__ = "0.1.0"

from typing import TYPE_CHECKING

from modelhash._lazy import lazy_attributes as _lazy_attributes

if TYPE_CHECKING:
    from modelhash._async import AsyncRegistryClient
    from modelhash._cache import MirrorIndex, OfflineCache, SyncReport
    from modelhash._client import RegistryClient
    from modelhash._config import DEFAULT_REGISTRY, ClientSettings
    from modelhash._hf import HubReport, hub_check, parse_repo_ref
    from modelhash._hubqueue import CheckQueue
    from modelhash._policy import Decision, Unreachable
    from modelhash._retry import Retry
    from modelhash._scan import Checker, PathResult, check_paths
    from modelhash._stream import StreamFingerprinter
    from modelhash._upload import (
        DEFAULT_MAX_UPLOAD,
        UploadVerdict,
        scan_upload,
        scan_upload_async,
        scan_upload_parts,
    )
    from modelhash._webhook import BackgroundChecker, RepoEvent, WebhookReceiver, background_checker

# Imported on first use: ``modelhash fingerprint`` and ``import modelhash.fingerprint``
# should not pay for httpx, asyncio and the wire schema.
_LAZY = {
    "AsyncRegistryClient": "modelhash._async",
    "MirrorIndex": "modelhash._cache",
    "OfflineCache": "modelhash._cache",
    "SyncReport": "modelhash._cache",
    "RegistryClient": "modelhash._client",
    "DEFAULT_REGISTRY": "modelhash._config",
    "ClientSettings": "modelhash._config",
    "HubReport": "modelhash._hf",
    "hub_check": "modelhash._hf",
    "parse_repo_ref": "modelhash._hf",
    "Decision": "modelhash._policy",
    "Unreachable": "modelhash._policy",
    "Retry": "modelhash._retry",
    "Checker": "modelhash._scan",
    "PathResult": "modelhash._scan",
    "check_paths": "modelhash._scan",
    "StreamFingerprinter": "modelhash._stream",
    "DEFAULT_MAX_UPLOAD": "modelhash._upload",
    "UploadVerdict": "modelhash._upload",
    "scan_upload": "modelhash._upload",
    "scan_upload_async": "modelhash._upload",
    "scan_upload_parts": "modelhash._upload",
    "CheckQueue": "modelhash._hubqueue",
    "BackgroundChecker": "modelhash._webhook",
    "RepoEvent": "modelhash._webhook",
    "WebhookReceiver": "modelhash._webhook",
    "background_checker": "modelhash._webhook",
}


__getattr__ = _lazy_attributes("modelhash", _LAZY, globals())


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "DEFAULT_MAX_UPLOAD",
    "DEFAULT_REGISTRY",
    "AsyncRegistryClient",
    "BackgroundChecker",
    "CheckQueue",
    "Checker",
    "ClientSettings",
    "Decision",
    "HubReport",
    "MirrorIndex",
    "OfflineCache",
    "PathResult",
    "RegistryClient",
    "RepoEvent",
    "Retry",
    "StreamFingerprinter",
    "SyncReport",
    "Unreachable",
    "UploadVerdict",
    "WebhookReceiver",
    "__version__",
    "background_checker",
    "check_paths",
    "hub_check",
    "parse_repo_ref",
    "scan_upload",
    "scan_upload_async",
    "scan_upload_parts",
]
