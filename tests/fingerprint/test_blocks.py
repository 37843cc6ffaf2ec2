"""Per-block match evidence: where in a model a tensor sits, and the per-block scores."""

from __future__ import annotations

import numpy as np
import pytest

from modelhash.fingerprint import Sketch, TensorSketch, compare, delta_sketch
from modelhash.fingerprint._blocks import block_of
from modelhash.fingerprint._project import K


@pytest.mark.parametrize(("key", "component", "block", "part", "label"), [
    ("unet:down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", "unet", "down_blocks_1",
     "attention", "down 1"),
    ("unet:up_blocks_2_attentions_1_transformer_blocks_0_ff_net_0_proj", "unet", "up_blocks_2",
     "mlp", "up 2"),
    ("unet:mid_block_resnets_0_conv1", "unet", "mid_block", "other", "mid"),
    ("unet:down_blocks_0_attentions_0_proj_in", "unet", "down_blocks_0", "other", "down 0"),
    ("te1:encoder_layers_3_self_attn_q_proj", "te1", "encoder_layers_3", "attention", "3"),
    ("te2:encoder_layers_30_mlp_fc2", "te2", "encoder_layers_30", "mlp", "30"),
    (":model_layers_31_mlp_down_proj", "model", "model_layers_31", "mlp", "31"),
    (":model_layers_0_self_attn_o_proj", "model", "model_layers_0", "attention", "0"),
    ("unet:conv_in", "unet", "conv_in", "other", "conv in"),
])
def test_block_of(key, component, block, part, label):
    b = block_of(key)
    assert (b.component, b.block, b.part, b.label) == (component, block, part, label)


def _sketch(keys: list[str], seed: int, scale: float = 1.0) -> Sketch:
    rng = np.random.default_rng(seed)
    return Sketch("model", {k: TensorSketch(k, (320, 320), scale * rng.standard_normal((K, K)))
                            for k in keys})


def test_compare_reports_where_the_flagged_delta_sits():
    keys = [f"unet:up_blocks_{b}_attentions_0_transformer_blocks_0_attn1_to_{p}"
            for b in range(3) for p in "qkv"]
    keys += [f"unet:up_blocks_{b}_attentions_0_transformer_blocks_0_ff_net_2" for b in range(3)]
    base = _sketch(keys, 0)
    rng = np.random.default_rng(1)
    flagged_keys = [k for k in keys if "up_blocks_1" in k and "attn1" in k]
    change = {k: 0.02 * rng.standard_normal((K, K)) for k in flagged_keys}
    noise = {k: 0.002 * rng.standard_normal((K, K)) for k in keys}

    def plus(*parts: dict[str, np.ndarray]) -> Sketch:
        return Sketch("model", {k: TensorSketch(k, t.shape, t.values + sum(
            p.get(k, 0) for p in parts)) for k, t in base.tensors.items()})

    flagged = delta_sketch(plus(change), base)[0]
    flagged = Sketch("delta", {k: t for k, t in flagged.tensors.items() if k in flagged_keys})
    c = compare(plus(change, noise), flagged, base, base_name="base")
    by = {(b.block, b.part): b for b in c.blocks}
    hit = by[("up_blocks_1", "attention")]
    assert hit.cosine is not None and hit.cosine > 0.9 and hit.tensors == 3
    assert hit.share == pytest.approx(1.0)
    assert 0.9 < (hit.coefficient or 0) < 1.1
    # Blocks only the upload changed are listed, in model order, without scores.
    other = by[("up_blocks_0", "attention")]
    assert other.cosine is None and other.tensors == 0 and other.upload_share > 0
    assert [b.block for b in c.blocks][:3] == ["up_blocks_0", "up_blocks_1", "up_blocks_2"]
    assert sum(b.upload_share for b in c.blocks) == pytest.approx(1.0)
