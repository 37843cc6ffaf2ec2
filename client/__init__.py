"""modelhash client: fingerprints of model weights, and the registry SDK.

Platforms install this package alone; it never imports the server.

Example::

    from client import RegistryClient
    from client.fingerprint import fingerprint_file

    with RegistryClient("https://registry.example", api_key="mh_...") as registry:
        (decision,) = registry.screen([fingerprint_file("upload.safetensors")])
        if not decision.allow:
            ...  # reject, or hold for review
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import TYPE_CHECKING

from client._lazy import lazy_attributes as _lazy_attributes

if TYPE_CHECKING:
    from client._async import AsyncRegistryClient
    from client._cache import MirrorIndex, OfflineCache, SyncReport
    from client._client import RegistryClient
    from client._config import DEFAULT_REGISTRY, ClientSettings
    from client._hf import HubReport, hub_check, parse_repo_ref
    from client._policy import Decision, Unreachable
    from client._retry import Retry
    from client._scan import Checker, PathResult, check_paths
    from client._stream import StreamFingerprinter
    from client._upload import DEFAULT_MAX_UPLOAD, UploadVerdict, scan_upload, scan_upload_async
    from client._webhook import RepoEvent, WebhookReceiver, background_checker

# Imported on first use: ``modelhash fingerprint`` and ``import client.fingerprint``
# should not pay for httpx, asyncio and the wire schema.
_LAZY = {
    "AsyncRegistryClient": "client._async",
    "MirrorIndex": "client._cache",
    "OfflineCache": "client._cache",
    "SyncReport": "client._cache",
    "RegistryClient": "client._client",
    "DEFAULT_REGISTRY": "client._config",
    "ClientSettings": "client._config",
    "HubReport": "client._hf",
    "hub_check": "client._hf",
    "parse_repo_ref": "client._hf",
    "Decision": "client._policy",
    "Unreachable": "client._policy",
    "Retry": "client._retry",
    "Checker": "client._scan",
    "PathResult": "client._scan",
    "check_paths": "client._scan",
    "StreamFingerprinter": "client._stream",
    "DEFAULT_MAX_UPLOAD": "client._upload",
    "UploadVerdict": "client._upload",
    "scan_upload": "client._upload",
    "scan_upload_async": "client._upload",
    "RepoEvent": "client._webhook",
    "WebhookReceiver": "client._webhook",
    "background_checker": "client._webhook",
}


__getattr__ = _lazy_attributes("client", _LAZY, globals())


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "DEFAULT_MAX_UPLOAD",
    "DEFAULT_REGISTRY",
    "AsyncRegistryClient",
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
]
