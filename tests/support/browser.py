"""What the browser tests share: a headless Chromium, the app on a loopback port, and page helpers.

A pytest plugin (conftest.py loads it through `pytest_plugins`): its fixtures `browser`, `serve`, `page`
and `phone_page` are there for every test module by name, and test modules import the helpers
(`send`, `wait_reply`, `expect` ...) from here. Playwright drives Debian's /usr/bin/chromium. Each app
runs in-process on 127.0.0.1 with an engine chosen per test: the tiny real model, or a scripted backend
(tests/support/engines.py) whose "model" says a chosen text through the same streaming path.

Tests marked `browser` are skipped when Chromium or Playwright is missing, except that a missing
Chromium is a failure in CI.
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
from tests.support.live import free_port

CHROMIUM = Path("/usr/bin/chromium")

try:
    from playwright import sync_api
except ImportError:  # the browser tests are skipped (below); the helpers are never called
    sync_api = None  # type: ignore[assignment]
    expect = None
else:
    expect = sync_api.expect


def missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            raise pytest.UsageError(
                "CI needs /usr/bin/chromium for the browser tests (apt-get install chromium)"
            )
        return "no /usr/bin/chromium: apt-get install chromium to run the browser tests"
    if sync_api is None:
        return "could not import 'playwright.sync_api': pip install playwright"
    return None


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the selected `browser` tests where they cannot run (fail the run in CI without Chromium)."""
    chosen = [item for item in items if item.get_closest_marker("browser")]
    reason = missing() if chosen else None
    if reason:
        for item in chosen:
            item.add_marker(pytest.mark.skip(reason=reason))


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
