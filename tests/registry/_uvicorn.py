"""Run the registry app under real uvicorn processes (``--factory``), as deployed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.utils.registry import stop, wait_ready


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    """A running uvicorn: its base URL and its combined output."""

    def __init__(self, proc: subprocess.Popen[bytes], base: str, log: Path) -> None:
        self.proc = proc
        self.base = base
        self.log = log

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


@contextmanager
def uvicorn(
    url: str, tmp: Path, *, workers: int = 1, env: dict[str, str] | None = None
) -> Iterator[Served]:
    """``uvicorn --factory modelhash.registry.app:create_app`` on a free port."""
    port = free_port()
    log = tmp / f"uvicorn-{port}.log"
    full = {**os.environ, "MODELHASH_DATABASE_URL": url, **(env or {})}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "modelhash.registry.app:create_app",
             "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)],
            env=full, stdout=out, stderr=subprocess.STDOUT,
        )
    served = Served(proc, f"http://127.0.0.1:{port}", log)
    try:
        wait_ready(served.base, proc, log)
        yield served
    finally:
        stop(proc)
