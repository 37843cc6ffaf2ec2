"""Where in a model a tensor sits: its component, its block and the part of the block.

Match evidence is reported per block, so an analyst can see that a flagged delta
sits in, say, the attention of the UNet's up blocks. Keys are the canonical module
keys of :mod:`modelhash.fingerprint._keys` (``component:path``, ``_`` separated).
A block is the path up to its first layer number (``down_blocks_1``,
``encoder_layers_7``, ``model_layers_31``) or up to a word ending in ``block``
(``mid_block``); a path with neither is a block of its own (``conv_in``). The
part is read from the path by the table :data:`PARTS`: a new naming convention is
a new pattern there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["PARTS", "BlockName", "block_of"]

PARTS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("attention", re.compile(
        r"(^|_)(attn\d*|attention|self_attn|cross_attn|c_attn|qkv|query|key|value|"
        r"to_q|to_k|to_v|to_out|q_proj|k_proj|v_proj|o_proj|out_proj|in_proj)(_|$)"
    )),
    ("mlp", re.compile(
        r"(^|_)(mlp|ff|ffn|feed_forward|fc\d|gate_proj|up_proj|down_proj|c_fc|c_proj|"
        r"dense_h_to_4h|dense_4h_to_h|w[123])(_|$)"
    )),
)
"""Part of a block, by pattern on the path; the first that matches wins, else ``other``."""

#: Words dropped from a block's short label: they name the kind of list, not the place.
_GENERIC = frozenset({"blocks", "layers", "layer", "encoder", "text", "model", "h",
                      "transformer", "block", "resblocks", "decoder"})


@dataclass(frozen=True)
class BlockName:
    """A tensor's place: ``component`` (``unet``, ``te1``...), ``block`` and ``part``."""

    component: str
    block: str
    part: str

    @property
    def label(self) -> str:
        """A short label for the block: ``down 1``, ``mid``, ``7``."""
        words = [w for w in self.block.split("_") if w not in _GENERIC]
        return " ".join(words) or self.block


def block_of(key: str) -> BlockName:
    """The component, block and part of the tensor with canonical ``key``."""
    component, _, path = key.rpartition(":")
    words = path.split("_")
    cut = len(words)
    for i, word in enumerate(words):
        if word.isdigit() or word.endswith("block"):
            cut = i + 1
            break
    block = "_".join(words[:cut]) or path
    part = next((name for name, pattern in PARTS if pattern.search(path)), "other")
    return BlockName(component or "model", block, part)
