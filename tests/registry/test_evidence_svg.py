"""The evidence strip: drawn from per-block figures, escaped, and robust to odd values."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from modelhash.registry.ui.evidence import evidence_svg, top_blocks

_NS = "{http://www.w3.org/2000/svg}"


def _blocks() -> list[dict]:
    out = []
    for i in range(40):
        for part in ("attention", "mlp"):
            hit = i in (30, 31) and part == "attention"
            out.append({"component": "unet", "block": f"up_blocks_{i}", "label": f"up {i}",
                        "part": part, "tensors": 4 if hit else 0,
                        "cosine": 0.95 if hit else None, "coefficient": 1.0 if hit else None,
                        "share": 0.5 if hit else 0.0, "upload_share": 1 / 80})
    return out


def test_the_strip_is_valid_svg_with_one_cell_per_block_part():
    svg = evidence_svg(_blocks(), title="Where it sits")
    root = ET.fromstring(svg)
    assert root.tag == f"{_NS}svg" and root.get("role") == "img"
    titles = [t.text or "" for t in root.iter(f"{_NS}title")]
    scored = [t for t in titles if "cosine 0.95" in t]
    assert len(scored) == 2 and all("up_blocks_3" in t for t in scored)
    assert sum("not by the flagged delta" in t for t in titles) == 78
    assert [b["block"] for b in top_blocks(_blocks())] == ["up_blocks_30", "up_blocks_31"]


def test_hostile_figures_are_escaped_and_odd_numbers_drawn():
    blocks = [{"component": "<script>alert(1)</script>", "block": "a&b\"", "part": "evil",
               "cosine": "NaN", "coefficient": "x", "share": float("nan"), "tensors": None},
              {"component": "te1", "block": "b", "part": "mlp", "cosine": -0.5,
               "coefficient": 9e9, "share": 2.0, "tensors": 1}]
    svg = evidence_svg(blocks, title="<b>t</b>")
    assert "<script>" not in svg and "<b>" not in svg
    ET.fromstring(svg)  # still well-formed
    assert evidence_svg([], title="x") == ""
