"""The client must stand alone: importing it never loads the server stack or torch."""

from __future__ import annotations

import json
import subprocess
import sys


def test_client_imports_no_server_modules() -> None:
    code = (
        "import json, sys\n"
        "import modelhash, modelhash.fingerprint, modelhash.errors, modelhash._cli\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout))
    for forbidden in ("registry", "fastapi", "sqlmodel", "sqlalchemy", "alembic", "torch", "uvicorn"):
        assert forbidden not in loaded, forbidden


def test_exact_fingerprint_run_loads_no_heavy_modules(tmp_path) -> None:
    """A scripted ``fingerprint --layers exact`` pays no start-up for numpy, pydantic or httpx.

    Start-up is a real share of an upload hook's cost per file (about half of it,
    measured, for small files), so the lazy imports are guarded here.
    """
    import numpy as np
    from safetensors.numpy import save_file

    path = tmp_path / "m.safetensors"
    save_file({"w": np.ones((4, 4), dtype=np.float16)}, str(path))
    code = (
        "import json, sys\n"
        "from modelhash._cli import main\n"
        f"sys.argv = ['modelhash', 'fingerprint', '--json', '--layers', 'exact', {str(path)!r}]\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "print(json.dumps(sorted(sys.modules)), file=sys.stderr)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)  # the fingerprint itself was printed
    loaded = set(json.loads(out.stderr.strip().splitlines()[-1]))
    for heavy in ("numpy", "rich", "pydantic", "httpx", "huggingface_hub"):
        assert heavy not in loaded, heavy
