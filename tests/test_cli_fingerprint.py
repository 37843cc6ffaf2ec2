"""`modelhash fingerprint`: exit codes, JSON on stdout, one line per error on stderr."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from safetensors.numpy import save_file

from tests.fingerprint.conftest import tiny_state_dict


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelhash._cli", *args], capture_output=True, text=True, timeout=120
    )


def test_json_output_and_exit_zero(tmp_path: Path) -> None:
    p = tmp_path / "m.safetensors"
    save_file(tiny_state_dict(), str(p))
    out = run("fingerprint", "--json", "--tensors", str(p))
    assert out.returncode == 0, out.stderr
    (r,) = json.loads(out.stdout)["results"]
    assert r["error"] is None
    assert r["format"] == "safetensors"
    assert set(r["fingerprint"]) == {"sha256", "autov2", "autov3", "blake3", "crc32", "content"}
    assert r["content"]["algorithm"] == "content-blake3-v1"
    assert len(r["tensors"]) == 5
    assert r["model"]["tensors"] == 5


def test_bad_files_exit_two_with_one_line_each_and_good_ones_still_printed(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    save_file(tiny_state_dict(), str(good))
    (tmp_path / "trunc.safetensors").write_bytes(good.read_bytes()[:-3])
    (tmp_path / "notes.txt").write_text("hello")
    out = run("fingerprint", "--json", str(good), str(tmp_path / "trunc.safetensors"), str(tmp_path / "notes.txt"), str(tmp_path / "missing.pt"))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 3, lines
    assert all(line.startswith("modelhash: ") for line in lines)
    results = json.loads(out.stdout)["results"]
    assert [r["error"] is None for r in results] == [True, False, False, False]
    assert results[1]["error"]["kind"] == "malformed"
    assert results[2]["error"]["kind"] == "unsupported"
    # the truncated file's exact bytes are still hashed
    assert results[1]["files"][0]["sha256"]


def test_human_output(tmp_path: Path) -> None:
    p = tmp_path / "m.safetensors"
    save_file(tiny_state_dict(), str(p))
    out = run("fingerprint", str(p))
    assert out.returncode == 0
    assert "content-blake3-v1:" in out.stdout and "sha256" in out.stdout


def test_usage_error_exits_two() -> None:
    out = run("fingerprint", "--layers", "bogus", "x")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr


def test_the_invariant_layer_reports_its_products(tmp_path: Path) -> None:
    from tests.utils.invariant_models import llama

    p = tmp_path / "llama.safetensors"
    save_file(llama(1), str(p))
    out = run("fingerprint", "--json", str(p))
    assert out.returncode == 0, out.stderr
    (r,) = json.loads(out.stdout)["results"]
    # Per layer: q*k, o*v and down*up, beside the seven matrices alone.
    assert r["sketch"]["invariant"] == {"algorithm": "invariant-svals-k32-v2", "matrices": 20,
                                        "products": 6}
    human = run("fingerprint", str(p)).stdout
    assert "invariant-svals-k32-v2, 20 spectra (6 of products of two matrices)" in human
