"""Run the atheris harness for a bounded time, when atheris is installed.

CI installs the ``fuzz`` extra when it can; elsewhere this skips, saying why.
``MODELHASH_FUZZ_SECONDS`` sets the time (default 30).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hostile.test_mutations import VALID

pytest.importorskip("atheris", reason="atheris is not installed (pip install -e '.[fuzz]')")

HARNESS = Path(__file__).with_name("fuzz_all_readers.py")


def test_fuzz_all_readers_for_a_bounded_time(tmp_path: Path) -> None:
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    for fmt, (name, make) in VALID.items():
        make(seeds / f"{fmt.replace(' ', '_').replace(',', '')}-{name}")
    seconds = int(os.environ.get("MODELHASH_FUZZ_SECONDS", "30"))
    proc = subprocess.run(
        [sys.executable, str(HARNESS), f"-max_total_time={seconds}", "-rss_limit_mb=2048",
         "-timeout=60", str(seeds)],
        capture_output=True, text=True, timeout=seconds + 120, cwd=Path(__file__).parents[2],
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
