"""atheris harness: whatever the bytes, the PyTorch readers raise only ModelhashError.

Needs atheris, which is not a test dependency. Seed it with the torch fixtures:

    python tests/fuzzing/fuzz_torch_readers.py -atheris_runs=200000 \\
        tests/fixtures/torch

A crash is any other exception escaping parse(), or a materialized tensor whose
length differs from the byte count its record promised. Nothing the file names
may run: the harness also fails if the marker file a payload would create exists.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from modelhash.errors import ModelhashError
    from modelhash.fingerprint._formats import _statedict, _torch, _unpickle, parse_file

_INSTRUMENTED = (_statedict, _torch, _unpickle)

_WORK = Path(tempfile.mkdtemp(prefix="fuzz-torch-"))
_SAMPLE = _WORK / "sample.pt"
_MARKER = _WORK / "PWNED"
_MAX_MATERIALIZE = 64 * 1024 * 1024


def test_one_input(data: bytes) -> None:
    _SAMPLE.write_bytes(data)
    try:
        parsed = parse_file(_SAMPLE)
        budget = _MAX_MATERIALIZE
        for t in parsed.tensors:
            if t.materialize is None or t.nbytes > budget:
                continue
            budget -= t.nbytes
            got = sum(len(piece) for piece in t.materialize())
            if got != t.nbytes:
                raise AssertionError(f"{t.name}: {got} bytes, record says {t.nbytes}")
    except ModelhashError:
        pass
    if _MARKER.exists():
        raise AssertionError("a pickle in the input ran")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
