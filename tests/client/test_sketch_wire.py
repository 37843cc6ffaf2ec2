"""The client sends sketches: in check items, flags and bases, in bounded requests."""

from __future__ import annotations

import secrets
from pathlib import Path

from modelhash._calls import MAX_CHECK_SKETCH_CHARS, check_batches, check_item
from modelhash._requests import base_body, flag_body
from modelhash.fingerprint import fingerprint_path
from modelhash.wire import CheckItem, decode_sketch
from tests.utils.sketch_models import base_model, lora, write


def test_a_fingerprint_with_a_sketch_sends_it(tmp_path: Path) -> None:
    (o,) = fingerprint_path(write(tmp_path, "m", base_model(3)), layers="all")
    assert o.fingerprint is not None and o.fingerprint.sketch is not None
    item = check_item(o.fingerprint)
    assert item.sketch is not None and item.parsed_sketch() is not None
    assert decode_sketch(item.sketch).tensors.keys() == o.fingerprint.sketch.tensors.keys()
    assert flag_body(o.fingerprint, "other", "high", None, None, False).sketch == item.sketch
    assert base_body(o.fingerprint, "b", None).sketch == item.sketch
    (exact,) = fingerprint_path(write(tmp_path, "m", base_model(3)), layers="exact")
    assert exact.fingerprint is not None and check_item(exact.fingerprint).sketch is None


def test_an_adapter_is_sent_with_its_sketch_as_a_flag_and_as_a_reference(tmp_path: Path) -> None:
    adapter, _ = lora(base_model(3), 4)
    (o,) = fingerprint_path(write(tmp_path, "lora", adapter), layers="all")
    assert o.fingerprint is not None and o.fingerprint.sketch is not None
    assert o.fingerprint.sketch.kind == "lora"
    sent = flag_body(o.fingerprint, "other", "high", None, None, False).sketch
    assert sent is not None
    assert base_body(o.fingerprint, "b", None).sketch == sent


def test_requests_with_sketches_are_cut_by_size(tmp_path: Path) -> None:
    (o,) = fingerprint_path(write(tmp_path, "m", base_model(5)), layers="all")
    assert o.fingerprint is not None
    sketch = check_item(o.fingerprint).sketch
    assert sketch is not None
    per = MAX_CHECK_SKETCH_CHARS // len(sketch)
    items = [CheckItem(sha256=secrets.token_hex(32), sketch=sketch) for _ in range(2 * per + 3)]
    items.insert(5, CheckItem(sha256=secrets.token_hex(32)))
    runs = check_batches(items)
    assert [i for run in runs for i in run] == items
    assert len(runs) == 3
    assert all(sum(len(i.sketch or "") for i in run) <= MAX_CHECK_SKETCH_CHARS for run in runs)
    plain = [CheckItem(sha256=secrets.token_hex(32)) for _ in range(2500)]
    assert [len(r) for r in check_batches(plain)] == [1000, 1000, 500]
