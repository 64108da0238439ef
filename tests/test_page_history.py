"""The page's conversation sidebar, private mode and model menu, in a real headless Chromium.

Same setup as test_page.py (fixtures in tests/support/browser.py): the app in-process on a loopback port,
its history database under the test's tmp_path. What the page stored is checked through the API
with the page's own owner cookie (`page.request` shares the browser context's cookies).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from service.config import Settings
from service.history import StoredMessage
from service.web import create_app
from service.web.conversations import COOKIE
from tests.support.browser import expect, last_reply, send, wait_ready, wait_reply
from tests.support.engines import scripted_engine

pytestmark = pytest.mark.browser

ANSWER = "A **stored** answer."


def api(page, path: str) -> str:
    """An absolute URL on the server the page came from."""
    return f"http://{page.url.split('/')[2]}{path}"


def conversations(page) -> list[dict]:
    """This browser's conversations, asked with its own owner cookie."""
    r = page.request.get(api(page, "/api/conversations"))
    assert r.ok, r.text()
    return r.json()["data"]


def sidebar_items(page):
    return page.get_by_test_id("sidebar").get_by_test_id("conversation")


def item(page, title: str):
    title_el = page.get_by_test_id("conversation-title").get_by_text(title, exact=True)
    return sidebar_items(page).filter(has=title_el)


def messages(page, role: str | None = None):
    selector = '[data-testid="message"]' + (f'[data-role="{role}"]' if role else "")
    return page.locator(selector)


def chat_payload(page, text: str) -> dict:
    """Send `text` and return the JSON body the page posted to /api/chat."""
    with page.expect_request(lambda r: r.url.endswith("/api/chat") and r.method == "POST") as info:
        send(page, text)
    wait_reply(page)
    return info.value.post_data_json


def owner(page) -> str:
    cookie = next(c for c in page.context.cookies() if c["name"] == COOKIE)
    return f"browser:{cookie['value']}"


def real_problems(page) -> list[str]:
    """Console errors, minus the network log line Chromium writes for any 4xx answer."""
    return [p for p in page.problems if not p.startswith("Failed to load resource")]


@pytest.fixture
def app_server(serve, tiny_backend):
    return serve(scripted_engine(tiny_backend, ANSWER))


def open_page(page, server):
    page.goto(server.url)
    wait_ready(page)
    return page


def test_a_new_chat_is_stored_and_named_after_its_first_question(app_server, page):
    open_page(page, app_server)
    expect(page.get_by_test_id("sidebar")).to_be_visible()
    expect(sidebar_items(page)).to_have_count(0)

    first = chat_payload(page, "What is Docker?")
    # Only the new turn goes out, with the conversation the page created for it.
    assert first["messages"] == [{"role": "user", "content": "What is Docker?"}]
    assert re.fullmatch(r"[0-9a-f]{24}", first["conversation_id"]) and first["stream"] is True

    entry = sidebar_items(page)
    expect(entry).to_have_count(1)
    expect(entry.get_by_test_id("conversation-title")).to_have_text("What is Docker?")
    expect(entry).to_have_attribute("data-id", first["conversation_id"])
    expect(entry).to_have_class(re.compile(r"\bis-current\b"))

    # The system prompt travels with each turn; the stored turns do not.
    page.locator("#settings-toggle").click()
    page.get_by_test_id("system-prompt").fill("Be brief.")
    second = chat_payload(page, "And Podman?")
    assert second == {
        "conversation_id": first["conversation_id"],
        "stream": True,
        "max_tokens": 512,
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "And Podman?"}],
    }

    stored = conversations(page)
    assert [(c["id"], c["title"], c["message_count"]) for c in stored] == [
        (first["conversation_id"], "What is Docker?", 4)
    ]
    assert page.problems == []


def test_reload_brings_the_conversation_back(app_server, page):
    open_page(page, app_server)
    chat_payload(page, "first question")
    chat_payload(page, "second question")
    cid = sidebar_items(page).get_attribute("data-id")
    assert page.evaluate("localStorage.getItem('qwen-box.conversation')") == cid

    page.reload()
    wait_ready(page)
    expect(messages(page)).to_have_count(4)
    expect(messages(page, "user").get_by_test_id("message-body")).to_have_text(
        ["first question", "second question"]
    )
    reply = last_reply(page)
    # Rendered as the live reply was: sanitized markdown, finish state and the numbers line.
    expect(reply.locator("strong")).to_have_text("stored")
    expect(reply).to_have_attribute("data-finish", "stop")
    expect(reply.get_by_test_id("message-meta")).to_contain_text("tokens")
    expect(sidebar_items(page)).to_have_class(re.compile(r"\bis-current\b"))
    expect(page.locator("#welcome")).to_be_hidden()

    # The chat goes on in the same stored conversation.
    assert chat_payload(page, "third question")["conversation_id"] == cid
    assert conversations(page)[0]["message_count"] == 6
    assert page.problems == []


def test_a_remembered_conversation_that_is_gone_starts_fresh_silently(app_server, page):
    open_page(page, app_server)
    page.evaluate("localStorage.setItem('qwen-box.conversation', '0123456789abcdef01234567')")
    page.reload()
    wait_ready(page)
    expect(page.locator("#welcome")).to_be_visible()
    expect(messages(page)).to_have_count(0)
    page.wait_for_function("localStorage.getItem('qwen-box.conversation') === null")
    expect(page.get_by_test_id("error")).to_be_hidden()
    assert real_problems(page) == []


def test_switch_between_two_conversations(app_server, page):
    open_page(page, app_server)
    chat_payload(page, "all about apples")
    page.get_by_test_id("new-chat").click()
    expect(messages(page)).to_have_count(0)
    chat_payload(page, "all about bananas")
    expect(sidebar_items(page).get_by_test_id("conversation-title")).to_have_text(
        ["all about bananas", "all about apples"]
    )  # newest first

    item(page, "all about apples").locator(".conversation-open").click()
    expect(messages(page, "user").get_by_test_id("message-body")).to_have_text(["all about apples"])
    expect(item(page, "all about apples")).to_have_class(re.compile(r"\bis-current\b"))
    expect(item(page, "all about bananas")).not_to_have_class(re.compile(r"\bis-current\b"))
    apples = item(page, "all about apples").get_attribute("data-id")
    assert chat_payload(page, "more apples")["conversation_id"] == apples
    # The conversation just used moves to the top.
    expect(sidebar_items(page).first.get_by_test_id("conversation-title")).to_have_text("all about apples")

    item(page, "all about bananas").locator(".conversation-open").click()
    expect(messages(page, "user").get_by_test_id("message-body")).to_have_text(["all about bananas"])
    counts = {c["title"]: c["message_count"] for c in conversations(page)}
    assert counts == {"all about apples": 4, "all about bananas": 2}
    assert page.problems == []


def test_rename_in_place(app_server, page):
    open_page(page, app_server)
    chat_payload(page, "original title")
    entry = sidebar_items(page)

    entry.get_by_test_id("conversation-rename").click()
    field = entry.get_by_test_id("conversation-title-input")
    expect(field).to_be_focused()
    expect(field).to_have_value("original title")
    field.fill("never saved")
    field.press("Escape")  # cancels
    expect(entry.get_by_test_id("conversation-title")).to_have_text("original title")
    expect(messages(page)).to_have_count(2)  # Escape in the field did not touch the chat

    entry.get_by_test_id("conversation-rename").click()
    entry.get_by_test_id("conversation-title-input").fill("<b>Renamed</b> chat")
    entry.get_by_test_id("conversation-title-input").press("Enter")
    expect(entry.get_by_test_id("conversation-title")).to_have_text("<b>Renamed</b> chat")  # text, not HTML
    expect(entry.locator("b")).to_have_count(0)
    page.wait_for_function(
        "async (url) => (await (await fetch(url)).json()).data[0].title === '<b>Renamed</b> chat'",
        arg=api(page, "/api/conversations"),
    )
    page.reload()
    wait_ready(page)
    expect(sidebar_items(page).get_by_test_id("conversation-title")).to_have_text("<b>Renamed</b> chat")
    assert page.problems == []


def test_delete_asks_first(app_server, page):
    open_page(page, app_server)
    chat_payload(page, "keep me")
    page.get_by_test_id("new-chat").click()
    chat_payload(page, "delete me")
    doomed = item(page, "delete me")
    doomed_id = doomed.get_attribute("data-id")

    doomed.get_by_test_id("conversation-delete").click()
    expect(page.get_by_test_id("confirm-delete")).to_be_visible()
    doomed.get_by_test_id("cancel-delete").click()
    expect(page.get_by_test_id("confirm-delete")).to_have_count(0)
    expect(sidebar_items(page)).to_have_count(2)

    doomed.get_by_test_id("conversation-delete").click()
    page.get_by_test_id("confirm-delete").click()
    expect(sidebar_items(page)).to_have_count(1)
    expect(sidebar_items(page).get_by_test_id("conversation-title")).to_have_text("keep me")
    # It was the one on screen: the page starts a new chat, and the server no longer has it.
    expect(messages(page)).to_have_count(0)
    assert page.request.get(api(page, f"/api/conversations/{doomed_id}")).status == 404
    assert [c["title"] for c in conversations(page)] == ["keep me"]
    page.reload()
    wait_ready(page)
    expect(messages(page)).to_have_count(0)
    assert real_problems(page) == []


def test_search_filters_by_title_and_load_more_pages(app_server, page):
    open_page(page, app_server)
    for i in range(33):
        title = f"Docker question {i}" if i % 3 == 0 else f"Python question {i}"
        r = page.request.post(
            api(page, "/api/conversations"),
            data=json.dumps({"title": title}),
            headers={"Content-Type": "application/json"},
        )
        assert r.status == 201
    page.reload()
    wait_ready(page)
    expect(sidebar_items(page)).to_have_count(30)  # one page, newest first
    expect(sidebar_items(page).first.get_by_test_id("conversation-title")).to_have_text("Python question 32")
    page.get_by_test_id("load-more").click()
    expect(sidebar_items(page)).to_have_count(33)
    expect(sidebar_items(page).last.get_by_test_id("conversation-title")).to_have_text("Docker question 0")
    expect(page.get_by_test_id("load-more")).to_be_hidden()

    search = page.get_by_test_id("search")
    with page.expect_request(lambda r: "q=docker" in r.url):
        search.fill("docker")
    expect(sidebar_items(page)).to_have_count(11)
    expect(sidebar_items(page).get_by_test_id("conversation-title")).to_contain_text(["Docker question 30"])
    search.fill("zzz")
    expect(sidebar_items(page)).to_have_count(0)
    expect(page.locator("#sidebar-message")).to_contain_text("No chats match")
    search.fill("")
    expect(sidebar_items(page)).to_have_count(30)
    assert page.problems == []


def test_stored_replies_show_how_they_ended(app_server, page):
    """Each stored status is shown as the live reply showed it; stored text is as inert as live text."""
    open_page(page, app_server)
    store = app_server.app.extensions["history"]
    conv = store.create(owner(page), "Statuses")
    meta = {
        "usage": {"prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16},
        "timing": {"queued_s": 0.0, "ttft_s": 0.25, "tokens_per_s": 12.5, "total_s": 0.8},
    }
    for question, answer, status, extra in [
        ("q1", 'Plain **bold** <img src=x onerror="window.__pwned=1">', "stop", {}),
        ("q2", "cut off mid", "length", {}),
        ("q3", "half an ans", "cancelled", {}),
        ("q4", "broken", "error", {"error": "RuntimeError: boom"}),
    ]:
        store.append(owner(page), conv.id, StoredMessage("user", question))
        store.append(owner(page), conv.id, StoredMessage("assistant", answer, status, meta={**meta, **extra}))
    page.evaluate(f"localStorage.setItem('qwen-box.conversation', '{conv.id}')")
    page.reload()
    wait_ready(page)
    replies = messages(page, "assistant")
    expect(replies).to_have_count(4)
    assert [replies.nth(i).get_attribute("data-finish") for i in range(4)] == [
        "stop",
        "length",
        "cancelled",
        "error",
    ]

    ok = replies.nth(0)
    expect(ok.locator("strong")).to_have_text("bold")
    expect(ok.get_by_test_id("message-body")).to_contain_text('<img src=x onerror="window.__pwned=1">')
    assert ok.locator("img").count() == 0
    expect(ok.get_by_test_id("message-meta")).to_have_text("7 tokens · 12.5 tok/s · first token 0.25 s")
    expect(replies.nth(1).get_by_test_id("message-meta")).to_contain_text("(cut at max tokens)")
    expect(replies.nth(2).get_by_test_id("message-meta")).to_have_text("Stopped")
    expect(replies.nth(2).get_by_test_id("message-body")).to_have_text("half an ans")
    error = replies.nth(3).get_by_test_id("reply-error")
    expect(error).to_contain_text("RuntimeError: boom")
    expect(error.locator(".retry-btn")).to_have_count(0)  # an old failure is shown, not retried
    page.wait_for_timeout(200)
    assert page.evaluate("window.__pwned") is None
    assert page.problems == []


def test_stop_is_stored_as_stopped(serve, tiny_backend, page):
    server = serve(scripted_engine(tiny_backend, " ".join(f"word{i}" for i in range(300)), delay=0.02))
    open_page(page, server)
    send(page, "talk for a while")
    reply = last_reply(page)
    expect(reply.get_by_test_id("message-body")).to_contain_text("word3")
    page.keyboard.press("Escape")
    expect(reply).to_have_attribute("data-finish", "cancelled")
    expect(reply.get_by_test_id("message-meta")).to_have_text("Stopped")
    # The server stores what was sent before the client left; a reload shows it as stopped.
    page.wait_for_function(
        "async (url) => { const c = (await (await fetch(url)).json()).data[0];"
        " return c && c.message_count === 2 && c.title === 'talk for a while'; }",
        arg=api(page, "/api/conversations"),
    )
    page.reload()
    wait_ready(page)
    reply = last_reply(page)
    expect(reply).to_have_attribute("data-finish", "cancelled")
    expect(reply.get_by_test_id("message-meta")).to_have_text("Stopped")
    expect(reply.get_by_test_id("message-body")).to_contain_text("word3")
    assert page.problems == []


def test_a_refused_first_message_goes_back_into_the_box(serve, tiny_backend, page):
    server = serve(scripted_engine(tiny_backend, "unused", context_length=600))
    open_page(page, server)
    long_text = "word " * 400
    send(page, long_text)
    expect(page.get_by_test_id("error")).to_contain_text(re.compile("fit|context|long", re.I))
    assert page.get_by_test_id("input").input_value().strip() == long_text.strip()
    expect(messages(page)).to_have_count(0)
    assert real_problems(page) == []


def test_the_access_token_opens_the_sidebar(serve, tiny_backend, settings, page):
    token = "t" * 24
    server = serve(
        scripted_engine(tiny_backend, ANSWER),
        settings=Settings(**{**settings.__dict__, "access_token": token}),
    )
    open_page(page, server)
    message = page.locator("#sidebar-message")
    expect(message).to_contain_text("access token")
    send(page, "before the token")
    expect(page.get_by_test_id("error")).to_contain_text("access token")
    expect(page.get_by_test_id("access-token")).to_be_focused()  # Settings opened at the field
    assert page.get_by_test_id("input").input_value() == "before the token"

    page.get_by_test_id("access-token").fill(token)
    expect(message).to_contain_text("No chats yet")
    page.get_by_test_id("input").fill("")
    first = chat_payload(page, "with the token")
    assert "conversation_id" in first
    expect(sidebar_items(page).get_by_test_id("conversation-title")).to_have_text("with the token")
    # A reload keeps the token (this tab) and brings the conversation back.
    page.reload()
    wait_ready(page)
    expect(messages(page, "user").get_by_test_id("message-body")).to_have_text(["with the token"])
    assert real_problems(page) == []


def test_private_chat_stores_nothing(app_server, page):
    open_page(page, app_server)
    toggle = page.get_by_test_id("private-toggle")
    expect(toggle).to_be_enabled()
    toggle.check()
    first = chat_payload(page, "a secret")
    assert "conversation_id" not in first
    assert first["messages"] == [{"role": "user", "content": "a secret"}]
    second = chat_payload(page, "another secret")
    # As before history existed: the whole conversation goes with each turn.
    assert "conversation_id" not in second
    assert [m["content"] for m in second["messages"]] == ["a secret", ANSWER, "another secret"]
    expect(toggle).to_be_checked()
    expect(toggle).to_be_disabled()  # a chat is private or not from its first message on
    expect(sidebar_items(page)).to_have_count(0)
    assert conversations(page) == []
    assert page.evaluate("localStorage.getItem('qwen-box.conversation')") is None

    page.get_by_test_id("new-chat").click()  # private stays on for the next chat
    expect(toggle).to_be_checked()
    expect(toggle).to_be_enabled()
    toggle.uncheck()
    assert "conversation_id" in chat_payload(page, "this one is kept")
    expect(sidebar_items(page)).to_have_count(1)
    assert [c["title"] for c in conversations(page)] == ["this one is kept"]
    assert page.problems == []


def test_history_off_on_the_server(serve, tiny_backend, tiny_model_dir, tmp_path, page):
    data = tmp_path / "no-history"
    settings = Settings(model_id=str(tiny_model_dir), log_level="warning", history=False, data_dir=str(data))
    server = serve(scripted_engine(tiny_backend, ANSWER), settings=settings)
    open_page(page, server)
    note = page.get_by_test_id("history-off-note")
    expect(note).to_be_visible()
    expect(note).to_contain_text("History is off on this server: nothing is stored")
    toggle = page.get_by_test_id("private-toggle")
    expect(toggle).to_be_checked()
    expect(toggle).to_be_disabled()
    expect(page.get_by_test_id("search")).to_be_hidden()
    expect(sidebar_items(page)).to_have_count(0)

    first = chat_payload(page, "hello")
    second = chat_payload(page, "again")
    assert "conversation_id" not in first and "conversation_id" not in second
    assert len(second["messages"]) == 3
    page.get_by_test_id("new-chat").click()
    expect(toggle).to_be_checked()
    expect(toggle).to_be_disabled()
    assert not (data / "history.db").exists()
    assert page.problems == []  # the page never asked for conversations


def test_sidebar_is_a_drawer_at_phone_width(app_server, phone_page):
    page = open_page(phone_page, app_server)
    sidebar = page.get_by_test_id("sidebar")
    toggle = page.get_by_test_id("sidebar-toggle")
    expect(sidebar).to_be_hidden()
    expect(toggle).to_be_visible()
    chat_payload(page, "from my phone")
    page.locator("#new-chat-compact").click()
    expect(messages(page)).to_have_count(0)
    chat_payload(page, "second from my phone")

    toggle.click()
    expect(sidebar).to_be_visible()
    expect(toggle).to_have_attribute("aria-expanded", "true")
    expect(sidebar_items(page)).to_have_count(2)
    page.keyboard.press("Escape")
    expect(sidebar).to_be_hidden()

    toggle.click()
    item(page, "from my phone").locator(".conversation-open").click()
    expect(sidebar).to_be_hidden()  # choosing a chat closes the drawer
    expect(messages(page, "user").get_by_test_id("message-body")).to_have_text(["from my phone"])

    toggle.click()
    entry = item(page, "second from my phone")
    entry.get_by_test_id("conversation-delete").click()  # no hover on a phone: the buttons show
    page.get_by_test_id("confirm-delete").click()
    expect(sidebar_items(page)).to_have_count(1)
    page.mouse.click(380, 400)  # the backdrop beside the drawer
    expect(sidebar).to_be_hidden()
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    assert page.problems == []


# --- the model menu ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    from service.dev.tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-page"))


@pytest.fixture
def two_models(serve, tiny_model_dir, llama_dir, tmp_path):
    """The real model manager offering a tiny Qwen2 (loads first) and a tiny Llama."""
    missing = tmp_path / "broken-model"
    missing.mkdir()
    settings = Settings(
        model_id=str(tiny_model_dir),
        models=f"{tiny_model_dir},{llama_dir},{missing}",
        data_dir=str(tmp_path / "data"),
        log_level="warning",
    )
    app = create_app(settings)
    yield serve(app=app)
    app.extensions["models"].close()


def option_texts(page) -> list[str]:
    return page.get_by_test_id("model-select").locator("option").all_inner_texts()


def test_one_model_means_no_dropdown(app_server, page):
    open_page(page, app_server)
    expect(page.get_by_test_id("status")).to_contain_text("Ready ·")
    page.wait_for_timeout(300)
    expect(page.get_by_test_id("model-select")).to_be_hidden()


def test_an_older_server_without_the_models_api(app_server, page):
    page.route(
        "**/api/models",
        lambda route: route.fulfill(
            status=404, json={"error": {"message": "not found", "type": "not_found"}}
        ),
    )
    open_page(page, app_server)
    page.wait_for_timeout(300)
    expect(page.get_by_test_id("model-select")).to_be_hidden()
    chat_payload(page, "still works")
    expect(last_reply(page)).to_have_attribute("data-finish", "stop")


def test_switch_model_from_the_dropdown(two_models, tiny_model_dir, llama_dir, page):
    open_page(page, two_models)
    select = page.get_by_test_id("model-select")
    expect(select).to_be_visible()
    expect(select).to_have_value(tiny_model_dir.name)
    assert option_texts(page) == [
        f"{tiny_model_dir.name} · loaded",
        f"{llama_dir.name} · available",
        "broken-model · available",
    ]

    with page.expect_request(lambda r: r.url.endswith("/api/models/active")) as info:
        select.select_option(llama_dir.name)
    assert info.value.post_data_json == {"model": llama_dir.name}
    # Progress while it loads, then the new model is the active one.
    expect(page.locator("option", has_text=f"{llama_dir.name} · loaded")).to_have_count(1, timeout=30_000)
    expect(select).to_have_value(llama_dir.name)
    expect(page.get_by_test_id("model-state")).to_be_hidden()
    listing = page.request.get(api(page, "/api/models")).json()
    assert listing["active"] == llama_dir.name

    wait_ready(page)
    with page.expect_response(lambda r: r.url.endswith("/api/chat")) as answer:
        send(page, "hello llama")
    assert answer.value.ok
    wait_reply(page, timeout=30_000)
    assert page.problems == []


def test_a_model_that_fails_to_load_shows_its_error(two_models, tiny_model_dir, page):
    open_page(page, two_models)
    select = page.get_by_test_id("model-select")
    select.select_option("broken-model")
    state = page.get_by_test_id("model-state")
    expect(state).to_contain_text("broken-model failed to load", timeout=30_000)
    expect(state).to_have_attribute("data-state", "error")
    expect(page.locator("option", has_text="broken-model · failed")).to_have_count(1)
    expect(select).to_have_value(tiny_model_dir.name)  # the current model stays
    wait_ready(page)
    assert page.problems == []


def test_loading_progress_is_polled_until_the_model_is_loaded(app_server, page):
    models = [
        {
            "id": "a/one",
            "source": "a/one",
            "state": "loaded",
            "error": None,
            "params_b": 1.5,
            "context_length": 4096,
            "licence": "Apache-2.0",
        },
        {
            "id": "b/two",
            "source": "b/two",
            "state": "available",
            "error": None,
            "params_b": 3.8,
            "context_length": 4096,
            "licence": "MIT",
        },
    ]
    seen = {"polls": 0, "active": "a/one"}

    def listing(route):
        if models[1]["state"] == "loading":
            seen["polls"] += 1
            if seen["polls"] >= 3:  # loaded on the third poll after the switch
                models[0]["state"], models[1]["state"], seen["active"] = "available", "loaded", "b/two"
        route.fulfill(json={"active": seen["active"], "data": models})

    def choose(route):
        assert route.request.post_data_json == {"model": "b/two"}
        models[1]["state"] = "loading"
        route.fulfill(status=202, json={"active": "a/one", "model": "b/two", "state": "loading"})

    page.route("**/api/models", listing)
    page.route("**/api/models/active", choose)
    open_page(page, app_server)
    select = page.get_by_test_id("model-select")
    select.select_option("b/two")
    state = page.get_by_test_id("model-state")
    expect(state).to_have_attribute("data-state", "loading")
    expect(state).to_contain_text("Loading")
    expect(select).to_have_value("b/two")  # shown as chosen while it loads
    assert option_texts(page) == ["a/one · loaded", "b/two · loading…"]
    expect(page.locator("option", has_text="b/two · loaded")).to_have_count(1, timeout=10_000)
    expect(state).to_be_hidden()
    expect(select).to_have_value("b/two")
    assert seen["polls"] >= 3
    assert page.problems == []


def test_a_refused_choice_is_shown(app_server, page):
    listing = {
        "active": "a/one",
        "data": [
            {
                "id": "a/one",
                "source": "a/one",
                "state": "loaded",
                "error": None,
                "params_b": 1.5,
                "context_length": 4096,
                "licence": "Apache-2.0",
            },
            {
                "id": "b/two",
                "source": "b/two",
                "state": "available",
                "error": None,
                "params_b": None,
                "context_length": None,
                "licence": None,
            },
        ],
    }
    page.route("**/api/models", lambda route: route.fulfill(json=listing))
    page.route(
        "**/api/models/active",
        lambda route: route.fulfill(
            status=400,
            json={
                "error": {
                    "message": "the model 'b/two' is not offered here; offered: a/one",
                    "type": "invalid_request_error",
                    "param": "model",
                    "code": "model_not_found",
                }
            },
        ),
    )
    open_page(page, app_server)
    select = page.get_by_test_id("model-select")
    expect(select).to_be_visible()
    assert option_texts(page) == ["a/one · loaded", "b/two · available"]
    expect(page.get_by_test_id("status")).to_have_text("Ready")  # the dropdown names the model
    select.select_option("b/two")
    state = page.get_by_test_id("model-state")
    expect(state).to_contain_text("is not offered here")
    expect(state).to_have_attribute("data-state", "error")
    expect(select).to_have_value("a/one")
    assert real_problems(page) == []
