"""The real production server: `python -m service` (gunicorn) on a loopback port, the tiny model.

These prove what only a real server shows: chunks leave as they are made, health is never queued
behind the model, a client that goes away frees the engine, and an overfull queue is refused.
"""

from __future__ import annotations

import time

import requests

from tests.support import sse
from tests.support.live import LiveServer, wait_for

LONG = {"message": "Tell me a long story", "stream": True, "max_tokens": 4000}


def health(server: LiveServer) -> dict:
    r = requests.get(server.url + "/api/health", timeout=5)
    assert r.status_code == 200
    return r.json()


def open_stream(server: LiveServer, body: dict = LONG) -> requests.Response:
    r = requests.post(server.url + "/api/chat", json=body, stream=True, timeout=30)
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/event-stream")
    assert r.headers["X-Accel-Buffering"] == "no"
    return r


def idle(server: LiveServer) -> bool:
    queue = health(server)["queue"]
    return queue["active"] == 0 and queue["waiting"] == 0


def test_non_streaming_chat(live_server):
    r = requests.post(live_server.url + "/api/chat", json={"message": "Hi", "max_tokens": 5}, timeout=30)
    assert r.status_code == 200
    assert r.json()["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == 5


def test_stream_arrives_chunk_by_chunk_and_health_answers_meanwhile(live_server):
    wait_for(lambda: idle(live_server))
    response = open_stream(live_server)
    events = sse.events(response)
    first = next(events)
    assert first["type"] == "delta"
    # The first piece of text is in our hands while the model is still generating the rest:
    # the server did not hold the reply back until the end, and health was answered meanwhile.
    during = health(live_server)
    assert during["queue"]["active"] == 1
    more = [next(events) for _ in range(5)]
    assert all(e["type"] == "delta" for e in more)
    assert health(live_server)["queue"]["active"] == 1
    response.close()
    wait_for(lambda: idle(live_server))


def test_disconnect_cancels_generation_and_frees_the_engine(live_server):
    wait_for(lambda: idle(live_server))
    cancelled_before = health(live_server)["queue"]["cancelled"]
    response = open_stream(live_server)
    events = sse.events(response)
    next(events)
    response.close()  # the browser tab went away
    wait_for(lambda: idle(live_server))
    assert health(live_server)["queue"]["cancelled"] == cancelled_before + 1
    # The next request is served right away, start to finish.
    after = open_stream(live_server, {"message": "next", "stream": True, "max_tokens": 3})
    done = list(sse.events(after))[-1]
    assert done["type"] == "done" and done["usage"]["completion_tokens"] == 3


def test_overfull_queue_is_refused_with_retry_after(live_server):
    wait_for(lambda: idle(live_server))
    running = open_stream(live_server)
    wait_for(lambda: health(live_server)["queue"]["active"] == 1)
    waiting = open_stream(live_server)
    wait_for(lambda: health(live_server)["queue"]["waiting"] == 1)
    refused = requests.post(live_server.url + "/api/chat", json={"message": "one more"}, timeout=10)
    assert refused.status_code == 503
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["error"]["type"] == "server_busy"
    running.close()
    waiting.close()
    wait_for(lambda: idle(live_server))


def test_bad_input_through_the_real_server(live_server):
    r = requests.post(
        live_server.url + "/api/chat", data=b"{oops", timeout=10, headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["message"]
    r = requests.post(
        live_server.url + "/api/chat",
        data=b"x" * 2_000_000,
        timeout=10,
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 413
    assert health(live_server)["status"] == "ok"


def test_port_answers_before_the_model_is_loaded(tmp_path):
    """Health says 'loading' (503) while a model loads, and 'error' with the cause if it cannot."""
    server = LiveServer(
        {"MODEL_ID": str(tmp_path / "no-such-model"), "HF_HUB_OFFLINE": "1"}, tmp_path / "gunicorn.log"
    )
    try:
        deadline = time.monotonic() + 60
        seen = set()
        while time.monotonic() < deadline:
            try:
                r = requests.get(server.url + "/api/health", timeout=2)
            except requests.ConnectionError:
                time.sleep(0.05)
                continue
            assert r.status_code == 503
            seen.add(r.json()["status"])
            if r.json()["status"] == "error":
                assert r.json()["detail"]
                break
            time.sleep(0.05)
        assert "error" in seen
        r = requests.post(server.url + "/api/chat", json={"message": "hi"}, timeout=5)
        assert r.status_code == 503 and "failed to load" in r.json()["error"]["message"]
    finally:
        server.stop()
