"""Property tests for the PyTorch readers: whatever the bytes, only our errors escape.

A lighter sibling of the atheris harness in tests/fuzzing/: Hypothesis mutates the
torch fixtures and assembles pickles from opcode fragments (allowed and refused
globals, memo traffic, persistent ids, BUILD, extension codes), and the readers
must either parse them or raise a ModelhashError, and never run anything.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelhash.errors import ModelhashError
from modelhash.fingerprint._formats import parse_file
from tests.fixtures.torch_pickles import (
    EMPTY_TUPLE,
    FALSE,
    NONE,
    call,
    glob,
    integer,
    legacy_bytes,
    ordered_dict,
    proto,
    storage,
    tensor,
    text,
    torch_zip,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "torch"
SEEDS = {name: (FIXTURES / name).read_bytes() for name in ("model_zip.pt", "model_legacy.pt")}
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def check(path: Path) -> None:
    """Parse, then produce every tensor's bytes; only ModelhashError may escape."""
    try:
        parsed = parse_file(path)
        for t in parsed.tensors:
            if t.materialize is not None and t.nbytes <= 1 << 20:
                assert sum(len(p) for p in t.materialize()) == t.nbytes
    except ModelhashError:
        pass


mutation = st.tuples(
    st.sampled_from(["flip", "insert", "delete", "cut"]),
    st.floats(0, 1, exclude_max=True),
    st.binary(min_size=1, max_size=8),
)


@FUZZ
@given(seed=st.sampled_from(sorted(SEEDS)), edits=st.lists(mutation, min_size=1, max_size=6))
def test_mutated_checkpoints(tmp_path_factory: pytest.TempPathFactory, seed: str, edits: list[tuple[str, float, bytes]]) -> None:
    blob = bytearray(SEEDS[seed])
    for kind, where, data in edits:
        at = int(where * len(blob)) if blob else 0
        if kind == "flip" and blob:
            blob[at] ^= data[0] or 1
        elif kind == "insert":
            blob[at:at] = data
        elif kind == "delete":
            del blob[at : at + len(data)]
        elif kind == "cut":
            del blob[at:]
    path = tmp_path_factory.mktemp("mut") / seed
    path.write_bytes(bytes(blob))
    check(path)


FRAGMENTS = [
    b"(", b"t", b")", b"]", b"}", b"e", b"a", b"u", b"s", b"R", b"b", b"0", b"2", b"\x85", b"\x86",
    b"\x87", b"\x81", b"\x94", b"h\x00", b"h\x01", b"q\x00", b"q\x01", b"Q", b"\x82\xf3",
    NONE, FALSE, EMPTY_TUPLE, integer(0), integer(3), integer(-1), integer(2**40), text("storage"),
    text("0"), text("cpu"), text("os"), text("system"), b"\x93", glob("os", "system"),
    glob("builtins", "eval"), glob("collections", "OrderedDict"), glob("torch", "FloatStorage"),
    glob("torch", "bfloat16"), glob("torch._utils", "_rebuild_tensor_v2"),
    glob("torch._utils", "_rebuild_parameter"), glob("argparse", "Namespace"),
    glob("torch.nn.modules.container", "ParameterDict"), glob("_codecs", "encode"),
    glob("torch._tensor", "_rebuild_from_type_v2"), ordered_dict(), storage("0", 3),
    tensor("0", (3,)), tensor("0", (2, 2), (1, 2), numel=3), tensor("0", (3,), dtype="float8_e4m3fn"),
    call(glob("os", "system"), text("touch PWNED")),
]


@FUZZ
@given(parts=st.lists(st.sampled_from(FRAGMENTS), max_size=40), legacy=st.booleans())
def test_opcode_soup(tmp_path_factory: pytest.TempPathFactory, parts: list[bytes], legacy: bool) -> None:
    folder = tmp_path_factory.mktemp("soup")
    body = proto(2) + b"".join(parts) + b"."
    if legacy:
        path = folder / "l.pt"
        path.write_bytes(legacy_bytes(body, [("0", 3, b"\0" * 12)]))
    else:
        path = torch_zip(folder / "z.pt", body, {"0": b"\0" * 12})
    check(path)
    assert not (Path.cwd() / "PWNED").exists()
