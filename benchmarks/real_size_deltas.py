"""Real-size deltas: does sketch storage precision fake a correlation between two deltas?

Fine-tunes move a model by 1e-4 to 1e-2 of its weights. A flagged fine-tune F and
an innocent sibling U of one base B are compared on their deltas F - B and U - B,
with B's *stored* sketch. Whatever rounding the stored B carries appears in both
deltas; if it is not far below the deltas themselves, the two deltas correlate
through it and the sibling looks derived.

This script sketches full-size weight matrices of Llama-3.2-1B's decoder layers (16
layers x q, k, v, o, gate, up, down; 112 matrices, 973M weights) with random
Gaussian values, and deltas of relative size ``eps`` with independent random values,
through the real projection. The sketch is linear, so S(B + eps D) = S(B) + eps S(D)
and each full-size tensor is projected once. It then stores the sketches with
:meth:`Sketch.to_bytes` at each precision, and reports the sibling's and the
re-uploaded flag's scores.

    python benchmarks/real_size_deltas.py [--layers 16] [--eps 1e-4 1e-3 1e-2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from modelhash.fingerprint._project import project
from modelhash.fingerprint._similarity import compare, match, storage_copy
from modelhash.fingerprint._sketch import Sketch, TensorSketch

SHAPES = {
    "q_proj": (2048, 2048), "k_proj": (512, 2048), "v_proj": (512, 2048), "o_proj": (2048, 2048),
    "gate_proj": (8192, 2048), "up_proj": (8192, 2048), "down_proj": (2048, 8192),
}


def sketches(layers: int, seed: int) -> dict[str, tuple[tuple[int, int], np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = {}
    for layer in range(layers):
        for name, shape in SHAPES.items():
            w = rng.standard_normal(shape, dtype=np.float32) * 0.02
            out[f":layers_{layer}_{name}"] = (shape, project(w))
    return out


def build(parts: list[tuple[float, dict[str, tuple[tuple[int, int], np.ndarray]]]]) -> Sketch:
    keys = parts[0][1]
    return Sketch("model", {
        k: TensorSketch(k, keys[k][0], sum(c * p[k][1] for c, p in parts)) for k in keys
    })


def stored(s: Sketch, precision: str) -> Sketch:
    if precision == "exact":
        return s
    return Sketch.from_bytes(s.to_bytes(precision=precision))  # type: ignore[call-arg]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--eps", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2])
    args = ap.parse_args()
    t0 = time.time()
    base = sketches(args.layers, 0)
    d_flag = sketches(args.layers, 1)
    d_sib = sketches(args.layers, 2)
    print(f"projected {3 * 7 * args.layers} full-size matrices in {time.time() - t0:.0f} s",
          flush=True)
    print("eps     stored   sibling cos   sibling z   flag re-upload cos   z    "
          "match(sibling)  match(base)  base is a copy of flag's base")
    for eps in args.eps:
        b = build([(1.0, base)])
        f = build([(1.0, base), (eps, d_flag)])
        u = build([(1.0, base), (eps, d_sib)])
        for precision in ("exact", "f16", "f32"):
            sb, sf, su = (stored(x, precision) for x in (b, f, u))
            c = compare(su, sf, sb)
            again = compare(stored(f, precision), sf, sb)
            m = match(su, sf, sb)
            mb = match(sb, sf, sb)
            copy = storage_copy(sf, sb)
            print(f"{eps:<7g} {precision:<8} {c.cosine:>11.4f} {c.z:>11.2f} "
                  f"{again.cosine:>18.4f} {again.z:>7.1f}    {m.match if m else 'none':<15} "
                  f"{mb.match if mb else 'none':<12} {copy}", flush=True)


if __name__ == "__main__":
    main()
