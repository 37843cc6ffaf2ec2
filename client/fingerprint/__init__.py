"""The fingerprint core: read weight files safely and compute their fingerprints.

No HTTP, no CLI and no server imports live here; the registry imports this
package, never the reverse.

Example::

    from modelhash.fingerprint import fingerprint_file

    fp = fingerprint_file("model.safetensors")
    print(fp.files[0].sha256, fp.content.hex, fp.model.kind)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from modelhash._lazy import lazy_attributes as _lazy_attributes
from modelhash.fingerprint._digest import (
    ALGORITHMS,
    CONTENT_ALGORITHM,
    Algorithm,
    Digest,
    parse_hash,
    parse_hash_as,
)
from modelhash.fingerprint._engine import (
    Layers,
    Outcome,
    Progress,
    fingerprint_file,
    fingerprint_path,
)
from modelhash.fingerprint._result import (
    FileHashes,
    ModelDescription,
    ModelFingerprint,
    TensorDigest,
)

if TYPE_CHECKING:
    from modelhash.fingerprint._similarity import (
        THRESHOLDS,
        Comparison,
        Match,
        Thresholds,
        compare,
        delta_sketch,
        match,
        shared_direction,
    )
    from modelhash.fingerprint._sketch import SKETCH_ALGORITHM, Sketch, TensorSketch

# Imported on first use: numpy and the sketch code cost every short
# ``modelhash fingerprint --layers exact`` run ~40 ms of start-up.
_LAZY = {
    "THRESHOLDS": "modelhash.fingerprint._similarity",
    "Comparison": "modelhash.fingerprint._similarity",
    "Match": "modelhash.fingerprint._similarity",
    "Thresholds": "modelhash.fingerprint._similarity",
    "compare": "modelhash.fingerprint._similarity",
    "delta_sketch": "modelhash.fingerprint._similarity",
    "match": "modelhash.fingerprint._similarity",
    "shared_direction": "modelhash.fingerprint._similarity",
    "SKETCH_ALGORITHM": "modelhash.fingerprint._sketch",
    "Sketch": "modelhash.fingerprint._sketch",
    "TensorSketch": "modelhash.fingerprint._sketch",
}


__getattr__ = _lazy_attributes("modelhash.fingerprint", _LAZY, globals())


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "ALGORITHMS",
    "CONTENT_ALGORITHM",
    "SKETCH_ALGORITHM",
    "THRESHOLDS",
    "Algorithm",
    "Comparison",
    "Digest",
    "FileHashes",
    "Layers",
    "Match",
    "ModelDescription",
    "ModelFingerprint",
    "Outcome",
    "Progress",
    "Sketch",
    "TensorDigest",
    "TensorSketch",
    "Thresholds",
    "compare",
    "delta_sketch",
    "fingerprint_file",
    "fingerprint_path",
    "match",
    "parse_hash",
    "parse_hash_as",
    "shared_direction",
]
