"""Conversations through the API: ownership by cookie or token, paging, chat that is recorded."""

from __future__ import annotations

import json
from dataclasses import replace
from urllib.parse import urlsplit

import pytest

from service.config import Settings
from service.web import create_app
from service.web.conversations import COOKIE
from tests.support import sse
from tests.support.live import wait_for
from tests.support.postgres import Cuttable, fresh_schema


@pytest.fixture
def settings(settings, history_database):
    """Every test here twice: history in SQLite (the default) and in PostgreSQL."""
    return replace(settings, database_url=history_database)


@pytest.fixture
def app(settings, scripted):
    return create_app(settings, engine=scripted("Stored reply.", delay=0.0))


def browser(app):
    """A test client that, like a browser, keeps the owner cookie the service hands out."""
    client = app.test_client()
    client.get("/")
    assert client.get_cookie(COOKIE) is not None
    return client


def test_first_visit_sets_a_private_owner_cookie(app):
    r = app.test_client().get("/")
    cookie = r.headers["Set-Cookie"]
    assert cookie.startswith(f"{COOKIE}=") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    again = browser(app)
    assert "Set-Cookie" not in again.get("/").headers  # a known browser keeps its id


def test_create_chat_and_read_back(app):
    client = browser(app)
    conv = client.post("/api/conversations", json={}).json
    assert conv["title"] == "New chat" and conv["message_count"] == 0
    r = client.post("/api/chat", json={"conversation_id": conv["id"], "message": "What is Docker?"})
    assert r.status_code == 200 and r.json["message"]["content"] == "Stored reply."
    stored = client.get(f"/api/conversations/{conv['id']}").json
    assert stored["title"] == "What is Docker?"  # named after its first question
    assert [(m["role"], m["content"], m["status"]) for m in stored["messages"]] == [
        ("user", "What is Docker?", "complete"),
        ("assistant", "Stored reply.", "stop"),
    ]
    assert stored["messages"][1]["meta"]["usage"]["completion_tokens"] > 0


def test_stored_turns_are_the_context_of_the_next_turn(app):
    client = browser(app)
    cid = client.post("/api/conversations").json["id"]
    client.post("/api/chat", json={"conversation_id": cid, "message": "first question"})
    r = client.post(
        "/api/chat", json={"conversation_id": cid, "message": "second question", "max_tokens": 20}
    )
    # Prompt = template + first question + stored reply + second question.
    first_alone = client.post("/api/chat", json={"message": "first question", "max_tokens": 20})
    assert r.json["usage"]["prompt_tokens"] > first_alone.json["usage"]["prompt_tokens"] + 5
    assert client.get(f"/api/conversations/{cid}").json["message_count"] == 4


def test_streamed_reply_is_stored_and_a_cancelled_one_is_marked(settings, scripted):
    script = " ".join(["word"] * 300)
    app = create_app(settings, engine=scripted(script, delay=0.01))
    client = browser(app)
    cid = client.post("/api/conversations").json["id"]
    r = client.post("/api/chat", json={"conversation_id": cid, "message": "go", "stream": True})
    for event in sse.events(r.response):
        if event["type"] == "delta":
            break
    r.close()  # the client goes away mid-reply
    messages = client.get(f"/api/conversations/{cid}").json["messages"]
    assert [m["status"] for m in messages] == ["complete", "cancelled"]
    partial = messages[1]["content"]
    assert partial and script.startswith(partial) and len(partial) < len(script)


def test_owners_are_isolated_with_404(app):
    alice, mallory = browser(app), browser(app)
    cid = alice.post("/api/conversations", json={"title": "alice's"}).json["id"]
    for method, path, body in [
        ("get", f"/api/conversations/{cid}", None),
        ("patch", f"/api/conversations/{cid}", {"title": "stolen"}),
        ("delete", f"/api/conversations/{cid}", None),
        ("get", f"/api/conversations/{cid}/export", None),
        ("post", "/api/chat", {"conversation_id": cid, "message": "hi"}),
    ]:
        r = getattr(mallory, method)(path, json=body)
        assert r.status_code == 404, path
    assert mallory.get("/api/conversations").json["data"] == []
    assert alice.get(f"/api/conversations/{cid}").json["title"] == "alice's"


def test_api_clients_are_owned_by_their_token(settings, scripted):
    token = "owner-token-0123456789abcdef"
    app = create_app(Settings(**{**settings.__dict__, "access_token": token}), engine=scripted("ok"))
    client = app.test_client()
    auth = {"Authorization": f"Bearer {token}"}
    cid = client.post("/api/conversations", json={"title": "from a script"}, headers=auth).json["id"]
    assert client.get(f"/api/conversations/{cid}", headers=auth).status_code == 200
    # A browser is known by its own cookie, even when it holds the same token.
    assert browser(app).get(f"/api/conversations/{cid}", headers=auth).status_code == 404


def test_list_pages_newest_first_and_searches(app):
    client = browser(app)
    ids = [client.post("/api/conversations", json={"title": f"chat {i}"}).json["id"] for i in range(7)]
    first = client.get("/api/conversations?limit=3").json
    second = client.get(f"/api/conversations?limit=3&before={first['next']}").json
    third = client.get(f"/api/conversations?limit=3&before={second['next']}").json
    got = [c["id"] for page in (first, second, third) for c in page["data"]]
    assert got == list(reversed(ids)) and third["next"] is None
    assert [c["title"] for c in client.get("/api/conversations?q=chat 3").json["data"]] == ["chat 3"]


def test_rename_delete_export(app):
    client = browser(app)
    cid = client.post("/api/conversations").json["id"]
    client.post("/api/chat", json={"conversation_id": cid, "message": "hello"})
    assert client.patch(f"/api/conversations/{cid}", json={"title": "Renamed"}).json["title"] == "Renamed"
    export = client.get(f"/api/conversations/{cid}/export")
    assert "attachment" in export.headers["Content-Disposition"]
    assert json.loads(export.data)["messages"][0]["content"] == "hello"
    assert client.delete(f"/api/conversations/{cid}").status_code == 204
    assert client.get(f"/api/conversations/{cid}").status_code == 404


@pytest.mark.parametrize(
    "method,path,body,status",
    [
        ("get", "/api/conversations/not-an-id", None, 404),
        ("get", "/api/conversations/" + "0" * 24, None, 404),
        ("get", "/api/conversations?limit=0", None, 422),
        ("get", "/api/conversations?limit=abc", None, 422),
        ("get", "/api/conversations?before=garbage", None, 422),
        ("post", "/api/conversations", {"title": "x" * 201}, 422),
        ("post", "/api/conversations", {"title": 5}, 422),
        ("post", "/api/conversations", {"name": "typo"}, 422),
        ("post", "/api/chat", {"conversation_id": "../../etc", "message": "hi"}, 404),
        ("post", "/api/chat", {"conversation_id": 7, "message": "hi"}, 422),
        ("post", "/api/conversations", {"title": "x \ud800"}, 422),
        ("post", "/api/conversations", {"title": "\udfff"}, 422),
        ("post", "/api/conversations", {"title": "a\x00b"}, 422),
    ],
)
def test_bad_requests(app, method, path, body, status):
    r = getattr(browser(app), method)(path, json=body)
    assert r.status_code == status
    assert r.json["error"]["message"]


def test_bad_json_and_blank_title_on_rename(app):
    client = browser(app)
    cid = client.post("/api/conversations").json["id"]
    r = client.patch(f"/api/conversations/{cid}", data="{", content_type="application/json")
    assert r.status_code == 400
    r = client.patch(f"/api/conversations/{cid}", json={"title": "   "})
    assert r.status_code == 422
    r = client.patch(f"/api/conversations/{cid}", json={"title": "half \ud83d pair"})
    assert r.status_code == 422 and "surrogate" in r.json["error"]["message"]
    assert client.get(f"/api/conversations/{cid}").json["title"] == "New chat"


def test_private_mode_stores_nothing(settings, scripted, tmp_path):
    private = Settings(**{**settings.__dict__, "history": False, "data_dir": str(tmp_path / "nothing")})
    app = create_app(private, engine=scripted("ok"))
    client = browser(app)
    assert client.get("/api/health").json["history"] is False
    assert client.post("/api/chat", json={"message": "hi"}).status_code == 200
    r = client.post("/api/conversations")
    assert r.status_code == 404 and r.json["error"]["code"] == "history_disabled"
    assert not (tmp_path / "nothing").exists()


def test_an_unreachable_database_is_a_503_to_retry_and_health_stays_up(tiny_model_dir, tmp_path, scripted):
    """PostgreSQL gone while the service runs (a failover, a network cut): the history answers 503 with
    Retry-After and names no address or password; health, which the load balancer probes, still says
    ok (the model is fine, and taking every instance out would not bring the database back); once the
    database is back, the same app serves the history again."""
    with fresh_schema() as url:
        link = Cuttable(url)
        settings = Settings(model_id=str(tiny_model_dir), log_level="warning", database_url=link.url)
        app = create_app(settings, engine=scripted("Stored reply."))
        client = browser(app)
        assert client.get("/api/conversations").status_code == 200
        link.cut()
        r = client.get("/api/conversations")
        assert r.status_code == 503 and r.headers["Retry-After"] == "5"
        assert "unreachable" in r.json["error"]["message"]
        assert (
            urlsplit(url).password not in r.get_data(as_text=True)
            and "127.0.0.1" not in r.json["error"]["message"]
        )
        assert client.get("/api/health").status_code == 200
        link.mend()
        wait_for(lambda: client.get("/api/conversations").status_code == 200, timeout=60, interval=0.5)
        app.extensions["history"].close()
        link.cut()


def test_while_the_database_is_down_history_requests_fail_at_once(tiny_model_dir, scripted):
    """Each request used to wait the whole connect timeout for a database known to be down (20 of them
    held every server thread, and a health probe took 10 s). After one failed wait, the circuit answers
    503 at once, without asking the pool, until its retry time; then the database is tried again."""
    with fresh_schema() as url:
        link = Cuttable(url)
        settings = Settings(model_id=str(tiny_model_dir), log_level="warning", database_url=link.url)
        app = create_app(settings, engine=scripted("ok"))
        client = browser(app)
        database = app.extensions["history"]._db
        database._pool.timeout = 1  # how long the first request after the cut waits for a connection
        assert client.get("/api/conversations").status_code == 200
        link.cut()
        assert client.get("/api/conversations").status_code == 503  # waited, and opened the circuit
        asked: list[int] = []
        real = database._pool.connection
        database._pool.connection = lambda *a, **k: (asked.append(1), real(*a, **k))[1]
        for _ in range(20):
            r = client.get("/api/conversations")
            assert r.status_code == 503 and r.headers["Retry-After"] == "5"
        assert asked == []  # none of the 20 waited for a connection
        assert client.get("/api/health").status_code == 200
        link.mend()
        wait_for(lambda: client.get("/api/conversations").status_code == 200, timeout=60, interval=0.5)
        assert asked  # tried again after the retry time, and got through
        app.extensions["history"].close()
        link.cut()


def test_a_finished_reply_the_database_cannot_take_is_said_not_lost(tiny_model_dir, scripted):
    """The database goes away while a stored conversation's reply streams: the stream still ends with
    `done` (and the whole reply), after an error event saying the reply was not saved; the JSON
    answer says `saved: false`. Before, the stream was cut with neither and the reply was lost."""
    with fresh_schema() as url:
        link = Cuttable(url)
        settings = Settings(model_id=str(tiny_model_dir), log_level="warning", database_url=link.url)
        app = create_app(settings, engine=scripted("A reply that will not be kept.", delay=0.05))
        client = browser(app)
        app.extensions["history"]._db._pool.timeout = 1
        cid = client.post("/api/conversations", json={}).json["id"]
        r = client.post(
            "/api/chat", json={"conversation_id": cid, "message": "go", "stream": True}, buffered=False
        )
        events = sse.events(r.response)
        first = next(events)
        assert first["type"] == "delta"
        link.cut()  # after the question was stored, before the reply is
        rest = list(events)
        text = first["text"] + "".join(e["text"] for e in rest if e["type"] == "delta")
        assert text == "A reply that will not be kept."
        errors = [e for e in rest if e["type"] == "error"]
        assert [e["error"]["code"] for e in errors] == ["reply_not_saved"]
        assert rest[-1]["type"] == "done" and rest[-1]["saved"] is False
        link.mend()
        app.extensions["history"].close()
        link.cut()
