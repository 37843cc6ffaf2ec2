"""Copies of a flagged model, disguised, against the flag with and without its base.

For each replicate: a tiny Llama-shaped base B (numpy, ``tests/utils/invariant_models.py``),
a flagged fine-tune F and an innocent sibling G (random dense deltas of relative
size 0.02). Each function-preserving change (units and heads permuted with the
residual stream, residual stream rotated, norm scales moved, per-head q/k
scaling, per-head v/o and per-unit up/down scaling, all at once) is applied to F, alone and then cast to float16, and the
result is matched against F as the registry stores it: raw (no base registered:
``match(upload, F)``) and as a delta from B (``match(upload, F - B, B)``).
Negatives: G and B changed the same way and cast to float16.

    python benchmarks/eval_raw_invariant.py [--replicates 20] [--kv-heads 4]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modelhash.fingerprint import Match, Sketch, delta_sketch, match
from tests.utils.invariant_models import (
    StateDict,
    everything,
    llama,
    permute,
    rescale_norms,
    rotate,
    scale_qk,
    scale_vo_ffn,
)
from tests.utils.sketch_models import cast, plus, random_delta, sketch_of, write

CHANGES = {"permuted": permute, "rotated": rotate, "norms rescaled": rescale_norms,
           "q/k scaled": scale_qk, "v/o, up/down scaled": scale_vo_ffn,
           "all at once": everything}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--replicates", type=int, default=20)
    ap.add_argument("--kv-heads", type=int, default=4, choices=[1, 2, 4],
                    help="key/value heads of the 4 query heads (below 4: grouped-query "
                    "attention, where no query-key or value-output product is formed)")
    args = ap.parse_args()
    reps, kv = args.replicates, args.kv_heads
    hits = dict.fromkeys(((c, h, b) for c in CHANGES for h in (0, 1) for b in (0, 1)), 0)
    fps = dict.fromkeys(((c, b) for c in CHANGES for b in (0, 1)), 0)
    layers: dict[str, set[str]] = {c: set() for c in CHANGES}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for r in range(reps):
            b = llama(3000 + r, kv_heads=kv)
            f = plus(b, (1, random_delta(b, 4000 + r)))
            g = plus(b, (1, random_delta(b, 5000 + r)))
            base = sketch_of(write(folder, "b", b))
            raw = sketch_of(write(folder, "f", f))
            delta = delta_sketch(raw, base)[0]
            delta.invariant = raw.invariant  # as the registry stores a flag

            def verdict(sd: StateDict, with_base: int, base: Sketch = base,
                        raw: Sketch = raw, delta: Sketch = delta) -> Match | None:
                up = sketch_of(write(folder, "u", sd))
                return match(up, delta, base) if with_base else match(up, raw)

            for c, change in CHANGES.items():
                seed = 100 * r + 7
                changed = change(f, seed)[0]
                for half in (0, 1):
                    for with_base in (0, 1):
                        m = verdict(cast(changed) if half else changed, with_base)
                        hits[c, half, with_base] += m is not None
                        if m is not None:
                            layers[c].add(str(m.evidence.get("layer")))
                for with_base in (0, 1):
                    for who in (g, b):
                        got = verdict(cast(change(who, seed)[0]), with_base)
                        fps[c, with_base] += got is not None
    print(f"{reps} replicates, {kv} key/value heads; found / replicates, false positives / "
          "negatives")
    print(f"{'change':20} {'no base':>8} {'+ fp16':>8} {'FP':>6} | {'base':>6} {'+ fp16':>8} "
          f"{'FP':>6}  layers")
    for c in CHANGES:
        print(f"{c:20} {hits[c, 0, 0]:>5}/{reps} {hits[c, 1, 0]:>5}/{reps} "
              f"{fps[c, 0]:>3}/{2 * reps} | {hits[c, 0, 1]:>3}/{reps} {hits[c, 1, 1]:>5}/{reps} "
              f"{fps[c, 1]:>3}/{2 * reps}  {','.join(sorted(layers[c]))}")


if __name__ == "__main__":
    main()
