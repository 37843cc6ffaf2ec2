"""Web UI fixtures: the real server with the demo data, and headless Chromium.

The browser is the system Chromium (the Debian package), driven by Playwright for
Python through ``executable_path``; Playwright's own browser downloads are never
used. Without Chromium or Playwright the browser tests skip and say why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from modelhash.registry._db import make_engine, session_scope
from modelhash.registry._migrations import upgrade
from modelhash.registry.crud.keys import CLI, create_key
from tests.ui.demo import Demo, seed
from tests.utils.registry import stop, wait_ready

_SCRIPT = Path(sys.executable).with_name("modelhash")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def chromium_path() -> str | None:
    """The system Chromium, or None."""
    for candidate in (os.environ.get("MODELHASH_TEST_CHROMIUM"), "/usr/bin/chromium",
                      shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


@dataclass
class UiServer:
    url: str
    keys: dict[str, str]
    demo: Demo
    db: str


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def ui_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UiServer]:
    """``modelhash serve`` on loopback with the demo registry and one key per role."""
    folder = tmp_path_factory.mktemp("ui-registry")
    db = f"sqlite:///{folder / 'registry.db'}"
    upgrade(db)
    engine = make_engine(db)
    keys = {}
    for name, role in (("reader", "reader"), ("submitter", "submitter"),
                       ("submitter2", "submitter"), ("admin", "admin")):
        with session_scope(engine) as session:
            _, keys[name] = create_key(session, role=role, name=f"demo-{name}", actor=CLI)
    engine.dispose()
    port = _free_port()
    log = folder / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELHASH_")}
    cmd = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "modelhash._cli"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*cmd, "serve", "--db", db, "--host", "127.0.0.1", "--port", str(port)],
            cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, log)
        demo = seed(url, keys, folder)
        yield UiServer(url, keys, demo, db)
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless system Chromium through Playwright; skips with the reason when unavailable.

    Module-scoped: Playwright's sync API keeps an event loop running in this thread
    while it is open, which would break ``asyncio.run`` in tests that run later.
    """
    path = chromium_path()
    if path is None:
        pytest.skip("no system Chromium (apt-get install chromium, or set MODELHASH_TEST_CHROMIUM)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright for Python is not installed (pip install playwright)")
    with sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS, headless=True)
        except Exception as exc:  # a broken browser install: say what failed
            pytest.skip(f"Chromium at {path} did not start: {str(exc).splitlines()[0]}")
        yield b
        b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(15000)
    yield pg
    context.close()


def sign_in(page: Any, server: UiServer, role: str) -> None:
    """Sign in through the form, as a person would."""
    page.goto(server.url + "/ui/login")
    page.get_by_label("API key").fill(server.keys[role])
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(server.url + "/ui/")
