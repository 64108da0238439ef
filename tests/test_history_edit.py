"""Editing stored conversations through the API: truncating from a message (edit and resend),
alternatives of the last reply (regenerate) and importing an export, each owner-checked."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from service.web import create_app
from service.web.conversations import COOKIE


@pytest.fixture
def settings(settings, history_database):
    """Every test here twice: history in SQLite (the default) and in PostgreSQL."""
    return replace(settings, database_url=history_database)


@pytest.fixture
def app(settings, scripted):
    return create_app(settings, engine=scripted("Stored reply.", delay=0.0))


def browser(app):
    client = app.test_client()
    client.get("/")
    assert client.get_cookie(COOKIE) is not None
    return client


def chat(client, questions: list[str]) -> str:
    cid = client.post("/api/conversations", json={}).json["id"]
    for q in questions:
        assert client.post("/api/chat", json={"conversation_id": cid, "message": q}).status_code == 200
    return cid


def contents(client, cid: str) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in client.get(f"/api/conversations/{cid}").json["messages"]]


def test_truncate_drops_the_message_and_what_followed(app):
    client = browser(app)
    cid = chat(client, ["one", "two", "three"])
    r = client.post(f"/api/conversations/{cid}/truncate", json={"from": 2})
    assert r.status_code == 200
    assert [(m["role"], m["content"]) for m in r.json["messages"]] == [
        ("user", "one"),
        ("assistant", "Stored reply."),
    ]
    assert contents(client, cid) == [("user", "one"), ("assistant", "Stored reply.")]
    # The edited question continues the truncated chat, with only the kept turns as context.
    client.post("/api/chat", json={"conversation_id": cid, "message": "two, edited"})
    assert [c for _, c in contents(client, cid)] == ["one", "Stored reply.", "two, edited", "Stored reply."]


@pytest.mark.parametrize(
    "body",
    [{"from": 99}, {"from": -1}, {"from": "1"}, {"from": True}, {}, {"from": 0, "extra": 1}, [0]],
)
def test_truncate_refuses_bad_positions_and_keeps_everything(app, body):
    client = browser(app)
    cid = chat(client, ["one"])
    r = client.post(f"/api/conversations/{cid}/truncate", json=body)
    assert r.status_code == 422 and r.json["error"]["message"]
    assert len(contents(client, cid)) == 2


def test_edits_are_owner_checked(app):
    alice, mallory = browser(app), browser(app)
    cid = chat(alice, ["secret"])
    assert mallory.post(f"/api/conversations/{cid}/truncate", json={"from": 0}).status_code == 404
    r = mallory.post(f"/api/conversations/{cid}/alternatives", json={"content": "pwned"})
    assert r.status_code == 404
    assert mallory.patch(f"/api/conversations/{cid}/messages/1", json={"shown": 0}).status_code == 404
    assert contents(alice, cid) == [("user", "secret"), ("assistant", "Stored reply.")]


def test_regenerated_replies_are_alternatives_that_a_reload_pages_through(app):
    client = browser(app)
    cid = chat(client, ["question"])
    r = client.post(
        f"/api/conversations/{cid}/alternatives",
        json={"content": "Second try.", "status": "stop", "meta": {"model": "m"}},
    )
    assert r.status_code == 201
    last = r.json["messages"][-1]
    assert last["content"] == "Second try." and last["meta"]["shown"] == 1
    assert [v["content"] for v in last["meta"]["alternatives"]] == ["Stored reply.", "Second try."]
    assert r.json["message_count"] == 2  # a version, not a new message

    # Paging back makes the first version the one shown and the one the chat continues from.
    back = client.patch(f"/api/conversations/{cid}/messages/1", json={"shown": 0}).json["messages"][-1]
    assert back["content"] == "Stored reply." and back["meta"]["shown"] == 0
    assert back["meta"]["usage"]["completion_tokens"] > 0  # its own numbers came back with it
    third = client.post(f"/api/conversations/{cid}/alternatives", json={"content": "Third."}).json
    assert [v["content"] for v in third["messages"][-1]["meta"]["alternatives"]] == [
        "Stored reply.",
        "Second try.",
        "Third.",
    ]
    assert client.patch(f"/api/conversations/{cid}/messages/1", json={"shown": 3}).status_code == 422
    assert client.patch(f"/api/conversations/{cid}/messages/0", json={"shown": 0}).status_code == 422


def test_an_alternative_needs_a_last_reply(app):
    client = browser(app)
    cid = client.post("/api/conversations", json={}).json["id"]
    assert client.post(f"/api/conversations/{cid}/alternatives", json={"content": "x"}).status_code == 422
    cid = chat(client, ["q"])
    bad = client.post(f"/api/conversations/{cid}/alternatives", json={"content": "x", "status": "complete"})
    assert bad.status_code == 422


def test_import_an_export_as_a_new_conversation_of_the_caller(app):
    alice, bob = browser(app), browser(app)
    cid = chat(alice, ["first question", "second"])
    exported = alice.get(f"/api/conversations/{cid}/export").json
    r = bob.post("/api/conversations/import", json=exported)
    assert r.status_code == 201
    copy = r.json
    assert copy["id"] != cid and copy["title"] == "first question" and copy["message_count"] == 4
    assert [(m["role"], m["content"], m["status"]) for m in copy["messages"]] == [
        (m["role"], m["content"], m["status"]) for m in exported["messages"]
    ]
    assert [c["id"] for c in bob.get("/api/conversations").json["data"]] == [copy["id"]]
    assert alice.get(f"/api/conversations/{copy['id']}").status_code == 404
    # The copy goes on like any chat.
    assert bob.post("/api/chat", json={"conversation_id": copy["id"], "message": "third"}).status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        {"messages": []},
        {"title": "", "messages": []},
        {"title": "t", "messages": [{"role": "tool", "content": "x"}]},
        {"title": "t", "messages": [{"role": "user"}]},
        {"title": "t", "messages": [{"role": "user", "content": 5}]},
        {"title": "t", "messages": [{"role": "user", "content": "x", "status": "weird"}]},
        {"title": "t", "messages": [{"role": "user", "content": "x", "evil": 1}]},
        {"title": "t", "messages": [{"role": "user", "content": "a\x00b"}]},
        {"title": "t", "messages": "nope"},
        {"title": "t", "messages": [], "owner": "browser:someone-else"},
        {"title": "t", "messages": [{"role": "user", "content": "x"}] * 2001},
        ["not", "an", "object"],
    ],
)
def test_import_refuses_what_is_not_an_export(app, body):
    client = browser(app)
    r = client.post("/api/conversations/import", json=body)
    assert r.status_code == 422, r.json
    assert r.json["error"]["message"]
    assert client.get("/api/conversations").json["data"] == []


def test_import_refuses_numbers_json_does_not_have(app):
    """Python's parser reads Infinity and NaN; JSON has neither, and a stored Infinity made every
    later listing unreadable to a browser's JSON.parse."""
    client = browser(app)
    for constant in ("Infinity", "NaN", "-Infinity", "1e999"):
        body = (
            '{"title": "t", "messages": [{"role": "user", "content": "x", "created_at": ' + constant + "}]}"
        )
        r = client.post("/api/conversations/import", data=body, content_type="application/json")
        assert r.status_code == 400 and "not valid JSON" in r.json["error"]["message"]
    assert client.get("/api/conversations").json["data"] == []


def test_import_size_and_media_type(app, settings):
    client = browser(app)
    big = {"title": "t", "messages": [{"role": "user", "content": "x" * (settings.max_body_bytes + 10)}]}
    assert client.post("/api/conversations/import", json=big).status_code == 413
    r = client.post("/api/conversations/import", data="{", content_type="application/json")
    assert r.status_code == 400
    r = client.post("/api/conversations/import", data="title=x", content_type="text/plain")
    assert r.status_code == 415
    assert client.get("/api/conversations").json["data"] == []


def test_an_import_is_held_to_the_shapes_this_service_stores(app):
    """An import is validated as the API's own writes are: a meta with `images: 5`, `true`, a picture
    reference without `mime`, another type than a picture's, malformed versions, or nesting 500 deep
    is refused whole (each of them used to make every later request of the conversation a 500)."""
    client = browser(app)
    image = {"id": "a" * 64, "mime": "image/png", "width": 2, "height": 2}
    for meta in (
        {"images": 5},
        {"images": True},
        {"images": [{k: v for k, v in image.items() if k != "mime"}]},
        {"images": [{**image, "mime": "text/html"}]},
        {"alternatives": [{"content": 5}, "x", {"content": "kept", "status": "stop"}], "shown": 9},
        {"anything": "else"},
        "DEEP",
    ):
        turn = {"role": "user", "content": "q", "meta": meta}
        text = json.dumps({"title": "odd", "messages": [turn, {"role": "assistant", "content": "a"}]})
        text = text.replace('"DEEP"', '{"model": "m", "usage": ' + '{"x": ' * 500 + "1" + "}" * 501)
        r = client.post("/api/conversations/import", data=text, content_type="application/json")
        assert r.status_code == 422, (meta, r.json)
    assert client.get("/api/conversations").json["data"] == []
    good = {"alternatives": [{"content": "kept", "status": "stop"}], "shown": 0, "model": "m"}
    body = {
        "title": "fine",
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "meta": good}],
    }
    assert client.post("/api/conversations/import", json=body).status_code == 201


def test_a_meta_stored_before_imports_were_checked_never_breaks_the_conversation(app):
    """A database written by an earlier release may hold any meta: chat, truncate, regenerate, the
    image route and export still answer, and what is malformed is skipped."""
    from service.history import StoredMessage

    client = browser(app)
    owner = f"browser:{client.get_cookie(COOKIE).value}"
    odd = {
        "alternatives": [{"content": 5}, "x", {"content": "kept", "status": "stop"}],
        "shown": 9,
        "images": [5, {"id": "b" * 64}, True],
    }
    conv = app.extensions["history"].import_conversation(
        owner,
        "odd",
        [StoredMessage("user", "q", meta={"images": 5}), StoredMessage("assistant", "a", "stop", meta=odd)],
        None,
    )
    cid = conv.id
    assert client.get(f"/api/conversations/{cid}").status_code == 200
    assert client.get(f"/api/conversations/{cid}/export").status_code == 200
    assert client.get(f"/api/conversations/{cid}/images/{'b' * 64}").status_code == 404
    r = client.post(f"/api/conversations/{cid}/alternatives", json={"content": "new"})
    assert r.status_code == 201
    assert [v["content"] for v in r.json["messages"][1]["meta"]["alternatives"]] == ["kept", "new"]
    assert (
        client.patch(f"/api/conversations/{cid}/messages/1", json={"shown": 0}).json["messages"][1]["content"]
        == "kept"
    )
    assert client.post("/api/chat", json={"conversation_id": cid, "message": "more"}).status_code == 200
    assert client.post(f"/api/conversations/{cid}/truncate", json={"from": 2}).status_code == 200
    # a picture whose stored reference claims text/html is served as what its bytes are
    import hashlib
    import io

    from PIL import Image

    from service.attachments import StoredImage

    buf = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buf, "PNG")
    digest = hashlib.sha256(buf.getvalue()).hexdigest()
    ref = {"id": digest, "mime": "text/html", "width": 2, "height": 2}
    app.extensions["history"].append(
        owner,
        cid,
        StoredMessage("user", "see", meta={"images": [ref]}),
        [StoredImage(digest, "text/html", buf.getvalue())],
    )
    r = client.get(f"/api/conversations/{cid}/images/{digest}")
    assert r.status_code == 200 and r.mimetype == "image/png" and r.data == buf.getvalue()
