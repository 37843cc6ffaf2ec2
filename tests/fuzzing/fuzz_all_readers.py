"""atheris harness: any bytes, any reader, every layer: a fingerprint or a clean error.

Needs atheris (``pip install -e '.[fuzz]'``). Each input is written under every
weight-file name the readers sniff by suffix and fingerprinted with all layers; a
crash is an exception escaping ``fingerprint_path``, an internal error (an
exception a reader did not expect), an error line holding a newline, or a payload
that ran. Seeds are valid files of every format (see tests/hostile/test_mutations)::

    python tests/fuzzing/fuzz_all_readers.py -max_total_time=60 SEED_DIR

``tests/fuzzing/test_atheris.py`` runs it for a bounded time when atheris installs.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from modelhash.errors import InternalReadError
    from modelhash.fingerprint import fingerprint_path

_WORK = Path(tempfile.mkdtemp(prefix="fuzz-all-"))
_NAMES = ("sample.safetensors", "sample.gguf", "sample.pt")
_MARKER = Path("/tmp/modelhash-hostile-PWNED")


def test_one_input(data: bytes) -> None:
    for name in _NAMES:
        path = _WORK / name
        path.write_bytes(data)
        for out in fingerprint_path(path, layers="all"):
            if out.error is None:
                continue
            if isinstance(out.error, InternalReadError):
                raise AssertionError(out.error.diagnostics())
            if "\n" in out.error.diagnostics():
                raise AssertionError("an error of more than one line")
    if _MARKER.exists():
        raise AssertionError("a pickle in the input ran")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
