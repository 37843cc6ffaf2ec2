"""Does the invariant layer find a flagged model that was re-parameterised to evade?

A re-uploader can change every weight matrix without changing what the model
computes: permute the feed-forward units, the attention heads or the residual
stream's channels, rotate an RMSNorm model's residual stream, move scales between
a norm and the matrices that read it, between the queries and keys or the values
and outputs of a head, or between a gated feed-forward unit's linear input and its
output. This builds the tiny LLM and SD models of ``eval_derivatives.py`` (a base, a flagged
fine-tune F, an innocent sibling G, known-innocent reference fine-tunes), applies
each transformation alone, after an fp16 cast and after a 50/50 merge of F with G,
checks that the transformed model computes what the original did, and scores every
result against F the way the registry does (F stored as its delta from the base,
with its invariant layer). Negatives: G and the base transformed the same way.

Prints per case the verdict and the layer that decided it, then per transformation
the detection rate and per negative class the false positives, with and without the
references' shared direction removed, and the margins to the thresholds.

    python benchmarks/eval_invariant.py [--replicates 2] [--steps 40]

Needs torch, transformers, diffusers; never downloads weights.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval_derivatives import (
    N_REFS,
    llm_model,
    llm_step_fn,
    load_sd,
    merge,
    save_st,
    sd_models,
    sd_state,
    sd_step_fn,
    train,
)

from modelhash.fingerprint import fingerprint_file
from modelhash.fingerprint._robust import INVARIANT_THRESHOLDS, compare_invariant
from modelhash.fingerprint._similarity import (
    THRESHOLDS,
    Thresholds,
    calibrated,
    compare,
    delta_sketch,
    match,
    shared_direction,
)
from modelhash.fingerprint._sketch import Sketch

SD = dict[str, torch.Tensor]
Transform = Callable[[SD, torch.Generator], SD]


# ---------------------------------------------------------------- LLM (Llama) transforms


def _layers(sd: SD, pattern: str) -> list[str]:
    return sorted({m[1] for k in sd if (m := re.match(pattern, k))})


def _head_index(perm: torch.Tensor, hd: int) -> torch.Tensor:
    return (perm[:, None] * hd + torch.arange(hd)).reshape(-1)


LLM_HEADS = 4


def llm_ffn(sd: SD, g: torch.Generator) -> SD:
    out = dict(sd)
    for p in _layers(sd, r"(model\.layers\.\d+\.)mlp\."):
        f = sd[p + "mlp.up_proj.weight"].shape[0]
        u = torch.randperm(f, generator=g)
        out[p + "mlp.gate_proj.weight"] = sd[p + "mlp.gate_proj.weight"][u]
        out[p + "mlp.up_proj.weight"] = sd[p + "mlp.up_proj.weight"][u]
        out[p + "mlp.down_proj.weight"] = sd[p + "mlp.down_proj.weight"][:, u]
    return out


def llm_heads(sd: SD, g: torch.Generator) -> SD:
    out = dict(sd)
    for p in _layers(sd, r"(model\.layers\.\d+\.)self_attn\."):
        d = sd[p + "self_attn.q_proj.weight"].shape[0]
        idx = _head_index(torch.randperm(LLM_HEADS, generator=g), d // LLM_HEADS)
        for w in ("q_proj", "k_proj", "v_proj"):
            out[p + f"self_attn.{w}.weight"] = sd[p + f"self_attn.{w}.weight"][idx]
        out[p + "self_attn.o_proj.weight"] = sd[p + "self_attn.o_proj.weight"][:, idx]
    return out


_LLM_READS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj",
              "mlp.up_proj")
_LLM_WRITES = ("self_attn.o_proj", "mlp.down_proj")


def _llm_residual(sd: SD, q: torch.Tensor, fold: bool) -> SD:
    """x -> q x on the residual stream. With ``fold`` every norm's scale is folded
    into the matrices that read it first (needed for a rotation)."""
    out = dict(sd)
    out["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"] @ q.T
    for p in _layers(sd, r"(model\.layers\.\d+\.)"):
        for norm, reads in (("input_layernorm", _LLM_READS[:3]),
                            ("post_attention_layernorm", _LLM_READS[3:])):
            gamma = sd[p + norm + ".weight"]
            for r in reads:
                w = sd[p + r + ".weight"] * (gamma if fold else 1)
                out[p + r + ".weight"] = w @ q.T
            out[p + norm + ".weight"] = torch.ones_like(gamma) if fold else q.abs() @ gamma
        for r in _LLM_WRITES:
            out[p + r + ".weight"] = q @ sd[p + r + ".weight"]
    gamma = sd["model.norm.weight"]
    out["lm_head.weight"] = (sd["lm_head.weight"] * (gamma if fold else 1)) @ q.T
    out["model.norm.weight"] = torch.ones_like(gamma) if fold else q.abs() @ gamma
    return out


def llm_residual_perm(sd: SD, g: torch.Generator) -> SD:
    d = sd["model.norm.weight"].shape[0]
    return _llm_residual(sd, torch.eye(d)[torch.randperm(d, generator=g)], fold=False)


def llm_residual_rotation(sd: SD, g: torch.Generator) -> SD:
    d = sd["model.norm.weight"].shape[0]
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    q = (q * torch.sign(torch.diagonal(r))).float()
    return _llm_residual(sd, q, fold=True)


def llm_norm_rescale(sd: SD, g: torch.Generator) -> SD:
    out = dict(sd)
    for p in _layers(sd, r"(model\.layers\.\d+\.)"):
        for norm, reads in (("input_layernorm", _LLM_READS[:3]),
                            ("post_attention_layernorm", _LLM_READS[3:])):
            gamma = sd[p + norm + ".weight"]
            s = torch.exp(0.5 * torch.randn(gamma.shape, generator=g))
            out[p + norm + ".weight"] = gamma * s
            for r in reads:
                out[p + r + ".weight"] = sd[p + r + ".weight"] / s
    return out


def llm_qk_scale(sd: SD, g: torch.Generator) -> SD:
    """Queries times c_h, keys divided by c_h, per head (the attention logits are unchanged;
    RoPE rotates within a head, which commutes with a per-head scalar)."""
    out = dict(sd)
    for p in _layers(sd, r"(model\.layers\.\d+\.)self_attn\."):
        d = sd[p + "self_attn.q_proj.weight"].shape[0]
        c = torch.exp(0.7 * torch.randn(LLM_HEADS, generator=g)).repeat_interleave(d // LLM_HEADS)
        out[p + "self_attn.q_proj.weight"] = sd[p + "self_attn.q_proj.weight"] * c[:, None]
        out[p + "self_attn.k_proj.weight"] = sd[p + "self_attn.k_proj.weight"] / c[:, None]
    return out


def llm_vo_ffn_scale(sd: SD, g: torch.Generator) -> SD:
    """Values times c_h and output columns divided by c_h, per head; up projections
    times s_u and down projection columns divided by s_u, per unit (SwiGLU is linear
    in the up projection)."""
    out = dict(sd)
    for p in _layers(sd, r"(model\.layers\.\d+\.)self_attn\."):
        d = sd[p + "self_attn.v_proj.weight"].shape[0]
        c = torch.exp(0.7 * torch.randn(LLM_HEADS, generator=g)).repeat_interleave(d // LLM_HEADS)
        out[p + "self_attn.v_proj.weight"] = sd[p + "self_attn.v_proj.weight"] * c[:, None]
        out[p + "self_attn.o_proj.weight"] = sd[p + "self_attn.o_proj.weight"] / c
        f = sd[p + "mlp.up_proj.weight"].shape[0]
        s = torch.exp(0.7 * torch.randn(f, generator=g))
        out[p + "mlp.up_proj.weight"] = sd[p + "mlp.up_proj.weight"] * s[:, None]
        out[p + "mlp.down_proj.weight"] = sd[p + "mlp.down_proj.weight"] / s
    return out


def llm_all(sd: SD, g: torch.Generator) -> SD:
    """Every transformation above at once."""
    for t in (llm_norm_rescale, llm_qk_scale, llm_vo_ffn_scale, llm_ffn, llm_heads,
              llm_residual_rotation):
        sd = t(sd, g)
    return sd


def llm_outputs(sd: SD) -> torch.Tensor:
    m = llm_model(0)
    m.load_state_dict(sd)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        out: torch.Tensor = m(input_ids=ids).logits
    return out


# ---------------------------------------------------------------- SD (UNet + CLIP) transforms

_BLOCK = r"(unet/.*attentions\.\d+\.)transformer_blocks\.0\."
_TE = r"(text_encoder/.*encoder\.layers\.\d+\.)"


def _heads(sd: SD, prefix: str) -> int:
    return 8 if prefix.startswith("unet/") else 4


def sd_ffn(sd: SD, g: torch.Generator) -> SD:
    out = dict(sd)
    for a in _layers(sd, _BLOCK):
        b = a + "transformer_blocks.0.ff."
        inner = sd[b + "net.2.weight"].shape[1]
        u = torch.randperm(inner, generator=g)
        both = torch.cat([u, u + inner])  # GEGLU: value half, then gate half
        out[b + "net.0.proj.weight"] = sd[b + "net.0.proj.weight"][both]
        out[b + "net.0.proj.bias"] = sd[b + "net.0.proj.bias"][both]
        out[b + "net.2.weight"] = sd[b + "net.2.weight"][:, u]
    for p in _layers(sd, _TE):
        u = torch.randperm(sd[p + "mlp.fc1.weight"].shape[0], generator=g)
        out[p + "mlp.fc1.weight"] = sd[p + "mlp.fc1.weight"][u]
        out[p + "mlp.fc1.bias"] = sd[p + "mlp.fc1.bias"][u]
        out[p + "mlp.fc2.weight"] = sd[p + "mlp.fc2.weight"][:, u]
    return out


def sd_heads(sd: SD, g: torch.Generator) -> SD:
    out = dict(sd)
    for a in _layers(sd, _BLOCK):
        for attn in ("attn1", "attn2"):
            b = a + f"transformer_blocks.0.{attn}."
            d = sd[b + "to_q.weight"].shape[0]
            h = _heads(sd, a)
            idx = _head_index(torch.randperm(h, generator=g), d // h)
            for w in ("to_q", "to_k", "to_v"):
                out[b + w + ".weight"] = sd[b + w + ".weight"][idx]
            out[b + "to_out.0.weight"] = sd[b + "to_out.0.weight"][:, idx]
    for p in _layers(sd, _TE):
        b = p + "self_attn."
        d = sd[b + "q_proj.weight"].shape[0]
        idx = _head_index(torch.randperm(4, generator=g), d // 4)
        for w in ("q_proj", "k_proj", "v_proj"):
            out[b + w + ".weight"] = sd[b + w + ".weight"][idx]
            out[b + w + ".bias"] = sd[b + w + ".bias"][idx]
        out[b + "out_proj.weight"] = sd[b + "out_proj.weight"][:, idx]
    return out


def sd_residual_perm(sd: SD, g: torch.Generator) -> SD:
    """Permute each UNet transformer's inner channels, and the text encoder's residual
    stream (the cross-attention keys and values read it)."""
    out = dict(sd)
    for a in _layers(sd, _BLOCK):
        b = a + "transformer_blocks.0."
        r = torch.randperm(sd[a + "proj_in.bias"].shape[0], generator=g)
        out[a + "proj_in.weight"] = sd[a + "proj_in.weight"][r]
        out[a + "proj_in.bias"] = sd[a + "proj_in.bias"][r]
        out[a + "proj_out.weight"] = sd[a + "proj_out.weight"][:, r]
        for n in ("norm1", "norm2", "norm3"):
            out[b + n + ".weight"] = sd[b + n + ".weight"][r]
            out[b + n + ".bias"] = sd[b + n + ".bias"][r]
        for w in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q", "ff.net.0.proj"):
            out[b + w + ".weight"] = sd[b + w + ".weight"][:, r]
        for w in ("attn1.to_out.0", "attn2.to_out.0", "ff.net.2"):
            out[b + w + ".weight"] = sd[b + w + ".weight"][r]
            out[b + w + ".bias"] = sd[b + w + ".bias"][r]
    emb = next(k for k in sd if k.endswith("embeddings.token_embedding.weight"))
    te = emb[: -len("embeddings.token_embedding.weight")]
    r = torch.randperm(sd[emb].shape[1], generator=g)
    for k in ("embeddings.token_embedding.weight", "embeddings.position_embedding.weight"):
        out[te + k] = sd[te + k][:, r]
    for k in ("final_layer_norm.weight", "final_layer_norm.bias"):
        out[te + k] = sd[te + k][r]
    for p in _layers(sd, _TE):
        for n in ("layer_norm1", "layer_norm2"):
            out[p + n + ".weight"] = sd[p + n + ".weight"][r]
            out[p + n + ".bias"] = sd[p + n + ".bias"][r]
        for w in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1"):
            out[p + w + ".weight"] = sd[p + w + ".weight"][:, r]
        for w in ("self_attn.out_proj", "mlp.fc2"):
            out[p + w + ".weight"] = sd[p + w + ".weight"][r]
            out[p + w + ".bias"] = sd[p + w + ".bias"][r]
    for a in _layers(sd, _BLOCK):
        for w in ("attn2.to_k", "attn2.to_v"):
            k = a + "transformer_blocks.0." + w + ".weight"
            out[k] = out[k][:, r]
    return out


def sd_norm_rescale(sd: SD, g: torch.Generator) -> SD:
    out = dict(sd)
    pairs: list[tuple[str, list[str]]] = []
    for a in _layers(sd, _BLOCK):
        b = a + "transformer_blocks.0."
        pairs += [(b + "norm1", [b + "attn1.to_q", b + "attn1.to_k", b + "attn1.to_v"]),
                  (b + "norm2", [b + "attn2.to_q"]), (b + "norm3", [b + "ff.net.0.proj"])]
    for p in _layers(sd, _TE):
        pairs += [(p + "layer_norm1", [p + "self_attn.q_proj", p + "self_attn.k_proj",
                                       p + "self_attn.v_proj"]),
                  (p + "layer_norm2", [p + "mlp.fc1"])]
    for norm, reads in pairs:
        s = torch.exp(0.5 * torch.randn(sd[norm + ".weight"].shape, generator=g))
        out[norm + ".weight"] = sd[norm + ".weight"] * s
        out[norm + ".bias"] = sd[norm + ".bias"] * s
        for r in reads:
            out[r + ".weight"] = sd[r + ".weight"] / s
    return out


def sd_qk_scale(sd: SD, g: torch.Generator) -> SD:
    out = dict(sd)
    for a in _layers(sd, _BLOCK):
        b = a + "transformer_blocks.0.attn1."
        d = sd[b + "to_q.weight"].shape[0]
        h = _heads(sd, a)
        c = torch.exp(0.7 * torch.randn(h, generator=g)).repeat_interleave(d // h)
        out[b + "to_q.weight"] = sd[b + "to_q.weight"] * c[:, None]
        out[b + "to_k.weight"] = sd[b + "to_k.weight"] / c[:, None]
    return out


def sd_vo_ffn_scale(sd: SD, g: torch.Generator) -> SD:
    """Values (and their bias) times c_h, output columns divided by c_h, per head, in
    every attention; GEGLU's linear half times s_u, the output's columns divided."""
    out = dict(sd)
    for a in _layers(sd, _BLOCK):
        for attn in ("attn1", "attn2"):
            b = a + f"transformer_blocks.0.{attn}."
            d = sd[b + "to_v.weight"].shape[0]
            h = _heads(sd, a)
            c = torch.exp(0.7 * torch.randn(h, generator=g)).repeat_interleave(d // h)
            out[b + "to_v.weight"] = sd[b + "to_v.weight"] * c[:, None]
            out[b + "to_out.0.weight"] = sd[b + "to_out.0.weight"] / c
        b = a + "transformer_blocks.0.ff."
        inner = sd[b + "net.2.weight"].shape[1]
        s = torch.exp(0.7 * torch.randn(inner, generator=g))
        both = torch.cat([s, torch.ones(inner)])  # the value half only, not the gate
        out[b + "net.0.proj.weight"] = sd[b + "net.0.proj.weight"] * both[:, None]
        out[b + "net.0.proj.bias"] = sd[b + "net.0.proj.bias"] * both
        out[b + "net.2.weight"] = sd[b + "net.2.weight"] / s
    for p in _layers(sd, _TE):
        b = p + "self_attn."
        d = sd[b + "v_proj.weight"].shape[0]
        c = torch.exp(0.7 * torch.randn(4, generator=g)).repeat_interleave(d // 4)
        out[b + "v_proj.weight"] = sd[b + "v_proj.weight"] * c[:, None]
        out[b + "v_proj.bias"] = sd[b + "v_proj.bias"] * c
        out[b + "out_proj.weight"] = sd[b + "out_proj.weight"] / c
    return out


def sd_all(sd: SD, g: torch.Generator) -> SD:
    for t in (sd_norm_rescale, sd_qk_scale, sd_vo_ffn_scale, sd_ffn, sd_heads,
              sd_residual_perm):
        sd = t(sd, g)
    return sd


def sd_outputs(sd: SD) -> torch.Tensor:
    unet, te = sd_models(0)
    load_sd(unet, te, sd)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ids = torch.randint(0, 512, (2, 16), generator=g)
    with torch.no_grad():
        out: torch.Tensor = unet(x, torch.tensor([10, 500]),
                                 encoder_hidden_states=te(ids).last_hidden_state).sample
    return out


# ---------------------------------------------------------------- building the cases


@dataclass
class Case:
    family: str
    group: str
    path: Path
    flag: str
    positive: bool


TRANSFORMS: dict[str, dict[str, Transform]] = {
    "llm": {"FFN units": llm_ffn, "heads": llm_heads, "residual permutation": llm_residual_perm,
            "residual rotation": llm_residual_rotation, "norm rescale": llm_norm_rescale,
            "q/k rescale per head": llm_qk_scale,
            "v/o per head, up/down per unit rescaled": llm_vo_ffn_scale, "all at once": llm_all},
    "sd": {"FFN units": sd_ffn, "heads": sd_heads, "residual permutation": sd_residual_perm,
           "norm rescale": sd_norm_rescale, "q/k rescale per head": sd_qk_scale,
           "v/o per head, GEGLU per unit rescaled": sd_vo_ffn_scale, "all at once": sd_all},
}


def build(family: str, work: Path, reps: int, steps: int, cases: list[Case],
          flagged: dict[str, Path], refs: list[Path]) -> tuple[Path, float]:
    """Base, references and every case of one family; the worst relative output
    change any transformation made (it must be rounding only)."""
    if family == "llm":
        m = llm_model(1)
        train(list(m.parameters()), lambda: llm_step_fn(0)(m), 4 * steps, 5e-4)
        base = {k: v.detach().clone() for k, v in m.state_dict().items()}

        def finetune(data: int) -> SD:
            x = llm_model(0)
            x.load_state_dict(base)
            loss = llm_step_fn(data)
            train(list(x.parameters()), lambda: loss(x), steps, 2e-4)
            return {k: v.detach().clone() for k, v in x.state_dict().items()}

        outputs = llm_outputs
    else:
        unet, te = sd_models(1)
        train([*unet.parameters(), *te.parameters()], lambda: sd_step_fn(0)(unet, te),
              4 * steps, 5e-4)
        base = sd_state(unet, te)

        def finetune(data: int) -> SD:
            u, t = sd_models(0)
            load_sd(u, t, base)
            loss = sd_step_fn(data)
            train([*u.parameters(), *t.parameters()], lambda: loss(u, t), steps, 5e-4)
            return sd_state(u, t)

        outputs = sd_outputs
    d = work / family
    d.mkdir()
    base_path = save_st(base, d / "base.safetensors")
    for i in range(N_REFS):
        refs.append(save_st(finetune(9500 + i), d / f"ref{i}.safetensors", torch.float16))
    worst = 0.0
    for rep in range(reps):
        F, G = finetune(100 * rep + 1), finetune(100 * rep + 2)
        key = f"{family}{rep}:F"
        flagged[key] = save_st(F, d / f"F{rep}.safetensors")
        cases.append(Case(family, "F fp16 (untransformed)",
                          save_st(F, d / f"F{rep}_16.safetensors", torch.float16), key, True))
        for t_name, t in TRANSFORMS[family].items():
            g = torch.Generator().manual_seed(31 * rep + len(t_name))
            tf = t(F, g)
            ref = outputs(F)
            worst = max(worst, float((outputs(tf) - ref).abs().max() / ref.abs().max()))
            tag = re.sub(r"\W+", "_", t_name)
            for variant, sd, dtype, positive in (
                ("", tf, None, True),
                (" + fp16", tf, torch.float16, True),
                (" + 50/50 merge with a sibling", t(merge(F, G, 0.5), g), torch.float16, True),
                (" [sibling G, same transform]", t(G, g), torch.float16, False),
                (" [base, same transform]", t(base, g), torch.float16, False),
            ):
                p = save_st(sd, d / f"{tag}{rep}_{len(cases)}.safetensors", dtype)
                cases.append(Case(family, t_name + variant, p, key, positive))
        cases.append(Case(family, "sibling G (untransformed)",
                          save_st(G, d / f"G{rep}.safetensors", torch.float16), key, False))
    return base_path, worst


# ---------------------------------------------------------------- scoring


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicates", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--families", nargs="+", default=["llm", "sd"], choices=["llm", "sd"])
    ap.add_argument("--verbose", action="store_true", help="print every case")
    ap.add_argument("--keep", type=Path, help="build into this folder, or reuse what an "
                    "earlier run built there (to re-score without re-training)")
    args = ap.parse_args()
    run(args.replicates, args.steps, args.families, verbose=args.verbose, keep=args.keep)


def run(replicates: int, steps: int, families: list[str], *, verbose: bool = False,
        keep: Path | None = None) -> None:
    """Build (or reuse, from ``keep``), score and print every case."""
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = keep or Path(tmp)
        manifest = work / "manifest.json"
        cases: list[Case] = []
        flagged: dict[str, Path] = {}
        bases: dict[str, Path] = {}
        refs: dict[str, list[Path]] = {}
        if manifest.exists():
            m = json.loads(manifest.read_text())
            cases = [Case(c[0], c[1], Path(c[2]), c[3], c[4]) for c in m["cases"]
                     if c[0] in families]
            flagged = {k: Path(v) for k, v in m["flagged"].items()
                       if k.split(":")[0].rstrip("0123456789") in families}
            bases = {k: Path(v) for k, v in m["bases"].items() if k in families}
            refs = {k: [Path(p) for p in v] for k, v in m["refs"].items()}
            print(f"reusing the models built in {work}")
        else:
            work.mkdir(parents=True, exist_ok=True)
            for fam in families:
                refs[fam] = []
                bases[fam], worst = build(fam, work, replicates, steps, cases,
                                          flagged, refs[fam])
                print(f"{fam}: largest relative output change made by a transformation: "
                      f"{worst:.1e}")
            manifest.write_text(json.dumps({
                "cases": [[c.family, c.group, str(c.path), c.flag, c.positive] for c in cases],
                "flagged": {k: str(v) for k, v in flagged.items()},
                "bases": {k: str(v) for k, v in bases.items()},
                "refs": {k: [str(p) for p in v] for k, v in refs.items()},
            }))
        built = time.perf_counter() - t0
        cache: dict[Path, Sketch] = {}

        def sk(p: Path) -> Sketch:
            if p not in cache:
                fp = fingerprint_file(p)
                assert fp.sketch is not None
                cache[p] = fp.sketch
            return cache[p]

        base_sk = {fam: sk(p) for fam, p in bases.items()}
        stored: dict[str, Sketch] = {}
        for key, p in flagged.items():
            fam = key.split(":")[0].rstrip("0123456789")
            s = sk(p)
            delta = delta_sketch(s, base_sk[fam])[0]
            delta.invariant = s.invariant  # as the registry stores a flag
            stored[key] = delta
        for with_refs in (False, True):
            shared = {fam: shared_direction([sk(p) for p in refs[fam]], base_sk[fam])
                      if with_refs else None for fam in bases}
            # The thresholds the references calibrate, as the registry uses them.
            cal = {fam: calibrated([sk(p) for p in refs[fam]], base_sk[fam])
                   if with_refs else THRESHOLDS for fam in bases}
            print(f"\n== {'with' if with_refs else 'without'} references "
                  f"({N_REFS if with_refs else 0} known-innocent fine-tunes per family)")
            score(cases, sk, base_sk, stored, shared, verbose, cal)
        print(f"\nbuilt in {built:.0f} s, scored in {time.perf_counter() - t0 - built:.0f} s "
              f"({len(cache)} files)")


def score(cases: list[Case], sk: Callable[[Path], Sketch], base_sk: dict[str, Sketch],
          stored: dict[str, Sketch], shared: dict[str, Sketch | None], verbose: bool,
          cal: dict[str, Thresholds]) -> None:
    groups: dict[tuple[str, str], list[tuple[bool, str, float | None, float | None]]] = (
        defaultdict(list))
    inv_pos: list[float] = []
    inv_neg: list[tuple[float, float, float]] = []
    for c in cases:
        up, flag, base = sk(c.path), stored[c.flag], base_sk[c.family]
        sh = shared[c.family]
        th = cal[c.family]
        m = match(up, flag, base, base_name=f"{c.family}-base", shared=sh, thresholds=th)
        ordinary = compare(up, flag, base, shared=sh, thresholds=th)
        assert up.invariant is not None and flag.invariant is not None
        assert base.invariant is not None
        ic = compare_invariant(up.invariant, flag.invariant, base.invariant,
                               shared=sh.invariant if sh is not None else None,
                               thresholds=th.invariant)
        layer = "-" if m is None else ("invariant" if m.evidence.get("invariant") else "sketch")
        groups[c.family, c.group].append((m is not None, layer, ic.cosine, ic.coefficient))
        if ic.cosine is not None and ic.coefficient is not None and ic.z is not None:
            if c.positive:
                inv_pos.append(ic.cosine)
            else:
                inv_neg.append((ic.cosine, ic.coefficient, ic.z))
        if verbose:
            print(f"  {c.family:4} {c.group:58} {m.match if m else '-':15} {layer:9} "
                  f"sketch cov={ordinary.coverage:.2f} cos={_f(ordinary.cosine)} "
                  f"bd={_f(ordinary.base_distance, '.1e')} | invariant "
                  f"cos={_f(ic.cosine)} coef={_f(ic.coefficient)} z={_f(ic.z, '.1f')} "
                  f"n={ic.matrices} bd={_f(ic.base_distance, '.1e')}")
    print(f"  {'family':6} {'case':58} {'found':>7} {'by layer':18} {'inv. cosine':>14} "
          f"{'inv. coef':>14}")
    for (fam, group), rows in groups.items():
        positive = not group.endswith("]") and not group.startswith("sibling")
        hits = sum(1 for r in rows if r[0])
        layers = ",".join(sorted({r[1] for r in rows if r[0]})) or "-"
        cos = [r[2] for r in rows if r[2] is not None]
        coef = [r[3] for r in rows if r[3] is not None]
        what = f"{hits}/{len(rows)}" if positive else f"FP {hits}/{len(rows)}"
        print(f"  {fam:6} {group:58} {what:>7} {layers:18} {_range(cos):>14} {_range(coef):>14}")
    t = INVARIANT_THRESHOLDS
    if inv_neg:
        print(f"  negatives' invariant scores: max cosine {max(x[0] for x in inv_neg):.3f}, "
              f"max coefficient {max(x[1] for x in inv_neg):.3f}, max z "
              f"{max(x[2] for x in inv_neg):.1f} (thresholds: copies cos >= {t.copy_cosine}, "
              f"coef {t.copy_coefficient}; with references cos >= {t.shared_cosine}, coef >= "
              f"{t.shared_min_coefficient}; z >= {t.z}; sketch z >= {THRESHOLDS.z})")


def _f(x: float | None, f: str = ".3f") -> str:
    return "-" if x is None else format(x, f)


def _range(xs: list[float]) -> str:
    return f"{min(xs):.2f}..{max(xs):.2f}" if xs else "-"


if __name__ == "__main__":
    main()
