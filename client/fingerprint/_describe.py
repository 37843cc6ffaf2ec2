"""What a model is, from its tensor names and shapes: kind, LoRA flavour, architecture.

This is a best guess for humans and for choosing a reference base, never part of
a fingerprint. It is table-driven: :data:`LORA_PARTS` says which name endings make
a LoRA and of which flavour, :data:`KINDS` and :data:`ARCHITECTURES` are ordered
rule lists where the first match wins. Names are matched in every spelling the
ecosystem uses (``ldm`` dots, kohya underscores, diffusers and PEFT prefixes, GGUF
``blk.N``), and shapes settle what names cannot: the cross-attention width tells
SD 1.x (768) from SD 2.x (1024) and SDXL (2048, refiner 1280). Metadata is
attacker-controlled, so GGUF's ``general.architecture`` is only a hint: it is used
when the tensor names agree with it, and only values from a fixed table come out.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from modelhash.fingerprint._model import numel
from modelhash.fingerprint._result import ModelDescription

__all__ = ["ARCHITECTURES", "KINDS", "LORA_PARTS", "describe"]

# A file with at least this many tensors is a checkpoint even if we cannot name it.
MIN_CHECKPOINT_TENSORS = 16
# Textual-inversion files hold one tensor per text encoder, rarely more.
MAX_EMBEDDING_TENSORS = 4
_B = r"(?:^|[./_])"


@dataclass(frozen=True)
class LoraPart:
    """A name ending that marks a tensor as part of a LoRA-style adapter.

    ``flavour`` is ``None`` for parts every convention shares (``alpha``);
    ``input_side`` marks the factor whose second dimension is the layer's input
    width (``lora_down``, ``lora_A``, ``hada_w1_b``), which shape rules read.
    """

    pattern: re.Pattern[str]
    flavour: str | None
    input_side: bool = False


def _part(regex: str, flavour: str | None, input_side: bool = False) -> LoraPart:
    return LoraPart(re.compile(regex), flavour, input_side)


LORA_PARTS: list[LoraPart] = [
    _part(r"\.hada_w[12]_b$", "loha", input_side=True),
    _part(r"\.hada_(w[12]_a|t[12])$", "loha"),
    _part(r"\.lokr_(w[12](_[ab])?|t[12])$", "lokr"),
    _part(r"\.lora_down\.weight$", "kohya", input_side=True),
    _part(r"\.lora_up\.weight$", "kohya"),
    _part(r"[._]lora\.down\.weight$", "diffusers", input_side=True),
    _part(r"[._]lora\.up\.weight$", "diffusers"),
    _part(r"^base_model\.model\..*\.lora_A(\.\w+)?\.weight$", "peft", input_side=True),
    _part(r"^base_model\.model\..*\.lora_B(\.\w+)?\.weight$", "peft"),
    _part(r"\.lora_A(\.\w+)?\.weight$", "diffusers", input_side=True),
    _part(r"\.lora_B(\.\w+)?\.weight$", "diffusers"),
    _part(r"_lora\d*\.down\.weight$", "xlabs", input_side=True),
    _part(r"_lora\d*\.up\.weight$", "xlabs"),
    _part(r"\.weight\.lora_a$", "gguf", input_side=True),
    _part(r"\.weight\.lora_b$", "gguf"),
    _part(r"\.(alpha|dora_scale|lora_magnitude_vector(\.\w+)?)$", None),
]
_FLAVOUR_ORDER = ["loha", "lokr", "kohya", "peft", "diffusers", "xlabs", "gguf"]

_EMBEDDING = re.compile(
    r"^(emb_params|emb_token|clip_l|clip_g|(.*\.)?string_to_(param|token)\..+)$"
)
# The tensors of a textual inversion that hold the vectors of the one text encoder.
_EMBEDDING_VECTORS = re.compile(r"^(emb_params|(.*\.)?string_to_param\..+)$")


@dataclass(frozen=True)
class Evidence:
    """Everything the rules look at, computed once per model.

    ``blob`` is every name, one per line, so a rule is a substring or a multi-line
    regex search rather than a loop. ``adapter`` is ``lora`` or ``embedding`` when
    the names say the file is one. The widths come from shapes:
    ``context_width`` is the input width of a UNet's cross-attention key
    projection, ``text_width`` that of a CLIP text encoder's query projection or a
    textual-inversion vector, ``dit_width`` that of a diffusion transformer's
    joint-attention key projection.
    """

    names: frozenset[str]
    blob: str
    adapter: str | None
    context_width: int | None
    text_width: int | None
    dit_width: int | None
    hint: str | None

    def has(self, *parts: str) -> bool:
        """True if any name contains any of ``parts``."""
        return any(p in self.blob for p in parts)

    def match(self, pattern: re.Pattern[str]) -> bool:
        """True if any name matches ``pattern`` (compiled with ``re.M``)."""
        return pattern.search(self.blob) is not None


ArchitectureRule = tuple[str, Callable[[Evidence], bool]]
KindRule = tuple[str, Callable[[Evidence, str], bool]]


def _re(regex: str) -> re.Pattern[str]:
    return re.compile(regex, re.M)


_CONTEXT = _re(_B + r"attn2[._](processor[._])?to_k(_lora)?[._]")
_TEXT_Q = _re(_B + r"text_model[._]encoder[._]layers[._]\d+[._]self_attn[._]q_proj[._]")
_DIT_K = _re(_B + r"transformer_blocks[._]\d+[._]attn[._]to_k[._]")
_GGUF_LLAMA = _re(r"^blk\.\d+\.ffn_(gate|gate_exps|gate_inp)\.")
_LLAMA = _re(_B + r"layers[._]\d+[._]self_attn[._]q_proj[._]")
_QWEN_BIAS = _re(_B + r"layers[._]\d+[._]self_attn[._]q_proj[._]bias$")
_GPT2 = _re(_B + r"h[._]\d+[._]attn[._]c_attn[._]")
_BERT = _re(_B + r"encoder[._]layer[._]\d+[._]attention[._]self[._]query[._]")
_T5 = _re(
    _B + r"(encoder|decoder)[._]block[._]\d+[._]layer[._]\d+[._](SelfAttention|EncDecAttention)"
)
_CLIP = _re(r"(text|vision)_model[._]encoder[._]layers[._]\d+[._]")
_UNET = _re(_B + r"(input_blocks|down_blocks)[._]\d+[._]")
# HunyuanVideo spells Flux's ``img_attn.qkv`` as ``img_attn_qkv``; kohya's flattened
# names cannot tell the two apart, so only the dotted spelling counts.
_HUNYUAN = _re(r"(^|[./])double_blocks\.\d+\.img_attn_qkv\.")
_VAE = _re(_B + r"decoder[._](up|up_blocks)[._]\d+[._]")

# GGUF general.architecture values we accept as a hint: what we call the
# architecture, and what the GGUF tensor names must show for the hint to be believed.
_GGUF_HINTS: dict[str, tuple[str, Callable[[Evidence], bool]]] = {
    "llama": ("llama", lambda ev: ev.match(_GGUF_LLAMA)),
    "mistral": ("mistral", lambda ev: ev.match(_GGUF_LLAMA)),
    "mistral3": ("mistral", lambda ev: ev.match(_GGUF_LLAMA)),
    "qwen2": ("qwen", lambda ev: ev.match(_GGUF_LLAMA)),
    "qwen2moe": ("qwen", lambda ev: ev.match(_GGUF_LLAMA)),
    "qwen3": ("qwen", lambda ev: ev.match(_GGUF_LLAMA)),
    "qwen3moe": ("qwen", lambda ev: ev.match(_GGUF_LLAMA)),
    "gpt2": ("gpt2", lambda ev: ev.has("attn_qkv.")),
    "bert": ("bert", lambda ev: ev.has("token_types.")),
    "t5": ("t5", lambda ev: ev.has("enc.blk.")),
    "t5encoder": ("t5", lambda ev: ev.has("enc.blk.")),
}


def _hinted(ev: Evidence, answer: str) -> bool:
    """The GGUF hint names ``answer`` and the tensor names agree with it."""
    entry = _GGUF_HINTS.get(ev.hint or "")
    return entry is not None and entry[0] == answer and entry[1](ev)


def _text_only(ev: Evidence, width: int) -> bool:
    """An adapter that touches only a text encoder of this width."""
    return ev.adapter is not None and ev.context_width is None and ev.text_width == width


ARCHITECTURES: list[ArchitectureRule] = [
    ("hunyuan-video", lambda ev: ev.match(_HUNYUAN) or ev.has("token_refiner")),
    ("auraflow", lambda ev: ev.has("joint_transformer_blocks")),
    (
        "qwen-image",
        lambda ev: (
            ev.has("transformer_blocks")
            and ev.has("img_mlp", "txt_mlp", "img_mod")
            and not ev.has("double_blocks")
        ),
    ),
    (
        "flux",
        lambda ev: (
            ev.has("double_blocks", "single_blocks", "single_transformer_blocks")
            or ev.dit_width == 3072
        ),
    ),
    ("sd3", lambda ev: ev.has("joint_blocks", "context_embedder") or ev.dit_width in (1536, 2432)),
    (
        "sdxl",
        lambda ev: (
            ev.has("conditioner.embedders.", "text_encoder_2", "lora_te2_")
            or ev.context_width in (2048, 1280)
            or (ev.has("label_emb", "add_embedding") and ev.context_width != 1024)
            or (ev.adapter == "embedding" and "clip_g" in ev.names)
        ),
    ),
    (
        "sd2",
        lambda ev: (
            ev.has("cond_stage_model.model.") or ev.context_width == 1024 or _text_only(ev, 1024)
        ),
    ),
    (
        "sd1",
        lambda ev: (
            ev.has("cond_stage_model.transformer.")
            or ev.context_width == 768
            or _text_only(ev, 768)
        ),
    ),
    ("vae", lambda ev: ev.match(_VAE)),
    ("unet", lambda ev: ev.match(_UNET)),
    ("clip", lambda ev: ev.match(_CLIP)),
    ("t5", lambda ev: ev.match(_T5) or _hinted(ev, "t5")),
    ("bert", lambda ev: ev.match(_BERT) or _hinted(ev, "bert")),
    ("gpt2", lambda ev: ev.match(_GPT2) or _hinted(ev, "gpt2")),
    ("mistral", lambda ev: _hinted(ev, "mistral")),
    ("qwen", lambda ev: _hinted(ev, "qwen") or ev.match(_QWEN_BIAS)),
    ("llama", lambda ev: _hinted(ev, "llama")),
    ("llama-like", lambda ev: ev.match(_LLAMA) or ev.match(_GGUF_LLAMA)),
]
"""Architecture rules, most specific first; the first that holds names the model."""

KINDS: list[KindRule] = [
    ("lora", lambda ev, _: ev.adapter == "lora"),
    ("embedding", lambda ev, _: ev.adapter == "embedding"),
    ("checkpoint", lambda ev, arch: len(ev.names) >= MIN_CHECKPOINT_TENSORS or arch != "unknown"),
]
"""Kind rules in order, given the evidence and the architecture; else ``other``."""


def describe(
    tensors: Sequence[tuple[str, str, tuple[int, ...]]], metadata: Mapping[str, str]
) -> ModelDescription:
    """Describe a model from its ``(name, dtype, shape)`` tensors and its metadata."""
    parts = [_lora_part(name) for name, _, _ in tensors]
    ev = _evidence(tensors, parts, metadata)
    architecture = next((a for a, test in ARCHITECTURES if test(ev)), "unknown")
    kind = next((k for k, test in KINDS if test(ev, architecture)), "other")
    return ModelDescription(
        kind=kind,
        flavour=_flavour(parts) if kind == "lora" else None,
        architecture=architecture,
        tensors=len(tensors),
        parameters=sum(numel(shape) for _, _, shape in tensors),
        dtypes=dict(Counter(dtype for _, dtype, _ in tensors)),
    )


def _lora_part(name: str) -> LoraPart | None:
    return next((p for p in LORA_PARTS if p.pattern.search(name)), None)


def _flavour(parts: Sequence[LoraPart | None]) -> str | None:
    """The most common flavour among LoRA parts; ties go to the earlier flavour."""
    counts = Counter(p.flavour for p in parts if p is not None and p.flavour is not None)
    if not counts:
        return None
    return max(counts, key=lambda f: (counts[f], -_FLAVOUR_ORDER.index(f)))


def _adapter(names: frozenset[str], parts: Sequence[LoraPart | None]) -> str | None:
    """``lora`` if most tensors are LoRA parts, ``embedding`` for a textual inversion."""
    if parts and 2 * sum(p is not None for p in parts) >= len(parts):
        return "lora"
    if 0 < len(names) <= MAX_EMBEDDING_TENSORS and all(_EMBEDDING.match(n) for n in names):
        return "embedding"
    return None


def _evidence(
    tensors: Sequence[tuple[str, str, tuple[int, ...]]],
    parts: Sequence[LoraPart | None],
    metadata: Mapping[str, str],
) -> Evidence:
    widths: dict[re.Pattern[str], int] = {}
    by_name = sorted(zip(tensors, parts, strict=True), key=lambda tp: tp[0][0])
    for (name, _, shape), part in by_name:
        input_side = name.endswith(".weight") if part is None else part.input_side
        if not input_side or len(shape) < 2:
            continue
        for pattern in (_CONTEXT, _TEXT_Q, _DIT_K):
            if pattern not in widths and pattern.search(name):
                widths[pattern] = shape[1]
    vectors = (s[-1] for (n, _, s), _ in by_name if s and _EMBEDDING_VECTORS.match(n))
    names = frozenset(name for name, _, _ in tensors)
    hint = metadata.get("general.architecture")
    return Evidence(
        names=names,
        blob="\n".join(sorted(names)),
        adapter=_adapter(names, parts),
        context_width=widths.get(_CONTEXT),
        text_width=widths.get(_TEXT_Q) or next(vectors, None),
        dit_width=widths.get(_DIT_K),
        hint=hint.strip().lower() if hint else None,
    )
