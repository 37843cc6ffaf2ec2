"""The client must stand alone: importing it never loads the server stack or torch."""

from __future__ import annotations

import json
import subprocess
import sys


def test_client_imports_no_server_modules() -> None:
    code = (
        "import json, sys\n"
        "import client, client.fingerprint, client.errors, client._cli\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout))
    for forbidden in ("registry", "fastapi", "sqlmodel", "sqlalchemy", "alembic", "torch", "uvicorn"):
        assert forbidden not in loaded, forbidden
