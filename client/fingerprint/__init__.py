"""The fingerprint core: read weight files safely and compute their fingerprints.

No HTTP, no CLI and no server imports live here; the registry imports this
package, never the reverse.

Example::

    from client.fingerprint import fingerprint_file

    fp = fingerprint_file("model.safetensors")
    print(fp.files[0].sha256, fp.content.hex, fp.model.kind)
"""

from __future__ import annotations

from client.fingerprint._digest import (
    ALGORITHMS,
    CONTENT_ALGORITHM,
    Algorithm,
    Digest,
    parse_hash,
    parse_hash_as,
)
from client.fingerprint._engine import (
    Layers,
    Outcome,
    Progress,
    fingerprint_file,
    fingerprint_path,
)
from client.fingerprint._result import (
    FileHashes,
    ModelDescription,
    ModelFingerprint,
    TensorDigest,
)
from client.fingerprint._similarity import (
    THRESHOLDS,
    Comparison,
    Match,
    Thresholds,
    compare,
    delta_sketch,
    match,
)
from client.fingerprint._sketch import SKETCH_ALGORITHM, Sketch, TensorSketch

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
]
