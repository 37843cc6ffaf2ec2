"""The match evidence picture: a strip over the model's blocks, drawn as SVG on the server.

One section per component (UNet, text encoders, the LLM's layers), one column per
block in model order and one row per part (attention, MLP, other). A cell's colour
is the cosine between the upload's delta and the flagged delta on that part of that
block; the bar under each column is the block's share of the flagged delta. So a
flagged LoRA that sits in the attention of a few blocks shows as a few dark cells
in the attention row, above the tallest bars. Every cell has a tooltip with its
figures, and the page lists the top blocks as a table for screen readers.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import Any
from xml.sax.saxutils import escape, quoteattr

__all__ = ["evidence_svg", "top_blocks"]

_PARTS = ("attention", "mlp", "other")
_PART_LABEL = {"attention": "attention", "mlp": "MLP", "other": "other"}
_STOPS = (  # cosine -> colour, a sequential ramp readable in grey scale too
    (0.0, (247, 247, 247)),
    (0.1, (254, 224, 197)),
    (0.3, (248, 160, 96)),
    (0.6, (217, 72, 1)),
    (1.0, (110, 30, 4)),
)
_NEGATIVE = (198, 219, 239)
_LEFT = 118
_TOP = 28
_ROW = 24
_BAR = 30
_MAX_WIDTH = 1100


def _colour(cosine: float) -> str:
    if cosine < 0:
        r, g, b = _NEGATIVE
        return f"#{r:02x}{g:02x}{b:02x}"
    c = min(cosine, 1.0)
    for (x0, c0), (x1, c1) in pairwise(_STOPS):
        if c <= x1:
            t = (c - x0) / (x1 - x0)
            r, g, b = (round(a + (z - a) * t) for a, z in zip(c0, c1, strict=True))
            return f"#{r:02x}{g:02x}{b:02x}"
    r, g, b = _STOPS[-1][1]
    return f"#{r:02x}{g:02x}{b:02x}"


def _text_colour(cosine: float) -> str:
    return "#ffffff" if cosine >= 0.45 else "#1a1a1a"


def _float(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return 0.0
    return out if out == out else 0.0  # NaN as 0


def _sections(blocks: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """component -> block -> part -> figures, in the order given (model order)."""
    out: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for b in blocks:
        comp = str(b.get("component") or "model")[:40]
        block = str(b.get("block") or "?")[:80]
        part = str(b.get("part") or "other")
        part = part if part in _PARTS else "other"
        out.setdefault(comp, {}).setdefault(block, {})[part] = b
    return out


def evidence_svg(blocks: Sequence[dict[str, Any]], *, title: str) -> str:
    """The SVG strip for a match's per-block figures (``evidence["blocks"]``)."""
    sections = _sections(blocks)
    if not sections:
        return ""
    widest = max(len(bs) for bs in sections.values())
    cell = max(12, min(46, (_MAX_WIDTH - _LEFT - 20) // max(widest, 1)))
    rotate = cell < 34
    parts_of = {
        comp: [p for p in _PARTS if any(p in parts for parts in bs.values())]
        for comp, bs in sections.items()
    }
    label_h = 46 if rotate else 18
    heights = {comp: 20 + _ROW * len(parts_of[comp]) + _BAR + label_h + 14 for comp in sections}
    width = max(_LEFT + cell * widest + 24, 760)
    legend_h = 44
    height = _TOP + sum(heights.values()) + legend_h
    share_max = max((_float(b.get("share")) for b in blocks), default=0.0) or 1.0
    out: list[str] = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="evidence" role="img" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'aria-label={quoteattr(title)} font-family="system-ui, sans-serif" font-size="12">',
        f"<title>{escape(title)}</title>",
        f'<text x="0" y="16" font-size="14" font-weight="600">{escape(title)}</text>',
    ]
    y = _TOP
    for comp, bs in sections.items():
        parts = parts_of[comp]
        out.append(f'<text x="0" y="{y + 14}" font-weight="600">{escape(comp)}</text>')
        y += 20
        for row, part in enumerate(parts):
            ry = y + row * _ROW
            out.append(
                f'<text x="{_LEFT - 8}" y="{ry + _ROW / 2 + 4}" text-anchor="end" '
                f'fill="#444">{_PART_LABEL[part]}</text>'
            )
        for col, (block, cells) in enumerate(bs.items()):
            x = _LEFT + col * cell
            for row, part in enumerate(parts):
                ry = y + row * _ROW
                fig = cells.get(part)
                if fig is None:
                    out.append(
                        f'<rect x="{x + 1}" y="{ry + 1}" width="{cell - 2}" height="{_ROW - 2}" '
                        f'fill="none" stroke="#e2e2e2"/>'
                    )
                    continue
                share, tensors = _float(fig.get("share")), int(_float(fig.get("tensors")))
                if fig.get("cosine") is None:
                    tip = (f"{comp} {block} {_PART_LABEL[part]}: changed by the upload, "
                           "not by the flagged delta")
                    out.append(
                        f'<g><title>{escape(tip)}</title><rect x="{x + 1}" y="{ry + 1}" '
                        f'width="{cell - 2}" height="{_ROW - 2}" rx="2" fill="#ffffff" '
                        f'stroke="#c9ced4" stroke-dasharray="3 2"/></g>'
                    )
                    continue
                cos, coef = _float(fig.get("cosine")), _float(fig.get("coefficient"))
                tip = (
                    f"{comp} {block} {_PART_LABEL[part]}: cosine {cos:.2f}, coefficient "
                    f"{coef:.2f}, {share * 100:.1f} % of the flagged delta, {tensors} tensors"
                )
                out.append(
                    f'<g><title>{escape(tip)}</title><rect x="{x + 1}" y="{ry + 1}" '
                    f'width="{cell - 2}" height="{_ROW - 2}" rx="2" fill="{_colour(cos)}" '
                    f'stroke="#bbb" stroke-width="0.5"/>'
                )
                if cell >= 34:
                    out.append(
                        f'<text x="{x + cell / 2}" y="{ry + _ROW / 2 + 4}" text-anchor="middle" '
                        f'font-size="11" fill="{_text_colour(cos)}">{cos:.2f}</text>'
                    )
                out.append("</g>")
            by = y + len(parts) * _ROW + 4
            share = sum(_float(f.get("share")) for f in cells.values())
            h = max(1.0, _BAR * share / share_max) if share > 0 else 0.0
            if h:
                out.append(
                    f'<rect x="{x + 3}" y="{by + _BAR - h:.1f}" width="{cell - 6}" '
                    f'height="{h:.1f}" fill="#5b6b7f"><title>{escape(comp)} {escape(block)}: '
                    f"{share * 100:.1f} % of the flagged delta</title></rect>"
                )
            label = escape(str(cells[next(iter(cells))].get("label") or block)[:14])
            ly = by + _BAR + 12
            if rotate:
                out.append(
                    f'<text transform="translate({x + cell / 2 + 4},{ly}) rotate(-50)" '
                    f'text-anchor="end" font-size="10" fill="#333">{label}</text>'
                )
            else:
                out.append(
                    f'<text x="{x + cell / 2}" y="{ly}" text-anchor="middle" font-size="10" '
                    f'fill="#333">{label}</text>'
                )
        out.append(
            f'<text x="{_LEFT - 8}" y="{y + len(parts) * _ROW + 4 + _BAR - 4}" '
            f'text-anchor="end" fill="#444">share</text>'
        )
        y += heights[comp] - 20
    # Legend: the colour ramp with its cosine ticks.
    ly = y + 8
    out.append(f'<text x="0" y="{ly + 12}" fill="#444">cosine with the flagged delta</text>')
    steps = 20
    for i in range(steps + 1):
        c = i / steps
        out.append(
            f'<rect x="{_LEFT + 90 + i * 12}" y="{ly + 2}" width="12" height="12" '
            f'fill="{_colour(c)}"/>'
        )
    for tick in (0.0, 0.5, 1.0):
        tx = _LEFT + 90 + tick * steps * 12 + 6
        out.append(
            f'<text x="{tx}" y="{ly + 28}" text-anchor="middle" font-size="10">{tick:.1f}</text>'
        )
    lx = _LEFT + 90 + 21 * 12 + 24
    out.append(
        f'<rect x="{lx}" y="{ly + 2}" width="12" height="12" fill="#5b6b7f"/>'
        f'<text x="{lx + 18}" y="{ly + 12}" fill="#444">share of the flagged delta</text>'
        f'<rect x="{lx}" y="{ly + 20}" width="12" height="12" fill="#fff" stroke="#c9ced4" '
        f'stroke-dasharray="3 2"/><text x="{lx + 18}" y="{ly + 30}" fill="#444">'
        f"changed by the upload only</text>"
    )
    out.append("</svg>")
    return "".join(out)


def top_blocks(blocks: Sequence[dict[str, Any]], n: int = 8) -> list[dict[str, Any]]:
    """The ``n`` block parts holding most of the flagged delta, for the figures table."""
    held = [b for b in blocks if _float(b.get("share")) > 0]
    return sorted(held, key=lambda b: -_float(b.get("share")))[:n]
