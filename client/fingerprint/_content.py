"""The content layer: one hash over a model's tensors, whatever holds them.

``content-blake3-v1`` is BLAKE3 over a length-prefixed, unambiguous encoding of
every tensor's canonical name, dtype, shape and the BLAKE3 of its C-order bytes,
sorted by name. Container, tensor order, metadata, sharding and wrapper prefixes
do not change it; a dtype cast or any changed value does.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Sequence

import blake3

from modelhash.fingerprint._digest import CONTENT_ALGORITHM, Digest
from modelhash.fingerprint._keys import module_key
from modelhash.fingerprint._result import TensorDigest

__all__ = ["WRAPPER_PREFIXES", "canonical_names", "canonical_unit_names", "content_digest"]

# Prefixes that wrappers add to every key: DataParallel/DDP, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

# First words that name a component or an adapter format: a prefix that says
# *what* the tensors are is kept even when every name shares it.
_MEANINGFUL = frozenset({
    "base_model", "cond_stage_model", "conditioner", "diffusion_model", "first_stage_model",
    "text_encoder", "text_encoder_2", "text_encoder_3", "text_encoders", "transformer",
    "unet", "vae",
})
# Leaf words that name a parameter of one module (``x.weight``, ``x.lora_up.weight``,
# ``x.alpha``): a prefix followed by these is the module itself, not a wrapper.
_LEAVES = frozenset({
    "weight", "bias", "alpha", "scale", "lora_down", "lora_up", "lora_mid", "lora_A",
    "lora_B", "lora", "lora_linear_layer", "dora_scale", "lora_magnitude_vector",
    "string_to_param", "string_to_token", "running_mean", "running_var",
})
# A prefix is one word followed by a dot; the longest prefix that is also a
# component prefix (``model.diffusion_model.``) is meaningful as a whole.
_COMPONENT_HEADS = ("model.diffusion_model.",)

# A1111's textual-inversion file: one token's vectors and its token id.
_A1111 = re.compile(r"string_to_(param|token)\.[^.]+")
_A1111_NAMES = {"string_to_param": "emb_params", "string_to_token": "emb_token"}

_DOMAIN = b"modelhash/content/v1\x00"


def _shared_wrapper(names: Sequence[str]) -> str | None:
    """The first word every name shares, if it only wraps the model; else None.

    A wrapper (DataParallel's ``module.``, torch.compile's ``_orig_mod.``,
    Lightning's ``model.``, ``net.``, ``ema.``...) is recognised by what it is
    not: a component name, an adapter marker, a module whose parameters follow
    directly, a module list, or a single subtree. A real layer that happens to be
    called ``module`` in one key keeps its name, as only a prefix of *all* names
    counts.
    """
    first, _, _ = names[0].partition(".")
    prefix = first + "."
    if not first or first in _MEANINGFUL:
        return None
    if not all(n.startswith(prefix) and len(n) > len(prefix) for n in names):
        return None
    if prefix in WRAPPER_PREFIXES:
        return prefix
    if any(n.startswith(h) for n in names for h in _COMPONENT_HEADS):
        return None
    rests = [n[len(prefix) :] for n in names]
    if all("." not in r or r.partition(".")[0] in _LEAVES for r in rests):
        return None
    heads = {r.partition(".")[0] for r in rests}
    # A wrapper holds a whole model: several top-level modules, not one module
    # list (``double_blocks.0``...) or one subtree (a LoRA on ``encoder.layers``
    # only), and it is not itself a layer the key layer knows.
    if any(h.isdigit() for h in heads) or module_key(first).partition(":")[0]:
        return None
    if len(heads) < 2 and _shared_wrapper(rests) is None:
        return None
    return prefix


def canonical_names(names: Sequence[str]) -> list[str]:
    """Strip wrapper prefixes that every name shares, repeatedly; name embeddings alike.

    :data:`WRAPPER_PREFIXES` always count; any other first word counts when every
    name shares it and it only wraps the model (see :func:`_shared_wrapper`), so a
    Lightning checkpoint (``model.``) and the same tensors saved bare agree. A
    textual inversion saved by A1111 (``string_to_param.<token>``) names its
    vectors as the safetensors form does (``emb_params``).
    """
    out = list(names)
    while out:
        prefix = _shared_wrapper(out)
        if prefix is None:
            break
        out = [n[len(prefix) :] for n in out]
    if out and all(_A1111.fullmatch(n) for n in out):
        params = [n for n in out if n.startswith("string_to_param.")]
        if len(params) == 1:
            out = [_A1111_NAMES[n.partition(".")[0]] for n in out]
    return out


def canonical_unit_names(files: Sequence[Sequence[str]]) -> list[list[str]]:
    """:func:`canonical_names` over every file of one model at once, split back per file.

    The shards of one checkpoint must agree on what is a wrapper: a shard that
    happens to hold only ``model.layers.*`` must not lose a prefix that the shard
    holding ``lm_head`` keeps.
    """
    flat = canonical_names([n for names in files for n in names])
    out: list[list[str]] = []
    i = 0
    for names in files:
        out.append(flat[i : i + len(names)])
        i += len(names)
    return out


_INTEGER = frozenset({"I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64"})


def _is_metadata(t: TensorDigest, names: frozenset[str]) -> bool:
    """Whether ``t`` is a file's bookkeeping rather than its weights.

    A1111 stores beside an embedding's vectors the token id of its placeholder
    (``string_to_token: {"*": 265}``, the same constant for every embedding its
    ``Embedding.save`` writes); the safetensors form of the same embedding has only
    ``emb_params``. So a one-element integer ``emb_token`` next to ``emb_params``
    stays in the tensor list but not in the content hash.
    """
    return (t.name == "emb_token" and "emb_params" in names and t.dtype in _INTEGER
            and math.prod(t.shape) == 1)


def content_digest(tensors: Sequence[TensorDigest]) -> Digest:
    """The content hash of ``tensors`` (names must already be canonical and unique).

    Bookkeeping tensors (see :func:`_is_metadata`) are left out.
    """
    names = frozenset(t.name for t in tensors)
    tensors = [t for t in tensors if not _is_metadata(t, names)]
    h = blake3.blake3(_DOMAIN)
    h.update(struct.pack("<Q", len(tensors)))
    for t in sorted(tensors, key=lambda t: t.name.encode("utf-8")):
        name = t.name.encode("utf-8")
        dtype = t.dtype.encode("ascii")
        h.update(struct.pack("<I", len(name)) + name)
        h.update(struct.pack("<B", len(dtype)) + dtype)
        h.update(struct.pack("<B", len(t.shape)))
        h.update(b"".join(struct.pack("<Q", d) for d in t.shape))
        h.update(bytes.fromhex(t.blake3))
    return Digest(CONTENT_ALGORITHM, h.hexdigest())
