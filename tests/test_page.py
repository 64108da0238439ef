"""The chat page in a real headless Chromium (Playwright driving Debian's chromium).

The app runs in-process on a loopback port with an engine chosen per test: the tiny real model, or a
scripted backend whose "model" says a chosen text through the same streaming path, so a test can
hold a reply open to press Stop or make the model answer with an HTML/script payload. The fixtures
and helpers are shared with the sidebar tests, in `tests/support/browser.py`.
"""

from __future__ import annotations

import re
import threading

import pytest

from service.inference.engine import Engine
from tests.support.browser import last_reply, send, sync_api, wait_ready
from tests.support.engines import ScriptedBackend, scripted_engine

pytestmark = pytest.mark.browser


def test_chat_with_the_real_tiny_model(serve, engine, page):
    server = serve(engine)
    page.goto(server.url)
    wait_ready(page)
    send(page, "Hello, model")
    user = page.locator('[data-testid="message"][data-role="user"]').last
    sync_api.expect(user.get_by_test_id("message-body")).to_have_text("Hello, model")
    reply = last_reply(page)
    sync_api.expect(reply).to_have_attribute("data-streaming", "false", timeout=30_000)
    assert reply.get_attribute("data-finish") in ("stop", "length")
    sync_api.expect(reply.get_by_test_id("message-meta")).to_contain_text("tok")
    assert page.get_by_test_id("input").input_value() == ""
    assert page.problems == []


def test_reply_streams_and_stop_cancels_it(serve, tiny_backend, page):
    engine = scripted_engine(tiny_backend, " ".join(f"word{i}" for i in range(400)), delay=0.02)
    server = serve(engine)
    page.goto(server.url)
    wait_ready(page)
    send(page, "Tell me everything")
    reply = last_reply(page)
    sync_api.expect(reply).to_have_attribute("data-streaming", "true")
    sync_api.expect(reply.get_by_test_id("message-body")).to_contain_text("word5")
    page.get_by_test_id("stop").click()
    sync_api.expect(reply).to_have_attribute("data-finish", "cancelled", timeout=5_000)
    partial = reply.get_by_test_id("message-body").inner_text()
    assert "word5" in partial and "word399" not in partial
    # The server noticed the closed connection and stopped the model.
    deadline = 50
    while engine.stats()["cancelled"] != 1 and deadline:
        page.wait_for_timeout(100)
        deadline -= 1
    assert engine.stats()["cancelled"] == 1
    # And the conversation goes on.
    sync_api.expect(page.get_by_test_id("send")).to_be_visible()
    assert page.problems == []


PAYLOAD = (
    'Here: <img src=x onerror="window.__pwned=1"> and <script>window.__pwned=2</script> '
    '[link](javascript:window.__pwned=3) <iframe src="/api/health"></iframe>\n\n'
    '**bold** text\n\n```python\nprint("<b>not bold</b>")\n```\n'
)


def test_html_in_model_output_is_inert(serve, tiny_backend, page):
    server = serve(scripted_engine(tiny_backend, PAYLOAD))
    page.goto(server.url)
    wait_ready(page)
    send(page, "say something dangerous")
    reply = last_reply(page)
    sync_api.expect(reply).to_have_attribute("data-finish", "stop", timeout=10_000)
    body = reply.get_by_test_id("message-body")
    text = body.inner_text()
    assert '<img src=x onerror="window.__pwned=1">' in text
    assert "<script>window.__pwned=2</script>" in text
    assert body.locator("img, script, iframe").count() == 0
    assert body.locator('a[href^="javascript"]').count() == 0
    page.wait_for_timeout(300)
    assert page.evaluate("window.__pwned") is None
    # Markdown still renders: bold, and a code block whose HTML stays text.
    assert body.locator("strong").inner_text() == "bold"
    assert body.locator("pre code").inner_text().strip() == 'print("<b>not bold</b>")'
    assert page.problems == []


def test_loading_state_then_ready(serve, tiny_backend, page):
    release = threading.Event()
    engine = Engine(lambda: release.wait() and ScriptedBackend(tiny_backend.tokenizer, "ready now")).start()
    server = serve(engine)
    page.goto(server.url)
    status = page.get_by_test_id("status")
    sync_api.expect(status).to_have_attribute("data-state", "loading")
    sync_api.expect(page.get_by_test_id("send")).to_be_disabled()
    release.set()
    sync_api.expect(status).to_have_attribute("data-state", "ready", timeout=10_000)
    send(page, "hi")
    sync_api.expect(last_reply(page).get_by_test_id("message-body")).to_have_text("ready now")


def test_errors_are_shown_and_the_text_is_kept(serve, tiny_backend, page):
    server = serve(scripted_engine(tiny_backend, "unused", context_length=600))
    page.goto(server.url)
    wait_ready(page)
    long_text = "word " * 400
    send(page, long_text)
    error = page.get_by_test_id("error")
    sync_api.expect(error).to_be_visible()
    sync_api.expect(error).to_contain_text(re.compile("fit|context|long", re.I))
    assert page.get_by_test_id("input").input_value().strip() == long_text.strip()


def test_shift_enter_adds_a_line_and_new_chat_clears(serve, tiny_backend, page):
    server = serve(scripted_engine(tiny_backend, "ok"))
    page.goto(server.url)
    wait_ready(page)
    box = page.get_by_test_id("input")
    box.type("line one")
    box.press("Shift+Enter")
    box.type("line two")
    assert box.input_value() == "line one\nline two"
    box.press("Enter")
    sync_api.expect(last_reply(page)).to_have_attribute("data-finish", "stop")
    page.get_by_test_id("new-chat").click()
    sync_api.expect(page.locator('[data-testid="message"]')).to_have_count(0)


def test_phone_width_has_no_horizontal_scroll(serve, tiny_backend, browser):
    server = serve(scripted_engine(tiny_backend, "A long reply " * 20 + "\n\n```\n" + "x" * 120 + "\n```"))
    context = browser.new_context(viewport={"width": 375, "height": 740}, is_mobile=True, has_touch=True)
    page = context.new_page()
    page.goto(server.url)
    wait_ready(page)
    send(page, "hello from a phone")
    sync_api.expect(last_reply(page)).to_have_attribute("data-finish", "stop")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    assert page.get_by_test_id("send").is_visible()
    context.close()
