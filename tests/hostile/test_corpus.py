"""Every hostile case, run through the CLI in its own process (see run_corpus).

One test per class of hostile input; each builds its cases and runs them all, so a
failure lists every case of the class that went wrong.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.hostile.build_corpus import BUILDERS, build, remove_tree
from tests.hostile.run_corpus import PWNED, judge, run_case


@pytest.mark.parametrize("builder", BUILDERS, ids=[b.__name__.strip("_") for b in BUILDERS])
def test_hostile_class(tmp_path: Path, builder: object) -> None:
    PWNED.unlink(missing_ok=True)
    cases = build(tmp_path / "corpus", (builder,))  # type: ignore[arg-type]
    assert cases
    good = tmp_path / "corpus" / "good.safetensors"
    failures = []
    try:
        for case in cases:
            result = run_case(case, good)
            problems = judge(result, good)
            if problems:
                failures.append(f"{case.name}: {'; '.join(problems)}")
    finally:
        # pytest's own clean-up of old temporary folders recurses; the deep tree
        # would break it for every later run.
        remove_tree(tmp_path / "corpus")
    assert not failures, "\n".join(failures)
    assert not PWNED.exists()
