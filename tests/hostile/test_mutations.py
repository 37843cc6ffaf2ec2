"""Mutations of valid files of every format: a fingerprint or a clean error, nothing else.

Hypothesis takes a valid file (safetensors, GGUF, zip and legacy PyTorch checkpoints
of several protocols, LoRA, LoHa and LoKr adapters) and flips, overwrites with
boundary values, truncates, inserts or duplicates bytes. Whatever comes out, every
layer is computed in-process and each outcome must be a fingerprint or a
ModelhashError that is not an internal error (an internal error is exit 2 too, but
it means a reader let an unexpected exception through: a bug). Peak memory of the
whole run must stay under the stated bound.
"""

from __future__ import annotations

import resource
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelhash.errors import InternalReadError, ModelhashError
from modelhash.fingerprint import fingerprint_path
from modelhash.fingerprint._limits import PEAK_RSS_BOUND
from tests.fixtures.torch_pickles import dct, legacy_bytes, pickled, tensor, text, torch_zip
from tests.hostile.build_corpus import f32, gguf, st_tensors
from tests.hostile.run_corpus import PWNED


def _safetensors(path: Path) -> None:
    path.write_bytes(st_tensors({
        "model.layers.0.weight": ("F32", [16, 16], f32(256, 0.25)),
        "model.layers.0.bias": ("F16", [16], b"\x00\x3c" * 16),
    }))


def _gguf(path: Path) -> None:
    path.write_bytes(gguf(
        [("blk.0.attn_q.weight", [32, 16], 0, 0), ("blk.0.ffn.weight", [64, 4], 8, 2048)],
        f32(512) + bytes(8 * 34),
    ))


def _zip(compress: bool) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        body = dct((text("layer.weight"), tensor("0", [16, 16])),
                   (text("layer.bias"), tensor("1", [16], offset=0)))
        torch_zip(path, pickled(body), {"0": f32(256), "1": f32(16)}, compress=compress)

    return make


def _legacy(path: Path) -> None:
    body = pickled(dct((text("w"), tensor("k0", [4, 4], legacy=True))))
    path.write_bytes(legacy_bytes(body, [("k0", 16, f32(16))]))


def _lora(path: Path) -> None:
    path.write_bytes(st_tensors({
        "lora_unet_a.lora_down.weight": ("F32", [4, 32], f32(128)),
        "lora_unet_a.lora_up.weight": ("F32", [32, 4], f32(128, 0.1)),
        "lora_unet_a.alpha": ("F32", [], f32(1, 4.0)),
    }))


def _loha_lokr(path: Path) -> None:
    path.write_bytes(st_tensors({
        "lora_unet_b.hada_w1_a": ("F32", [32, 2], f32(64)),
        "lora_unet_b.hada_w1_b": ("F32", [2, 32], f32(64)),
        "lora_unet_b.hada_w2_a": ("F32", [32, 2], f32(64)),
        "lora_unet_b.hada_w2_b": ("F32", [2, 32], f32(64)),
        "lora_unet_c.lokr_w1": ("F32", [4, 4], f32(16)),
        "lora_unet_c.lokr_w2_a": ("F32", [8, 2], f32(16)),
        "lora_unet_c.lokr_w2_b": ("F32", [2, 8], f32(16)),
    }))


VALID: dict[str, tuple[str, Callable[[Path], None]]] = {
    "safetensors": ("m.safetensors", _safetensors),
    "gguf": ("m.gguf", _gguf),
    "torch zip": ("m.pt", _zip(False)),
    "torch zip, deflated": ("m.pt", _zip(True)),
    "torch legacy": ("m.pt", _legacy),
    "lora": ("a.safetensors", _lora),
    "loha and lokr": ("b.safetensors", _loha_lokr),
}

_BOUNDARY = [b"\x00" * 8, b"\xff" * 8, struct.pack("<Q", 2**63), struct.pack("<Q", 2**32),
             struct.pack("<q", -1), b"\x80\x02", b"[" * 8, b"{" * 8, b'"', b"\\", b"PK\x06\x06"]


@st.composite
def mutation(draw: st.DrawFn, size: int) -> Callable[[bytes], bytes]:
    kind = draw(st.sampled_from(["flip", "overwrite", "truncate", "insert", "duplicate"]))
    pos = draw(st.integers(0, max(0, size - 1)))
    if kind == "flip":
        bit = draw(st.integers(0, 7))
        return lambda b: b[:pos] + bytes([b[pos] ^ (1 << bit)]) + b[pos + 1 :] if b else b
    if kind == "overwrite":
        value = draw(st.sampled_from(_BOUNDARY) | st.binary(min_size=1, max_size=16))
        return lambda b: b[:pos] + value + b[pos + len(value) :]
    if kind == "truncate":
        return lambda b: b[:pos]
    if kind == "insert":
        value = draw(st.sampled_from(_BOUNDARY) | st.binary(min_size=1, max_size=16))
        return lambda b: b[:pos] + value + b[pos:]
    length = draw(st.integers(1, 256))
    return lambda b: b[:pos] + b[pos : pos + length] + b[pos:]


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux ``clear_refs``), so the bound is checked
    for this fingerprint alone, not for whatever an earlier test in the run held."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_rss(reset: bool) -> int:
    """Peak RSS in bytes since the reset (VmHWM), or of the whole process without one."""
    if reset:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, str, bytes]:
    fmt = draw(st.sampled_from(sorted(VALID)))
    name, make = VALID[fmt]
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / name
        make(p)
        data = p.read_bytes()
    for _ in range(draw(st.integers(1, 4))):
        data = draw(mutation(len(data)))(data)
    return fmt, name, data


def test_valid_files_fingerprint(tmp_path: Path) -> None:
    for fmt, (name, make) in VALID.items():
        p = tmp_path / fmt.replace(" ", "_") / name
        p.parent.mkdir()
        make(p)
        (out,) = fingerprint_path(p, layers="all")
        assert out.error is None, (fmt, out.error)
        assert out.fingerprint is not None and out.fingerprint.tensors


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=mutated())
def test_mutated_files_give_a_fingerprint_or_a_clean_error(case: tuple[str, str, bytes]) -> None:
    fmt, name, data = case
    reset = _reset_peak_rss()
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / name
        p.write_bytes(data)
        outcomes = fingerprint_path(p, layers="all")
    assert len(outcomes) == 1
    (out,) = outcomes
    if out.error is not None:
        assert isinstance(out.error, ModelhashError)
        assert not isinstance(out.error, InternalReadError), (fmt, out.error.diagnostics())
        assert "\n" not in out.error.diagnostics()
        assert out.error.__traceback__ is None
    else:
        assert out.fingerprint is not None
    assert not PWNED.exists()
    assert _peak_rss(reset) < PEAK_RSS_BOUND
