"""Hostile pickles: every one is refused, every global it names is reported, none runs.

Each payload would create a marker file (or set an environment variable) if it
ran; a control test runs the live ones with the plain ``pickle`` module in a
child process to prove they are real. The readers must refuse them in a bare
pickle, in a zip checkpoint's data.pkl and in a legacy checkpoint, and nothing
may be created. (A bare pickle of protocol 0 or 1 is not recognised as a
checkpoint at all, so it is unsupported rather than unsafe.)
"""

from __future__ import annotations

import copyreg
import json
import os
import pickle
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from modelhash.errors import (
    InternalReadError,
    MalformedFileError,
    ModelhashError,
    ResourceLimitError,
    UnsafeFileError,
)
from modelhash.fingerprint._formats import parse_file
from modelhash.fingerprint._formats._statedict import DTYPES, Sealed
from modelhash.fingerprint._formats._unpickle import ALLOWED, Inert
from tests.fixtures.torch_pickles import (
    EMPTY_TUPLE,
    binbytes,
    call,
    dct,
    glob,
    integer,
    legacy_bytes,
    lst,
    pickled,
    proto,
    short_text,
    tensor,
    text,
    torch_zip,
    tup,
)

ENV_FLAG = "MODELHASH_HOSTILE_PICKLE_RAN"


@dataclass(frozen=True)
class Payload:
    body: Callable[[Path], bytes]
    """The whole pickle, given the marker path it would create."""
    refused: frozenset[str]
    live: bool = True
    """True if plain pickle.loads really creates the marker (checked by a control test)."""


def touch(marker: Path) -> str:
    return f"touch {marker}"


def python(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


def _stack_global_memo(m: Path) -> bytes:
    return (
        proto(4)
        + short_text("os") + b"\x94" + b"0"
        + short_text("system") + b"\x94" + b"0"
        + b"h\x00" + b"h\x01" + b"\x93"
        + short_text(touch(m)) + b"\x85" + b"R" + b"."
    )


def _inst_eval(m: Path) -> bytes:
    return b"(S" + repr(python(m)).encode() + b"\ni__builtin__\neval\n."


def _obj_exec(m: Path) -> bytes:
    return b"(" + glob("builtins", "exec") + text(python(m)) + b"o."


def _newobj(m: Path) -> bytes:
    return proto(2) + glob("subprocess", "Popen") + tup(lst(text("touch"), text(str(m)))) + b"\x81."


def _newobj_ex(m: Path) -> bytes:
    args = tup(lst(text("touch"), text(str(m))))
    return proto(4) + glob("subprocess", "Popen") + args + b"}" + b"\x92."


def _build_setstate(m: Path) -> bytes:
    instance = call(glob("collections", "OrderedDict"))
    return (
        proto(2) + instance
        + dct((text("__setstate__"), glob("os", "system"))) + b"b"
        + text(touch(m)) + b"b."
    )


def _partial(m: Path) -> bytes:
    partial = call(glob("functools", "partial"), glob("os", "system"), text(touch(m)))
    return proto(2) + partial + EMPTY_TUPLE + b"R."


def _run_code(m: Path) -> bytes:
    code = call(glob("builtins", "compile"), text(python(m)), text("<x>"), text("exec"))
    return pickled(call(glob("runpy", "_run_code"), code, b"}"))


def _getattr_import(m: Path) -> bytes:
    module = call(glob("builtins", "__import__"), text("os"))
    system = call(glob("builtins", "getattr"), module, text("system"))
    return proto(2) + system + tup(text(touch(m))) + b"R."


def _nested_pickle(m: Path) -> bytes:
    inner = pickled(call(glob("os", "system"), text(touch(m))))
    return pickled(call(glob("pickle", "loads"), binbytes(inner)), protocol=3)


def _env(m: Path) -> bytes:
    code = f"import os; os.environ[{ENV_FLAG!r}] = '1'; {python(m)}"
    return pickled(call(glob("builtins", "exec"), text(code)))


def _many(m: Path) -> bytes:
    return pickled(
        lst(
            call(glob("os", "system"), text(touch(m))),
            call(glob("subprocess", "call"), lst(text("touch"), text(str(m)))),
            call(glob("builtins", "exec"), text(python(m))),
            call(glob("webbrowser", "open"), text("http://127.0.0.1:9/")),
        )
    )


PAYLOADS: dict[str, Payload] = {
    "global os.system": Payload(
        lambda m: pickled(call(glob("os", "system"), text(touch(m)))), frozenset({"os.system"})
    ),
    "global posix.system": Payload(
        lambda m: pickled(call(glob("posix", "system"), text(touch(m)))),
        frozenset({"posix.system"}),
    ),
    "stack_global via memo": Payload(_stack_global_memo, frozenset({"os.system"})),
    "INST eval, protocol 0": Payload(_inst_eval, frozenset({"builtins.eval"})),
    "OBJ exec, protocol 1": Payload(_obj_exec, frozenset({"builtins.exec"})),
    "NEWOBJ": Payload(_newobj, frozenset({"subprocess.Popen"}), live=False),
    "NEWOBJ_EX": Payload(_newobj_ex, frozenset({"subprocess.Popen"}), live=False),
    "BUILD __setstate__": Payload(_build_setstate, frozenset({"os.system"})),
    "functools.partial": Payload(_partial, frozenset({"functools.partial", "os.system"})),
    "runpy._run_code": Payload(_run_code, frozenset({"runpy._run_code", "builtins.compile"})),
    "getattr of __import__": Payload(
        _getattr_import, frozenset({"builtins.getattr", "builtins.__import__"})
    ),
    "nested pickle.loads": Payload(_nested_pickle, frozenset({"pickle.loads"})),
    "nested torch.load": Payload(
        lambda m: pickled(call(glob("torch", "load"), text(str(m)))),
        frozenset({"torch.load"}),
        live=False,
    ),
    "torch.serialization.load": Payload(
        lambda m: pickled(call(glob("torch.serialization", "load"), text(str(m)))),
        frozenset({"torch.serialization.load"}),
        live=False,
    ),
    "webbrowser.open": Payload(
        lambda m: pickled(call(glob("webbrowser", "open"), text("http://127.0.0.1:9/"))),
        frozenset({"webbrowser.open"}),
        live=False,
    ),
    "socket": Payload(
        lambda m: pickled(call(glob("socket", "create_connection"), tup(text("127.0.0.1"), integer(9)))),
        frozenset({"socket.create_connection"}),
        live=False,
    ),
    "environment variable": Payload(_env, frozenset({"builtins.exec"})),
    "several at once": Payload(
        _many,
        frozenset({"os.system", "subprocess.call", "builtins.exec", "webbrowser.open"}),
    ),
}


@pytest.fixture
def marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ENV_FLAG, raising=False)
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a hostile pickle ran"
    assert ENV_FLAG not in os.environ, "a hostile pickle ran"


def as_bare(tmp_path: Path, body: bytes) -> Path:
    path = tmp_path / "bare.pt"
    path.write_bytes(body)
    return path


def as_zip(tmp_path: Path, body: bytes) -> Path:
    return torch_zip(tmp_path / "zip.pt", body, {})


def as_legacy(tmp_path: Path, body: bytes) -> Path:
    path = tmp_path / "legacy.pt"
    path.write_bytes(legacy_bytes(body, []))
    return path


CONTAINERS = {
    "bare pickle": (as_bare, "first pickle"),
    "zip data.pkl": (as_zip, "data.pkl"),
    "legacy main pickle": (as_legacy, "main pickle"),
}


@pytest.mark.parametrize("container", sorted(CONTAINERS))
@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_hostile_pickle_is_refused(tmp_path: Path, marker: Path, name: str, container: str) -> None:
    payload = PAYLOADS[name]
    wrap, where = CONTAINERS[container]
    body = payload.body(marker)
    path = wrap(tmp_path, body)
    # Protocol 0 and 1 pickles have no PROTO header; torch.load runs them all the same.
    with pytest.raises(UnsafeFileError) as info:
        parse_file(path)
    assert info.value.globals == sorted(payload.refused)
    assert info.value.where == where
    assert "unsafe pickle" in info.value.diagnostics()


@pytest.mark.parametrize("name", sorted(n for n, p in PAYLOADS.items() if p.live))
def test_payloads_are_live_under_plain_pickle(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "PWNED"
    sample = tmp_path / "sample.pkl"
    sample.write_bytes(PAYLOADS[name].body(marker))
    code = "import pickle, sys\ntry:\n    pickle.loads(open(sys.argv[1], 'rb').read())\nexcept Exception:\n    pass\n"
    subprocess.run([sys.executable, "-c", code, str(sample)], cwd=tmp_path, check=True, timeout=60)
    assert marker.exists()


@pytest.mark.parametrize("protocol", range(6))
def test_every_protocol(tmp_path: Path, marker: Path, protocol: int) -> None:
    class Exploit:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return os.system, (touch(marker),)

    path = as_bare(tmp_path, pickle.dumps(Exploit(), protocol=protocol))
    if protocol < 2:
        path = as_zip(tmp_path, path.read_bytes())
    with pytest.raises(UnsafeFileError) as info:
        parse_file(path)
    assert info.value.globals == [f"{os.system.__module__}.system"]


@pytest.mark.parametrize(("opcode", "code"), [(b"\x82", 0xF1), (b"\x83", 0xF1F1), (b"\x84", 0x7F1F1F1F)])
def test_extension_codes_never_reach_the_extension_cache(
    tmp_path: Path, marker: Path, opcode: bytes, code: int
) -> None:
    width = {b"\x82": 1, b"\x83": 2, b"\x84": 4}[opcode]
    body = pickled(opcode + code.to_bytes(width, "little") + tup(text(touch(marker))) + b"R")

    def poisoned(*args: object) -> None:
        marker.touch()

    copyreg.add_extension("os", "system", code)
    copyreg._extension_cache[code] = poisoned  # type: ignore[attr-defined]
    try:
        for wrap, where in CONTAINERS.values():
            with pytest.raises(UnsafeFileError) as info:
                parse_file(wrap(tmp_path, body))
            assert (info.value.globals, info.value.where) == (["os.system"], where)
        assert copyreg._extension_cache[code] is poisoned  # type: ignore[attr-defined]
    finally:
        copyreg.remove_extension("os", "system", code)


def test_unregistered_extension_code_is_refused(tmp_path: Path, marker: Path) -> None:
    body = pickled(b"\x82\xf7" + EMPTY_TUPLE + b"R")
    with pytest.raises(UnsafeFileError) as info:
        parse_file(as_zip(tmp_path, body))
    assert info.value.globals == ["copyreg._extension_registry[247]"]


def test_extension_code_for_an_allowed_global_resolves(tmp_path: Path) -> None:
    copyreg.add_extension("collections", "OrderedDict", 0xF2)
    try:
        body = pickled(dct((text("w"), tensor("0", (2,))), (text("x"), b"\x82\xf2" + EMPTY_TUPLE + b"R")))
        path = torch_zip(tmp_path / "e.pt", body, {"0": np.zeros(2, "<f4").tobytes()})
        parsed = parse_file(path)
    finally:
        copyreg.remove_extension("collections", "OrderedDict", 0xF2)
    assert [t.name for t in parsed.tensors] == ["w"]
    assert any("extension codes" in n for n in parsed.notes)


def test_refusals_survive_a_later_unpickling_error(tmp_path: Path, marker: Path) -> None:
    broken = call(glob("torch._utils", "_rebuild_tensor_v2"), text("not a storage"), integer(0))
    body = pickled(lst(call(glob("os", "system"), text(touch(marker))), broken))
    with pytest.raises(UnsafeFileError) as info:
        parse_file(as_zip(tmp_path, body))
    assert info.value.globals == ["os.system"]


@pytest.mark.parametrize("container", sorted(CONTAINERS))
def test_refusals_survive_a_broken_opcode_stream(
    tmp_path: Path, marker: Path, container: str
) -> None:
    body = _stack_global_memo(marker)[:-1] + call(glob("subprocess", "call"), text("x")) + b"\xff"
    wrap, _ = CONTAINERS[container]
    with pytest.raises(UnsafeFileError) as info:
        parse_file(wrap(tmp_path, body))
    assert info.value.globals == ["os.system", "subprocess.call"]


def test_truncated_hostile_pickle_is_still_unsafe(tmp_path: Path, marker: Path) -> None:
    body = pickled(call(glob("os", "system"), text(touch(marker))))[:-3]
    with pytest.raises(UnsafeFileError):
        parse_file(as_bare(tmp_path, body))


def test_reported_names_stay_on_one_line(tmp_path: Path) -> None:
    body = proto(4) + short_text("os\nFAKE: clean") + short_text("x" * 250) + b"\x93" + b"."
    with pytest.raises(UnsafeFileError) as info:
        parse_file(as_zip(tmp_path, body))
    (name,) = info.value.globals
    assert "\n" not in name and name.startswith("os\\nFAKE") and len(name) <= 200
    assert "\n" not in str(info.value)


def test_memo_index_bomb(tmp_path: Path) -> None:
    body = pickled(integer(1) + b"r" + struct.pack("<I", 2**31))
    with pytest.raises(ResourceLimitError, match="memo index"):
        parse_file(as_zip(tmp_path, body))


def test_huge_declared_bytes_allocate_nothing(tmp_path: Path) -> None:
    body = proto(4) + b"\x8e" + struct.pack("<Q", 2**62) + b"tiny."
    with pytest.raises(MalformedFileError, match="broken pickle"):
        parse_file(as_zip(tmp_path, body))


def test_build_cannot_alter_shared_values(tmp_path: Path) -> None:
    before = (DTYPES["float32"].canonical, ALLOWED["argparse.Namespace"].qualname)  # type: ignore[attr-defined]
    for target in (glob("torch", "float32"), glob("argparse", "Namespace")):
        body = pickled(target + dct((text("canonical"), text("F64")), (text("qualname"), text("os.system"))) + b"b")
        with pytest.raises(MalformedFileError):
            parse_file(as_zip(tmp_path, body))
    after = (DTYPES["float32"].canonical, ALLOWED["argparse.Namespace"].qualname)  # type: ignore[attr-defined]
    assert before == after == ("F32", "argparse.Namespace")


def test_allow_list_holds_only_inert_values() -> None:
    from modelhash.fingerprint._formats._unpickle import PlainOrderedDict

    for name, value in ALLOWED.items():
        ours = isinstance(value, Sealed) or (isinstance(value, type) and issubclass(value, Inert))
        assert ours or value is PlainOrderedDict, name
    dangerous = {
        "os.system", "posix.system", "builtins.eval", "builtins.exec", "builtins.getattr",
        "builtins.__import__", "builtins.open", "builtins.compile", "subprocess.Popen",
        "runpy._run_code", "functools.partial", "torch.load", "pickle.loads", "webbrowser.open",
    }
    assert not dangerous & set(ALLOWED)
    assert not any(n.split(".")[0] in {"os", "posix", "subprocess", "socket", "sys"} for n in ALLOWED)


def test_find_class_never_imports(tmp_path: Path) -> None:
    body = pickled(
        lst(
            call(glob("antigravity", "fly")),
            call(glob("this", "s")),
            call(glob("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint")),
            call(glob("webbrowser", "open"), text("http://127.0.0.1:9/")),
        )
    )
    sample = as_zip(tmp_path, body)
    lightning = Path(__file__).resolve().parents[1] / "fixtures" / "torch" / "model_lightning.ckpt"
    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from modelhash.errors import ModelhashError\n"
        "from modelhash.fingerprint._formats import parse_file\n"
        "for p in sys.argv[1:]:\n"
        "    try:\n"
        "        parse_file(Path(p))\n"
        "    except ModelhashError:\n"
        "        pass\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(sample), str(lightning)],
        capture_output=True, text=True, check=True, timeout=120,
    )
    loaded = set(json.loads(out.stdout))
    for forbidden in ("antigravity", "this", "webbrowser", "torch", "pytorch_lightning"):
        assert forbidden not in loaded, forbidden


def test_a_string_with_an_invalid_escape_reads_as_pickle_reads_it(tmp_path: Path) -> None:
    """A protocol-0 string whose backslash starts no escape loads under pickle with a
    DeprecationWarning; with warnings as errors (as in this suite) the file still reads,
    and a bare pickle of such a string gets a clean error, not an internal one."""
    odd = b"S'\\\x03'\n"
    with pytest.warns(DeprecationWarning):
        assert pickle.loads(odd + b".") == "\\\x03"
    body = pickled(dct((text("w"), tensor("0", (2,))), (text("note"), odd)))
    parsed = parse_file(torch_zip(tmp_path / "odd.pt", body, {"0": np.zeros(2, "<f4").tobytes()}))
    assert [t.name for t in parsed.tensors] == ["w"]
    with pytest.raises(ModelhashError) as info:
        parse_file(as_bare(tmp_path, odd + b"."))
    assert not isinstance(info.value, InternalReadError), info.value
