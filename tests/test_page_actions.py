"""The page's message actions (copy, regenerate with versions, edit and resend), export and import,
and its own words for errors and states, in a real headless Chromium at desktop and phone widths.

Same setup as test_page_history.py (fixtures in tests/support/browser.py). What the page stored is
read back through the API with the page's own owner cookie. The scripted model's text is changed
between turns (`say`) so that a regenerated reply differs from the first one.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import pytest

from service.inference.engine import Engine
from tests.support.browser import PHONE, expect, last_reply, send, wait_ready, wait_reply, watch
from tests.support.engines import ScriptedBackend, scripted_engine

pytestmark = pytest.mark.browser


def api(page, path: str) -> str:
    return f"http://{page.url.split('/')[2]}{path}"


def conversations(page) -> list[dict]:
    r = page.request.get(api(page, "/api/conversations"))
    assert r.ok, r.text()
    return r.json()["data"]


def stored(page, cid: str) -> dict:
    r = page.request.get(api(page, f"/api/conversations/{cid}"))
    assert r.ok, r.text()
    return r.json()


def messages(page, role: str | None = None):
    return page.locator('[data-testid="message"]' + (f'[data-role="{role}"]' if role else ""))


def real_problems(page) -> list[str]:
    return [p for p in page.problems if not p.startswith("Failed to load resource")]


def say(server, text: str) -> None:
    """What the scripted model says from the next request on."""
    server.engine.backend.script = text


def shoot(page, name: str) -> None:
    """A screenshot for the change's notes, when QWEN_BOX_SCREENS names a folder."""
    import os

    folder = os.environ.get("QWEN_BOX_SCREENS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"{name}.png"))


@pytest.fixture
def server(serve, tiny_backend):
    return serve(scripted_engine(tiny_backend, "First **answer**."))


@pytest.fixture(params=["desktop", "phone"])
def any_page(request, browser):
    """The page at desktop and at phone width."""
    options = {"viewport": {"width": 1280, "height": 900}} if request.param == "desktop" else PHONE
    context = browser.new_context(**options)
    pg = watch(context.new_page())
    pg.width_name = request.param
    yield pg
    context.close()


def open_page(page, server):
    page.goto(server.url)
    wait_ready(page)
    return page


def test_copy_puts_the_message_text_on_the_clipboard(server, browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
    page = watch(context.new_page())
    open_page(page, server)
    send(page, "Copy me, please")
    reply = wait_reply(page)
    reply.get_by_test_id("copy-message").click()
    expect(reply.get_by_test_id("copy-message")).to_have_attribute("data-copied", "true")
    assert page.evaluate("navigator.clipboard.readText()") == "First **answer**."  # the Markdown source
    messages(page, "user").get_by_test_id("copy-message").click()
    assert page.evaluate("navigator.clipboard.readText()") == "Copy me, please"
    assert page.problems == []
    context.close()


def test_regenerate_keeps_the_old_reply_as_a_version_and_a_reload_shows_both(server, any_page):
    page = open_page(any_page, server)
    send(page, "Tell me something")
    first = wait_reply(page)
    expect(first.get_by_test_id("message-body")).to_have_text("First answer.")
    cid = conversations(page)[0]["id"]

    say(server, "Second answer.")
    with page.expect_request(lambda r: r.url.endswith("/api/chat")) as asked:
        first.get_by_test_id("regenerate-message").click()
    # The question again with the stored turns before it, but not the reply being replaced.
    assert asked.value.post_data_json["messages"] == [{"role": "user", "content": "Tell me something"}]
    reply = wait_reply(page)
    expect(reply.get_by_test_id("message-body")).to_have_text("Second answer.")
    expect(messages(page)).to_have_count(2)
    expect(reply.get_by_test_id("versions-label")).to_have_text("2/2")
    page.wait_for_function(
        "id => fetch(`/api/conversations/${id}`).then(r => r.json())"
        ".then(c => c.messages[1].meta && c.messages[1].meta.alternatives && c.messages[1].meta.shown === 1)",
        arg=cid,
    )
    shoot(page, f"regenerated-2of2-{page.width_name}")

    reply.get_by_test_id("prev-message").click()
    expect(reply.get_by_test_id("message-body")).to_have_text("First answer.")
    expect(reply.get_by_test_id("versions-label")).to_have_text("1/2")
    expect(reply.get_by_test_id("prev-message")).to_be_disabled()
    page.wait_for_function(
        "id => fetch(`/api/conversations/${id}`).then(r => r.json())"
        ".then(c => c.messages[1].meta.shown === 0)",
        arg=cid,
    )
    conv = stored(page, cid)
    assert conv["message_count"] == 2
    assert conv["messages"][1]["content"] == "First **answer**."
    assert [v["content"] for v in conv["messages"][1]["meta"]["alternatives"]] == [
        "First **answer**.",
        "Second answer.",
    ]

    page.reload()
    wait_ready(page)
    reply = last_reply(page)
    expect(reply.get_by_test_id("versions-label")).to_have_text("1/2")
    expect(reply.get_by_test_id("message-body")).to_have_text("First answer.")
    reply.get_by_test_id("next-message").click()
    expect(reply.get_by_test_id("message-body")).to_have_text("Second answer.")
    # The chat goes on from the version shown.
    say(server, "Third.")
    with page.expect_request(lambda r: r.url.endswith("/api/chat")) as asked:
        send(page, "go on")
    wait_reply(page)
    assert asked.value.post_data_json["conversation_id"] == cid
    conv = stored(page, cid)
    assert [m["content"] for m in conv["messages"]] == [
        "Tell me something",
        "Second answer.",
        "go on",
        "Third.",
    ]
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    assert real_problems(page) == []


def test_regenerate_in_a_private_chat(server, page):
    open_page(page, server)
    page.get_by_test_id("private-toggle").check()
    send(page, "private question")
    wait_reply(page)
    say(server, "Private second.")
    last_reply(page).get_by_test_id("regenerate-message").click()
    reply = wait_reply(page)
    expect(reply.get_by_test_id("message-body")).to_have_text("Private second.")
    expect(reply.get_by_test_id("versions-label")).to_have_text("2/2")
    reply.get_by_test_id("prev-message").click()
    expect(reply.get_by_test_id("message-body")).to_have_text("First answer.")
    with page.expect_request(lambda r: r.url.endswith("/api/chat")) as asked:
        send(page, "next")
    wait_reply(page)
    sent = asked.value.post_data_json["messages"]
    assert [m["content"] for m in sent] == ["private question", "First **answer**.", "next"]
    assert conversations(page) == []
    assert page.problems == []


def test_only_the_last_reply_offers_regenerate(server, page):
    open_page(page, server)
    send(page, "one")
    wait_reply(page)
    send(page, "two")
    wait_reply(page)
    replies = messages(page, "assistant")
    expect(replies.nth(0).get_by_test_id("regenerate-message")).to_be_hidden()
    expect(replies.nth(1).get_by_test_id("regenerate-message")).to_be_visible()


def test_edit_an_earlier_question_truncates_there_and_resends(server, any_page):
    page = open_page(any_page, server)
    for question in ("first question", "second question", "third question"):
        send(page, question)
        wait_reply(page)
    cid = conversations(page)[0]["id"]

    second = messages(page, "user").nth(1)
    second.get_by_test_id("edit-message").click()
    box = second.get_by_test_id("edit-input")
    expect(box).to_be_focused()
    expect(box).to_have_value("second question")
    box.press("Escape")  # cancels, and leaves the chat alone
    expect(second.get_by_test_id("message-body")).to_have_text("second question")
    expect(messages(page)).to_have_count(6)

    second.get_by_test_id("edit-message").click()
    second.get_by_test_id("edit-input").fill("second question, edited")
    shoot(page, f"edit-in-place-{page.width_name}")
    say(server, "Answer to the edit.")
    with page.expect_request(lambda r: r.url.endswith("/api/chat")) as asked:
        second.get_by_test_id("edit-send").click()
    wait_reply(page)
    assert asked.value.post_data_json["messages"] == [{"role": "user", "content": "second question, edited"}]
    expect(messages(page, "user").get_by_test_id("message-body")).to_have_text(
        ["first question", "second question, edited"]
    )
    expect(messages(page)).to_have_count(4)
    conv = stored(page, cid)
    assert [(m["role"], m["content"]) for m in conv["messages"]] == [
        ("user", "first question"),
        ("assistant", "First **answer**."),
        ("user", "second question, edited"),
        ("assistant", "Answer to the edit."),
    ]
    page.reload()
    wait_ready(page)
    expect(messages(page, "user").get_by_test_id("message-body")).to_have_text(
        ["first question", "second question, edited"]
    )
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    assert real_problems(page) == []


def test_export_markdown_and_json_then_import_the_json(server, page, tmp_path):
    open_page(page, server)
    send(page, "What is <b>Docker</b>?")
    wait_reply(page)
    cid = conversations(page)[0]["id"]

    page.get_by_test_id("chat-menu").locator("summary").click()
    shoot(page, "export-menu-desktop")
    with page.expect_download() as got:
        page.get_by_test_id("export-markdown").click()
    markdown = Path(got.value.path()).read_text()
    assert got.value.suggested_filename == "what-is-b-docker-b.md"
    assert markdown.startswith("# What is <b>Docker</b>?\n")
    assert "## You\n\nWhat is <b>Docker</b>?\n\n## Assistant\n\nFirst **answer**.\n" in markdown

    page.get_by_test_id("chat-menu").locator("summary").click()
    with page.expect_download() as got:
        page.get_by_test_id("export-json").click()
    exported = json.loads(Path(got.value.path()).read_text())
    assert exported == page.request.get(api(page, f"/api/conversations/{cid}/export")).json()

    exported["title"] = "An imported chat"
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(exported))
    page.get_by_test_id("import-file").set_input_files(str(path))
    expect(page.get_by_test_id("conversation-title").first).to_have_text("An imported chat")
    expect(messages(page, "user").get_by_test_id("message-body")).to_have_text(["What is <b>Docker</b>?"])
    titles = {c["title"] for c in conversations(page)}
    assert titles == {"What is <b>Docker</b>?", "An imported chat"}

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"title": "x", "messages": [{"role": "tool", "content": "x"}]}))
    page.get_by_test_id("import-file").set_input_files(str(bad))
    expect(page.get_by_test_id("error")).to_contain_text("Couldn’t import “bad.json”")
    notjson = tmp_path / "notes.json"
    notjson.write_text("this is not json")
    page.get_by_test_id("import-file").set_input_files(str(notjson))
    expect(page.get_by_test_id("error")).to_contain_text("it is not JSON")
    assert len(conversations(page)) == 2
    assert real_problems(page) == []


def test_a_private_chat_exports_as_markdown_too(server, page):
    open_page(page, server)
    page.get_by_test_id("private-toggle").check()
    send(page, "kept on this page only")
    wait_reply(page)
    page.get_by_test_id("chat-menu").locator("summary").click()
    with page.expect_download() as got:
        page.get_by_test_id("export-markdown").click()
    markdown = Path(got.value.path()).read_text()
    assert "## You\n\nkept on this page only\n\n## Assistant\n\nFirst **answer**.\n" in markdown
    assert conversations(page) == []


def test_failed_sends_leave_no_empty_chat_in_the_sidebar(serve, tiny_backend, page):
    server = serve(scripted_engine(tiny_backend, "unused", context_length=600))
    open_page(page, server)
    long_text = "word " * 500
    for _ in range(3):
        send(page, long_text)
        expect(page.get_by_test_id("error")).to_be_visible()
        expect(page.get_by_test_id("input")).to_have_value(long_text.strip())
        page.get_by_test_id("input").fill("")
    page.wait_for_timeout(300)
    expect(page.get_by_test_id("sidebar").get_by_test_id("conversation")).to_have_count(0)
    assert conversations(page) == []
    # And a message that fits is stored as usual.
    send(page, "short")
    wait_reply(page)
    assert [c["title"] for c in conversations(page)] == ["short"]


def test_the_context_error_names_the_max_tokens_setting_which_is_capped(serve, tiny_backend, page):
    server = serve(scripted_engine(tiny_backend, "unused", context_length=600))
    open_page(page, server)
    page.locator("#settings-toggle").click()
    field = page.get_by_test_id("max-tokens")
    expect(field).to_have_attribute("max", "300")
    expect(field).to_have_value("300")  # the default 512 would leave too little of 600 for the question
    expect(page.get_by_test_id("max-tokens-hint")).to_contain_text("at most 300")
    shoot(page, "settings-max-tokens-capped-desktop")

    field.fill("5000")
    send(page, "hello")
    error = page.get_by_test_id("error")
    expect(error).to_contain_text("“Max tokens” can be at most 300")
    expect(messages(page)).to_have_count(0)  # nothing was sent

    field.fill("300")
    send(page, "word " * 400)
    expect(error).to_contain_text("“Max tokens”")
    expect(error).to_contain_text("Shorten the message")
    assert "max_tokens" not in error.inner_text()
    assert "Retry in" not in error.inner_text()  # a 413 carries the limiter's header, but waiting won't help
    shoot(page, "context-error-desktop")


def test_retry_in_appears_only_for_429_and_503(server, page):
    open_page(page, server)
    answers = iter([(413, "too long"), (503, "the model is busy"), (429, "too many requests")])

    def fulfil(route):
        status, message = next(answers)
        route.fulfill(
            status=status,
            headers={"Retry-After": "7", "Content-Type": "application/json"},
            body=json.dumps({"error": {"message": message, "type": "x", "param": None, "code": None}}),
        )

    page.route("**/api/chat", fulfil)
    page.get_by_test_id("private-toggle").check()
    error = page.get_by_test_id("error")
    send(page, "a")
    expect(error).to_contain_text("too long")
    assert "Retry in" not in error.inner_text()
    page.get_by_test_id("input").fill("")
    send(page, "b")
    expect(error).to_contain_text("the model is busy. Retry in 7 s.")
    page.get_by_test_id("input").fill("")
    wait_ready(page)
    send(page, "c")
    expect(error).to_contain_text("Retry in 7 s.")
    expect(error).to_contain_text("too many requests")


OFFLINE = (
    "OSError: We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in "
    "the cached files. Check your internet connection or see how to run the library in offline mode at "
    "'https://huggingface.co/docs/transformers/installation#offline-mode'."
)


def test_a_model_that_cannot_be_downloaded_says_why_with_the_raw_error_behind_details(serve, any_page):
    def load():
        raise OSError(OFFLINE.removeprefix("OSError: "))

    server = serve(Engine(load).start())
    page = any_page
    page.goto(server.url)
    notice = page.get_by_test_id("notice")
    expect(notice).to_contain_text(
        "cannot be downloaded: this machine has no access to the model hub. Give a local folder",
        timeout=10_000,
    )
    status = page.get_by_test_id("status")
    expect(status).to_have_text("Model failed to load")
    assert (
        "OSError" not in status.inner_text()
        and "OSError" not in page.get_by_test_id("notice-text").inner_text()
    )
    raw = page.get_by_test_id("notice-raw")
    expect(raw).to_be_hidden()
    page.get_by_test_id("notice-details").locator("summary").click()
    expect(raw).to_be_visible()
    expect(raw).to_have_text(OFFLINE)
    shoot(page, f"load-failed-details-{page.width_name}")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


def test_typing_dots_stay_until_the_first_visible_text(serve, tiny_backend, page):
    server = serve(scripted_engine(tiny_backend, "\n\n\n\n\n\nVisible text at last.", delay=0.12))
    open_page(page, server)
    # Record any moment when the streaming reply shows neither the dots nor any text.
    page.evaluate(
        """() => {
          window.__blank = 0;
          new MutationObserver(() => {
            const el = document.querySelector('[data-role="assistant"][data-streaming="true"]');
            if (!el) return;
            const body = el.querySelector('.message-body');
            if (!body.querySelector('.typing') && !body.textContent.trim()) window.__blank += 1;
          }).observe(document.getElementById('messages'),
                     {subtree: true, childList: true, characterData: true});
        }"""
    )
    send(page, "hi")
    reply = last_reply(page)
    expect(reply.locator(".typing")).to_be_visible()
    shoot(page, "typing-indicator-desktop")
    wait_reply(page)
    expect(reply.get_by_test_id("message-body")).to_have_text("Visible text at last.")
    assert page.evaluate("window.__blank") == 0


def test_escape_closes_settings(server, page):
    open_page(page, server)
    page.locator("#settings-toggle").click()
    expect(page.locator("#settings")).to_be_visible()
    page.keyboard.press("Escape")
    expect(page.locator("#settings")).to_be_hidden()
    expect(page.locator("#settings-toggle")).to_be_focused()
    expect(page.locator("#settings-toggle")).to_have_attribute("aria-expanded", "false")


def test_loading_model_is_shown_until_the_model_is_ready(serve, tiny_backend, any_page):
    release = threading.Event()
    engine = Engine(lambda: release.wait() and ScriptedBackend(tiny_backend.tokenizer, "ready now")).start()
    server = serve(engine)
    page = any_page
    page.goto(server.url)
    notice = page.get_by_test_id("notice")
    expect(notice).to_be_visible()
    expect(notice).to_contain_text("Loading model…")
    expect(page.get_by_test_id("status")).to_have_text("Loading model…")
    box = notice.bounding_box()
    assert box and box["y"] + box["height"] <= page.viewport_size["height"]  # in view, above the composer
    page.get_by_test_id("input").fill("typed while it loads")
    expect(notice).to_contain_text(re.compile(r"Loading model… \(\d+ s so far\)"), timeout=8_000)
    shoot(page, f"loading-model-{page.width_name}")
    release.set()
    expect(notice).to_be_hidden(timeout=10_000)
    page.get_by_test_id("input").press("Enter")
    expect(last_reply(page).get_by_test_id("message-body")).to_have_text("ready now")


def test_actions_at_phone_width_fit_and_are_tappable(server, phone_page):
    page = open_page(phone_page, server)
    send(page, "A phone question " * 8)
    reply = wait_reply(page)
    for testid in ("copy-message", "regenerate-message"):
        box = reply.get_by_test_id(testid).bounding_box()
        assert box and box["width"] >= 28 and box["height"] >= 28
        assert box["x"] >= 0 and box["x"] + box["width"] <= 390
    user = messages(page, "user")
    expect(user.get_by_test_id("edit-message")).to_be_visible()
    shoot(page, "actions-phone")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    page.get_by_test_id("chat-menu").locator("summary").click()
    menu = page.locator(".chat-menu-list").bounding_box()
    assert menu and menu["x"] >= 0 and menu["x"] + menu["width"] <= 390
    expect(page.get_by_test_id("export-markdown")).to_be_visible()
    shoot(page, "export-menu-phone")
    page.keyboard.press("Escape")
    expect(page.get_by_test_id("export-markdown")).to_be_hidden()
    assert re.search(r"\d+ tokens?", reply.get_by_test_id("message-meta").inner_text())
