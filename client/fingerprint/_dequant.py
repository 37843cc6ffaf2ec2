"""Stored tensor bytes to float32 values, for every dtype the sketch layer reads.

A :class:`Decoder` turns whole blocks of bytes into float32 values: one element per
block for plain floats (F64/F32/F16/BF16 and the FP8 formats), 32, 64 or 256 for GGUF's
quantised formats, dequantised the way ggml does (block layouts as in ggml's
``ggml-common.h``). Values that are not finite decode as they are; the sketch layer
checks its own output instead of every element. :data:`DECODERS` is the table; a
dtype missing from it is not sketched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["DECODERS", "Decoder", "decode"]

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]
QK_K = 256


@dataclass(frozen=True)
class Decoder:
    """How to decode a dtype: ``block`` elements are stored in ``size`` bytes."""

    block: int
    size: int
    fn: Callable[[U8], F32]
    cost: float
    """CPU cost per stored byte relative to SHA-256, for packing the read pass."""


def _view(dtype: str) -> Callable[[U8], F32]:
    def fn(raw: U8) -> F32:
        return np.frombuffer(raw, dtype=dtype).astype(np.float32)

    return fn


def _f32(raw: U8) -> F32:
    return np.frombuffer(raw, dtype="<f4")


def _f16(raw: U8) -> F32:
    """IEEE half to single by moving the bits and rescaling, about 3x numpy's astype.

    Sign-extending the half to 32 bits and shifting it left by 13 puts the sign,
    exponent and mantissa at their float32 places (the mask clears the copies of
    the sign between them); read as float32, that is the value times 2^-112 for
    normal and subnormal halves alike, so one multiply by 2^112 makes it exact.
    Infinities and NaNs come out as large finite values (65536 and up) rather than
    non-finite ones. Four passes over the block, each in place.
    """
    w = np.frombuffer(raw, dtype="<i2").astype(np.int32)
    w <<= 13
    w &= np.int32(-0x70002000)  # 0x8FFFE000: the sign bit, then exponent and mantissa
    out: F32 = w.view(np.float32)
    out *= np.float32(2.0**112)
    return out


def _bf16(raw: U8) -> F32:
    wide = np.frombuffer(raw, dtype="<u2").astype(np.uint32)
    wide <<= 16
    return wide.view(np.float32)


def _fp8_table(exp_bits: int, bias: int, fnuz: bool) -> F32:
    """The 256 values of an 8-bit float; NaN and infinity codes decode to 0."""
    man_bits = 7 - exp_bits
    out = np.zeros(256, dtype=np.float64)
    for code in range(256):
        sign = -1.0 if code & 0x80 else 1.0
        e = (code >> man_bits) & ((1 << exp_bits) - 1)
        m = code & ((1 << man_bits) - 1)
        if fnuz and code == 0x80:
            continue
        if not fnuz and exp_bits == 4 and (code & 0x7F) == 0x7F:
            continue
        if not fnuz and exp_bits == 5 and e == 31:
            continue
        if e == 0:
            out[code] = sign * m / (1 << man_bits) * 2.0 ** (1 - bias)
        else:
            out[code] = sign * (1 + m / (1 << man_bits)) * 2.0 ** (e - bias)
    return out.astype(np.float32)


def _lut(table: F32) -> Callable[[U8], F32]:
    def fn(raw: U8) -> F32:
        return table[np.frombuffer(raw, dtype=np.uint8)]

    return fn


def _blocks(raw: U8, size: int) -> U8:
    return np.frombuffer(raw, dtype=np.uint8).reshape(-1, size)


def _half(b: U8) -> F32:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles(qs: U8) -> U8:
    """Low nibbles of each byte, then high nibbles (ggml's 32-element block order)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _q8_0(raw: U8) -> F32:
    b = _blocks(raw, 34)
    q: F32 = np.ascontiguousarray(b[:, 2:]).view(np.int8).astype(np.float32)
    return (q * _half(b[:, :2])).reshape(-1)


def _q4_0(raw: U8) -> F32:
    b = _blocks(raw, 18)
    q = _nibbles(b[:, 2:]).astype(np.float32) - 8
    return (q * _half(b[:, :2])).reshape(-1)


def _q4_1(raw: U8) -> F32:
    b = _blocks(raw, 20)
    q = _nibbles(b[:, 4:]).astype(np.float32)
    return (q * _half(b[:, :2]) + _half(b[:, 2:4])).reshape(-1)


def _high_bits(qh: U8) -> U8:
    """The 32 fifth bits of a Q5 block, from its little-endian u32, as 0 or 16."""
    bits = np.unpackbits(np.ascontiguousarray(qh), axis=-1, bitorder="little")
    out: U8 = (bits << 4).astype(np.uint8)
    return out


def _q5_0(raw: U8) -> F32:
    b = _blocks(raw, 22)
    q = (_nibbles(b[:, 6:]) | _high_bits(b[:, 2:6])).astype(np.float32) - 16
    return (q * _half(b[:, :2])).reshape(-1)


def _q5_1(raw: U8) -> F32:
    b = _blocks(raw, 24)
    q = (_nibbles(b[:, 8:]) | _high_bits(b[:, 4:8])).astype(np.float32)
    return (q * _half(b[:, :2]) + _half(b[:, 2:4])).reshape(-1)


def _shifted(x: U8, groups: int, width: int, shifts: list[int], mask: int) -> U8:
    """Split each byte of ``groups`` runs of ``width`` bytes into bit fields."""
    n = x.shape[0]
    s = np.array(shifts, dtype=np.uint8).reshape(1, 1, len(shifts), 1)
    out: U8 = ((x.reshape(n, groups, 1, width) >> s) & mask).astype(np.uint8)
    return out


def _q2_k(raw: U8) -> F32:
    b = _blocks(raw, 84)
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _half(b[:, 80:82]), _half(b[:, 82:84])
    dl = (d * (scales & 0x0F).astype(np.float32)).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).astype(np.float32)).reshape(n, 16, 1)
    q = _shifted(qs, 2, 32, [0, 2, 4, 6], 3).reshape(n, 16, 16).astype(np.float32)
    return (dl * q - ml).reshape(-1)


def _q3_k(raw: U8) -> F32:
    b = _blocks(raw, 110)
    n = b.shape[0]
    hmask, qs, sc = b[:, :32], b[:, 32:96], b[:, 96:108]
    d = _half(b[:, 108:110])
    low = (sc[:, :8].reshape(n, 1, 8) >> np.array([0, 4], np.uint8).reshape(1, 2, 1)).reshape(n, 16)
    shifts = np.array([0, 2, 4, 6], np.uint8).reshape(1, 4, 1)
    high = (sc[:, 8:].reshape(n, 1, 4) >> shifts).reshape(n, 16)
    scales = ((low & 0x0F) | ((high & 0x03) << 4)).astype(np.int8).astype(np.float32) - 32
    dl = (d * scales).reshape(n, 16, 1)
    ql = _shifted(qs, 2, 32, [0, 2, 4, 6], 3).reshape(n, 16, 16)
    qh = _shifted(hmask, 1, 32, list(range(8)), 1).reshape(n, 16, 16) ^ 1
    q = ql.astype(np.float32) - 4 * qh.astype(np.float32)
    return (dl * q).reshape(-1)


def _scale_min_k4(sc: U8) -> tuple[F32, F32]:
    """The 8 six-bit scales and mins packed in 12 bytes (Q4_K and Q5_K)."""
    n = sc.shape[0]
    s = sc.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    scale = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mins = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return scale.astype(np.float32), mins.astype(np.float32)


def _q4_k(raw: U8) -> F32:
    b = _blocks(raw, 144)
    n = b.shape[0]
    d, dmin = _half(b[:, :2]), _half(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    q = _shifted(b[:, 16:], 4, 32, [0, 4], 0x0F).reshape(n, 8, 32).astype(np.float32)
    return ((d * sc).reshape(n, 8, 1) * q - (dmin * mn).reshape(n, 8, 1)).reshape(-1)


def _q5_k(raw: U8) -> F32:
    b = _blocks(raw, 176)
    n = b.shape[0]
    d, dmin = _half(b[:, :2]), _half(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    qh, qs = b[:, 16:48], b[:, 48:]
    ql = _shifted(qs, 4, 32, [0, 4], 0x0F).reshape(n, 8, 32)
    hi = _shifted(qh, 1, 32, list(range(8)), 1).reshape(n, 8, 32)
    q = (ql | (hi << 4)).astype(np.float32)
    return ((d * sc).reshape(n, 8, 1) * q - (dmin * mn).reshape(n, 8, 1)).reshape(-1)


def _q6_k(raw: U8) -> F32:
    b = _blocks(raw, 210)
    n = b.shape[0]
    ql, qh = b[:, :128], b[:, 128:192]
    scales = np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(np.float32)
    d = _half(b[:, 208:210])
    low = _shifted(ql, 2, 64, [0, 4], 0x0F).reshape(n, 8, 32)
    high = _shifted(qh, 2, 32, [0, 2, 4, 6], 3).reshape(n, 8, 32)
    q = (low | (high << 4)).astype(np.float32) - 32
    return ((d * scales).reshape(n, 16, 1) * q.reshape(n, 16, 16)).reshape(-1)


# ggml-common.h kvalues_iq4nl: the 16 non-linear levels of IQ4_NL and IQ4_XS.
_IQ4NL_VALUES = np.array(
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32
)
# ggml-common.h kvalues_fp4 (the E2M1 values doubled), and ggml-impl.h
# ggml_e8m0_to_fp32_half (the E8M0 scale halved, 2^(e - 128)), which undoes the doubling.
_FP4_VALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.float32)
_E8M0_HALF = np.ldexp(1.0, np.arange(256) - 128).astype(np.float32)


def _q2_0(raw: U8) -> F32:
    """ggml-quants.c dequantize_row_q2_0: 64 two-bit codes, four per byte from the
    lowest bits up, for -1, 0, 1, 2 times the scale."""
    b = _blocks(raw, 18)
    n = b.shape[0]
    q = (b[:, 2:].reshape(n, 16, 1) >> np.array([0, 2, 4, 6], np.uint8)) & 3
    return ((q.reshape(n, 64).astype(np.float32) - 1) * _half(b[:, :2])).reshape(-1)


def _iq4_nl(raw: U8) -> F32:
    b = _blocks(raw, 18)
    q = _IQ4NL_VALUES[_nibbles(b[:, 2:])]
    return (q * _half(b[:, :2])).reshape(-1)


def _iq4_xs(raw: U8) -> F32:
    """8 sub-blocks of 32 per 256, each with a 6-bit scale (low 4 bits in
    ``scales_l``, high 2 in the little-endian u16 ``scales_h``), offset by 32."""
    b = _blocks(raw, 136)
    n = b.shape[0]
    d = _half(b[:, :2])
    scales_h = np.ascontiguousarray(b[:, 2:4]).view("<u2").astype(np.uint32)
    high = (scales_h >> np.arange(0, 16, 2, dtype=np.uint32)) & 3
    low = _shifted(b[:, 4:8], 1, 4, [0, 4], 0x0F).reshape(n, 2, 4).swapaxes(1, 2).reshape(n, 8)
    scales = (low | (high << 4)).astype(np.float32) - 32
    q = _IQ4NL_VALUES[_nibbles(b[:, 8:].reshape(n, 8, 16))]
    return ((d * scales).reshape(n, 8, 1) * q).reshape(-1)


def _mxfp4(raw: U8) -> F32:
    b = _blocks(raw, 17)
    q = _FP4_VALUES[_nibbles(b[:, 1:])]
    return (q * _E8M0_HALF[b[:, 0]].reshape(-1, 1)).reshape(-1)


DECODERS: dict[str, Decoder] = {
    "F32": Decoder(1, 4, _f32, 0.3),
    "F64": Decoder(1, 8, _view("<f8"), 0.3),
    "F16": Decoder(1, 2, _f16, 1.0),
    "BF16": Decoder(1, 2, _bf16, 0.6),
    "F8_E4M3": Decoder(1, 1, _lut(_fp8_table(4, 7, fnuz=False)), 2.0),
    "F8_E5M2": Decoder(1, 1, _lut(_fp8_table(5, 15, fnuz=False)), 2.0),
    "F8_E4M3FNUZ": Decoder(1, 1, _lut(_fp8_table(4, 8, fnuz=True)), 2.0),
    "F8_E5M2FNUZ": Decoder(1, 1, _lut(_fp8_table(5, 16, fnuz=True)), 2.0),
    "Q8_0": Decoder(32, 34, _q8_0, 3.0),
    "Q4_0": Decoder(32, 18, _q4_0, 5.0),
    "Q4_1": Decoder(32, 20, _q4_1, 5.0),
    "Q5_0": Decoder(32, 22, _q5_0, 6.0),
    "Q5_1": Decoder(32, 24, _q5_1, 6.0),
    "Q2_K": Decoder(QK_K, 84, _q2_k, 8.0),
    "Q3_K": Decoder(QK_K, 110, _q3_k, 8.0),
    "Q4_K": Decoder(QK_K, 144, _q4_k, 6.0),
    "Q5_K": Decoder(QK_K, 176, _q5_k, 6.0),
    "Q6_K": Decoder(QK_K, 210, _q6_k, 6.0),
    "Q2_0": Decoder(64, 18, _q2_0, 5.0),
    "IQ4_NL": Decoder(32, 18, _iq4_nl, 5.0),
    "IQ4_XS": Decoder(QK_K, 136, _iq4_xs, 6.0),
    "MXFP4": Decoder(32, 17, _mxfp4, 5.0),
}
"""Every dtype the sketch layer can read, by canonical (safetensors or GGML) name."""


def decode(dtype: str, raw: bytes | memoryview | U8) -> F32:
    """Decode whole blocks of ``dtype`` to float32 (raises KeyError if unsupported)."""
    d = DECODERS[dtype]
    return d.fn(np.frombuffer(raw, dtype=np.uint8))
