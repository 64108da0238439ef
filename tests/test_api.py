"""The HTTP contract through Flask's test client: happy paths, every kind of bad input, limits."""

from __future__ import annotations

import io
import json
import threading

import pytest
from werkzeug.test import EnvironBuilder, run_wsgi_app
from werkzeug.wrappers import Response

from service.inference.engine import Engine
from service.web import create_app
from tests.support import sse
from tests.support.engines import ScriptedBackend, ready_engine
from tests.support.live import wait_for


def test_health_ok(client, tiny_model_dir):
    r = client.get("/api/health")
    assert r.status_code == 200
    assert r.json["status"] == "ok" and r.json["model"] == tiny_model_dir.name
    assert {"active", "waiting"} <= set(r.json["queue"])


def test_health_loading_then_chat_refused_with_retry_after(settings, tiny_backend):
    release = threading.Event()
    engine = Engine(lambda: release.wait() and tiny_backend).start()
    client = create_app(settings, engine=engine).test_client()
    r = client.get("/api/health")
    assert (r.status_code, r.json["status"]) == (503, "loading")
    r = client.post("/api/chat", json={"message": "hi"})
    assert r.status_code == 503 and r.headers["Retry-After"]
    assert "loading" in r.json["error"]["message"]
    release.set()


def test_health_error_after_failed_load(settings):
    def broken():
        raise OSError("model folder not found")

    engine = Engine(broken).start()
    engine.wait_ready(5)
    r = create_app(settings, engine=engine).test_client().get("/api/health")
    assert r.status_code == 503
    assert r.json["status"] == "error" and "model folder not found" in r.json["detail"]


def test_chat_json_reply(client):
    r = client.post(
        "/api/chat",
        json={
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            "max_tokens": 5,
            "seed": 1,
        },
    )
    assert r.status_code == 200
    body = r.json
    assert body["message"]["role"] == "assistant" and isinstance(body["message"]["content"], str)
    assert body["finish_reason"] in ("stop", "length")
    assert body["usage"]["completion_tokens"] <= 5
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert set(body["timing"]) == {"queued_s", "ttft_s", "tokens_per_s", "total_s"}
    assert body["context"] == {"dropped_messages": 0}


def test_message_shorthand_equals_one_user_turn(client):
    a = client.post("/api/chat", json={"message": "Hi", "max_tokens": 8, "seed": 3}).json
    b = client.post(
        "/api/chat", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "seed": 3}
    ).json
    assert a["message"] == b["message"] and a["usage"] == b["usage"]


def test_chat_stream_events(client):
    r = client.post("/api/chat", json={"message": "Hi", "stream": True, "max_tokens": 6})
    assert r.status_code == 200
    assert r.mimetype == "text/event-stream"
    assert r.headers["X-Accel-Buffering"] == "no" and r.headers["Cache-Control"] == "no-cache"
    *deltas, done = sse.events(r.get_data())
    assert all(e["type"] == "delta" for e in deltas)
    assert done["type"] == "done" and done["finish_reason"] in ("stop", "length")
    assert done["usage"]["completion_tokens"] <= 6


def test_stream_text_matches_non_stream_text(client):
    body = {"message": "Hi", "max_tokens": 10, "temperature": 0}
    text = client.post("/api/chat", json=body).json["message"]["content"]
    streamed = client.post("/api/chat", json={**body, "stream": True})
    assert "".join(e["text"] for e in sse.events(streamed.get_data()) if e["type"] == "delta") == text


def test_stop_sequence_cuts_the_reply(settings, scripted):
    client = create_app(settings, engine=scripted("Answer: 42. END of answer")).test_client()
    r = client.post("/api/chat", json={"message": "q", "stop": ["END", "never"]})
    assert r.json["message"]["content"] == "Answer: 42. "
    assert r.json["finish_reason"] == "stop"


def test_long_conversation_drops_oldest_turns_and_says_so(client):
    system = {"role": "system", "content": "SYSTEM-PROMPT"}
    turns = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " + "word " * 400}
        for i in range(20)
    ]
    turns.append({"role": "user", "content": "the newest question"})
    r = client.post("/api/chat", json={"messages": [system, *turns], "max_tokens": 50})
    assert r.status_code == 200
    dropped = r.json["context"]["dropped_messages"]
    assert 0 < dropped < len(turns)
    assert dropped % 2 == 0  # whole user/assistant exchanges go, so a user turn comes first
    assert r.json["usage"]["prompt_tokens"] + 50 <= 4096


def test_single_message_too_long_for_context_is_413_with_limits(client):
    r = client.post("/api/chat", json={"message": "word " * 5000, "max_tokens": 100})
    assert r.status_code == 413
    msg = r.json["error"]["message"]
    assert "4096" in msg and "100" in msg
    assert r.json["error"]["type"] == "context_length_exceeded"


def test_a_newest_message_far_beyond_the_context_is_413_before_tokenizing(client):
    """900 KB cannot fit 4,096 tokens at 16 characters a token: refused on its length alone."""
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    body = {"messages": [*history, {"role": "user", "content": "x y z " * 150_000}], "max_tokens": 100}
    r = client.post("/api/chat", json=body)
    assert r.status_code == 413
    msg = r.json["error"]["message"]
    assert "900000 characters" in msg and "4096" in msg and "100" in msg
    assert r.json["error"]["type"] == "context_length_exceeded"


BAD_JSON_BODIES = [
    # (body, status, words the message must contain)
    ({}, 422, "either 'messages'"),
    ({"messages": []}, 422, "at least 1"),
    ({"messages": "hi"}, 422, "messages"),
    ({"message": ""}, 422, "blank"),
    ({"message": "   "}, 422, "blank"),
    ({"message": 42}, 422, "string"),
    ({"message": None}, 422, "either"),
    ({"message": "hi", "messages": [{"role": "user", "content": "x"}]}, 422, "either"),
    ({"messages": [{"role": "user"}]}, 422, "content"),
    ({"messages": [{"role": "user", "content": 5}]}, 422, "string"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 422, "role"),
    ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, 422, "name"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, 422, "last message"),
    ({"message": "a\x00b"}, 422, "control"),
    ({"message": "bell\x07"}, 422, "control"),
    ({"message": "hi", "max_tokens": 0}, 422, "max_tokens"),
    ({"message": "hi", "max_tokens": 10**6}, 422, "at most"),
    ({"message": "hi", "max_tokens": "10"}, 422, "max_tokens"),
    ({"message": "hi", "max_tokens": True}, 422, "max_tokens"),
    ({"message": "hi", "max_tokens": 1.5}, 422, "max_tokens"),
    ({"message": "hi", "temperature": -0.1}, 422, "temperature"),
    ({"message": "hi", "temperature": 2.5}, 422, "temperature"),
    ({"message": "hi", "top_p": 0}, 422, "top_p"),
    ({"message": "hi", "top_p": 1.5}, 422, "top_p"),
    ({"message": "hi", "seed": -1}, 422, "seed"),
    ({"message": "hi", "stream": "yes"}, 422, "stream"),
    ({"message": "hi", "temprature": 0.5}, 422, "temprature"),
    ({"message": "hi", "stop": ""}, 422, "stop"),
    ({"message": "hi", "stop": ["a", "b", "c", "d", "e"]}, 422, "stop"),
    ({"message": "hi", "stop": 3}, 422, "stop"),
    ({"message": "hi", "stop": "a\x00"}, 422, "control"),
    ({"message": "hi", "stop": ["\n", "end\x1b"]}, 422, "control"),
    ([{"role": "user", "content": "hi"}], 422, "JSON object"),
    ("hi", 422, "JSON object"),
    (None, 422, "JSON object"),
]


@pytest.mark.parametrize("body,status,words", BAD_JSON_BODIES)
def test_bad_json_bodies(client, engine, body, status, words):
    before = engine.stats()
    r = client.post("/api/chat", data=json.dumps(body), content_type="application/json")
    assert r.status_code == status
    assert r.is_json and words.lower() in r.json["error"]["message"].lower()
    assert r.json["error"]["type"]
    after = engine.stats()
    assert (after["completed"], after["cancelled"]) == (before["completed"], before["cancelled"])


@pytest.mark.parametrize(
    "data,content_type,status",
    [
        ('{"message": "hi", "temperature": NaN}', "application/json", 400),
        ('{"message": "hi", "temperature": Infinity}', "application/json", 400),
        ('{"message": "hi", "temperature": 1e999}', "application/json", 400),
        ("{not json", "application/json", 400),
        ('{"message": "hi"', "application/json", 400),
        (b"\xff\xfe\x00garbage", "application/json", 400),
        ("", "application/json", 400),
        ('{"message": "hi"}', "text/plain", 415),
        ('{"message": "hi"}', None, 415),
        ("message=hi", "application/x-www-form-urlencoded", 415),
        ("x" * 1_100_000, "application/json", 413),
    ],
)
def test_malformed_bodies(client, data, content_type, status):
    r = client.post("/api/chat", data=data, content_type=content_type)
    assert r.status_code == status
    assert r.is_json and r.json["error"]["message"]


@pytest.mark.parametrize(
    "method,path,status",
    [
        ("get", "/api/chat", 405),
        ("put", "/api/chat", 405),
        ("post", "/api/health", 405),
        ("get", "/api/nothing-here", 404),
        ("post", "/api/chat/extra", 404),
        ("get", "/static/../pyproject.toml", 404),
    ],
)
def test_unknown_paths_and_methods(client, method, path, status):
    r = getattr(client, method)(path)
    assert r.status_code == status
    assert r.is_json and r.json["error"]["message"]


def test_queue_full_is_503_with_retry_after(settings, scripted):
    engine = scripted("a b c d e f g h", delay=0.2, queue_size=1)
    client = create_app(settings, engine=engine).test_client()
    first = client.post("/api/chat", json={"message": "1", "stream": True})  # stream: returns at once
    # On the model, so the queue is empty again:
    wait_for(lambda: engine.stats()["active"] == 1, timeout=10, interval=0.01)
    second = client.post("/api/chat", json={"message": "2", "stream": True})
    third = client.post("/api/chat", json={"message": "3"})
    assert (first.status_code, second.status_code) == (200, 200)
    assert third.status_code == 503
    assert int(third.headers["Retry-After"]) >= 1
    assert third.json["error"]["type"] == "server_busy"
    first.close()
    second.close()


def test_a_failed_generation_is_a_500_json_error_and_service_goes_on(settings, tiny_backend):
    class Once(ScriptedBackend):
        failed = False

        def admit(self, *args):
            if not Once.failed:
                Once.failed = True
                raise RuntimeError("boom")
            return super().admit(*args)

    client = create_app(settings, engine=ready_engine(Once(tiny_backend.tokenizer, "ok"))).test_client()
    r = client.post("/api/chat", json={"message": "hi"})
    assert r.status_code == 500 and "boom" in r.json["error"]["message"]
    r = client.post("/api/chat", json={"message": "hi"})
    assert r.status_code == 200 and r.json["message"]["content"] == "ok"


def test_page_and_security_headers(client):
    r = client.get("/")
    assert r.status_code == 200 and r.mimetype == "text/html"
    csp = r.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    api = client.post("/api/chat", data="{", content_type="application/json")
    assert api.headers["X-Content-Type-Options"] == "nosniff"


HOSTILE_BODIES = [
    # (raw JSON text, status, words the message must contain): each was a 500 once
    ("[" * 100_000 + "]" * 100_000, 400, "not valid JSON"),
    ('{"message": ' + "[" * 500 + "]" * 500 + "}", 422, "message"),
    ('{"message": "hi \\ud800"}', 422, "surrogate"),
    ('{"messages": [{"role": "user", "content": "\\udfff"}]}', 422, "surrogate"),
    ('{"message": "hi", "stop": "\\ud800"}', 422, "surrogate"),
    ('{"message": "hi", "\\ud800": 1}', 422, "surrogate"),
]


@pytest.mark.parametrize("data,status,words", HOSTILE_BODIES)
def test_hostile_bodies_are_4xx_not_500(client, engine, data, status, words):
    before = engine.stats()["completed"]
    r = client.post("/api/chat", data=data, content_type="application/json")
    assert r.status_code == status, r.json
    assert words.lower() in r.json["error"]["message"].lower()
    assert engine.stats()["completed"] == before
    assert client.post("/api/chat", json={"message": "hi", "max_tokens": 1}).status_code == 200


@pytest.mark.parametrize("size,status", [(5_000_000, 413), (1_000_001, 413), (1_000_000, 422)])
def test_a_chunked_body_over_the_limit_is_413(client, size, status):
    """As gunicorn passes a chunked body: no Content-Length, and `wsgi.input_terminated` set."""
    prefix = b'{"message": "hi", "x": "'
    body = prefix + b"a" * (size - len(prefix) - 2) + b'"}'  # valid JSON, refused for "x" if read whole
    assert len(body) == size
    environ = EnvironBuilder("/api/chat", method="POST", content_type="application/json").get_environ()
    environ.pop("CONTENT_LENGTH", None)
    environ.update({"wsgi.input": io.BytesIO(body), "wsgi.input_terminated": True})
    r = Response(*run_wsgi_app(client.application, environ, buffered=True))
    assert r.status_code == status, r.json
    if status == 413:
        assert "larger than 1000000 bytes" in r.json["error"]["message"]
        assert "Retry-After" not in r.headers


def test_retry_after_only_on_refusals_and_equal_to_the_message(settings, scripted):
    engine = scripted("a b c d e f g h", delay=0.2, queue_size=1)
    client = create_app(settings, engine=engine).test_client()
    ok = client.post("/api/chat", json={"message": "0"})
    assert ok.status_code == 200 and "Retry-After" not in ok.headers
    first = client.post("/api/chat", json={"message": "1", "stream": True})
    wait_for(lambda: engine.stats()["active"] == 1, timeout=10, interval=0.01)
    second = client.post("/api/chat", json={"message": "2", "stream": True})
    third = client.post("/api/chat", json={"message": "3"})
    assert third.status_code == 503
    assert f"retry in {third.headers['Retry-After']} s" in third.json["error"]["message"]
    assert "Retry-After" not in client.get("/api/health").headers
    first.close()
    second.close()


def test_private_json_is_never_cached(client):
    for r in (
        client.post("/api/chat", json={"message": "hi", "max_tokens": 1}),
        client.get("/api/models"),
        client.get("/v1/models"),
        client.post("/api/conversations"),
        client.get("/api/conversations"),
        client.post("/api/chat", data="{", content_type="application/json"),
    ):
        assert r.is_json and r.headers["Cache-Control"] == "no-store", r.request.path


def test_health_names_the_model_by_its_id_never_its_folder(client, tiny_model_dir):
    r = client.get("/api/health")
    assert r.json["model"] == tiny_model_dir.name == r.json["model_id"]
    assert str(tiny_model_dir) not in r.get_data(as_text=True)


def test_v1_refuses_a_lone_surrogate_with_400(client, tiny_model_dir):
    """The official client cannot even send one (tests/test_openai.py has the rest of /v1's table)."""
    body = json.dumps({"model": tiny_model_dir.name, "messages": [{"role": "user", "content": "hi \ud800"}]})
    r = client.post("/v1/chat/completions", data=body, content_type="application/json")
    assert r.status_code == 400 and "surrogate" in r.json["error"]["message"]
    assert r.json["error"]["param"] == "messages.0.content"


def test_a_vanishing_temperature_is_greedy(client):
    """5e-324 is a valid temperature (0 <= t <= 2), and dividing the scores by it overflows: such a
    temperature samples the top token, as 0 does, instead of failing on NaN probabilities."""
    for temperature in (5e-324, 1e-30):
        r = client.post("/api/chat", json={"message": "hi", "max_tokens": 3, "temperature": temperature})
        assert r.status_code == 200, r.get_json()
        greedy = client.post("/api/chat", json={"message": "hi", "max_tokens": 3, "temperature": 0})
        assert r.get_json()["message"] == greedy.get_json()["message"]
