"""What the browser tests share: a headless Chromium, the app on a loopback port, and page helpers.

Playwright drives Debian's /usr/bin/chromium. Each app runs in-process on 127.0.0.1 with an engine
chosen per test: the tiny real model, or a scripted backend whose "model" says a chosen text through
the same streaming path. Test modules import the fixtures they use from here (`browser`, `serve`,
`page`); importing this module skips the importing module when Chromium or Playwright is missing
(except in CI, where that is a failure).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from werkzeug.serving import make_server

from service.config import Settings
from service.inference.engine import Engine
from service.web import create_app
from tests.conftest import free_port, ready_engine
from tests.scripted import ScriptedBackend

CHROMIUM = Path("/usr/bin/chromium")

if not CHROMIUM.exists():
    if os.environ.get("CI"):
        raise RuntimeError("CI needs /usr/bin/chromium for the browser tests (apt-get install chromium)")
    pytest.skip(
        "no /usr/bin/chromium: apt-get install chromium to run the browser tests", allow_module_level=True
    )

sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect

LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

DESKTOP = {"width": 1280, "height": 900}
PHONE = {"viewport": {"width": 390, "height": 800}, "is_mobile": True, "has_touch": True}


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS)
        yield b
        b.close()


class Served:
    """A create_app() on a loopback port, served by werkzeug's threaded server in this process."""

    def __init__(self, app):
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = make_server("127.0.0.1", self.port, app, threaded=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def engine(self) -> Engine:
        """The engine of the active model."""
        return self.app.extensions["models"].engine()

    def close(self) -> None:
        self._server.shutdown()


@pytest.fixture
def serve(settings: Settings) -> Iterator[Callable[..., Served]]:
    """Start the app on a loopback port: `serve(engine)`, or `serve(engine, settings=...)`, or
    `serve(app=create_app(...))` for an app built by the test. All are stopped after the test."""
    servers: list[Served] = []

    def start(engine: Engine | None = None, *, settings: Settings = settings, app=None) -> Served:
        s = Served(app if app is not None else create_app(settings, engine=engine))
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.close()


def watch(pg):
    """Collect console errors (a CSP violation shows up here), page errors and dialogs on `pg.problems`."""
    pg.problems = []
    pg.on("console", lambda m: m.type == "error" and pg.problems.append(m.text))
    pg.on("pageerror", lambda e: pg.problems.append(str(e)))
    pg.on("dialog", lambda d: (pg.problems.append(f"dialog: {d.message}"), d.dismiss()))
    return pg


@pytest.fixture
def page(browser) -> Iterator:
    context = browser.new_context(viewport=DESKTOP)
    yield watch(context.new_page())
    context.close()


@pytest.fixture
def phone_page(browser) -> Iterator:
    context = browser.new_context(**PHONE)
    yield watch(context.new_page())
    context.close()


def scripted_engine(tiny_backend, script: str, delay: float = 0.0, context_length: int = 4096) -> Engine:
    return ready_engine(
        ScriptedBackend(tiny_backend.tokenizer, script, delay=delay, context_length=context_length)
    )


def send(page, text: str) -> None:
    page.get_by_test_id("input").fill(text)
    page.get_by_test_id("input").press("Enter")


def last_reply(page):
    return page.locator('[data-testid="message"][data-role="assistant"]').last


def wait_ready(page) -> None:
    expect(page.get_by_test_id("status")).to_have_attribute("data-state", "ready", timeout=10_000)


def wait_reply(page, timeout: float = 10_000):
    """Wait until the newest reply has ended; return it."""
    reply = last_reply(page)
    expect(reply).to_have_attribute("data-streaming", "false", timeout=timeout)
    return reply
