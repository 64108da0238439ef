"""The real production server: `python -m service` (gunicorn) on a loopback port, the tiny model.

These prove what only a real server shows: chunks leave as they are made, health is never queued
behind the model, a client that goes away frees the engine, and an overfull queue is refused.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import requests

from tests.support import sse
from tests.support.live import LiveServer, wait_for
from tests.support.slow_app import SLOW_APP

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


@pytest.fixture(scope="module")
def slow_server(tiny_model_dir, tmp_path_factory):
    """gunicorn with a scripted model writing a token every 50 ms: one at a time, two may wait."""
    with LiveServer(
        {
            "MODEL_ID": str(tiny_model_dir),
            "QUEUE_SIZE": "2",
            "MAX_BATCH": "1",
            "CONTEXT_TOKENS": "4096",
            "MAX_TOKENS_LIMIT": "4000",
            "SCRIPT_DELAY": "0.05",
        },
        tmp_path_factory.mktemp("slow-logs") / "gunicorn.log",
        app=SLOW_APP,
    ) as server:
        yield server


def send_chat(server: LiveServer, body: dict, path: str = "/api/chat", cookie: str = "") -> socket.socket:
    """A POST written by hand on a socket of our own, so the test can drop the connection at will."""
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n" + (f"Cookie: {cookie}\r\n" if cookie else "") + "\r\n"
    )
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(head.encode() + data)
    return sock


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
            except (requests.ConnectionError, requests.Timeout):  # not listening yet, or a busy CI host
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


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
def test_a_non_streaming_client_that_leaves_stops_its_generation(slow_server, path):
    """Nothing is written to a plain JSON request until the end, so only watching the socket tells
    that its client left: the generation (800 tokens, 40 s) must end within a few seconds of it."""
    wait_for(lambda: idle(slow_server))
    cancelled_before = health(slow_server)["queue"]["cancelled"]
    body = {"messages": [{"role": "user", "content": "Tell me a long story"}], "max_tokens": 800}
    if path.startswith("/v1"):
        body["model"] = requests.get(slow_server.url + "/v1/models", timeout=5).json()["data"][0]["id"]
    client = send_chat(slow_server, body, path)
    wait_for(lambda: health(slow_server)["queue"]["active"] == 1, timeout=10)
    client.close()
    left = time.monotonic()
    wait_for(lambda: idle(slow_server), timeout=5)
    assert time.monotonic() - left < 5
    assert health(slow_server)["queue"]["cancelled"] == cancelled_before + 1


def test_a_stored_reply_whose_client_left_is_marked_cancelled(slow_server):
    wait_for(lambda: idle(slow_server))
    session = requests.Session()
    conversation = session.post(slow_server.url + "/api/conversations", json={}, timeout=5).json()
    cookie = "; ".join(f"{k}={v}" for k, v in session.cookies.items())
    body = {"message": "Tell me a long story", "max_tokens": 800, "conversation_id": conversation["id"]}
    client = send_chat(slow_server, body, cookie=cookie)
    wait_for(lambda: health(slow_server)["queue"]["active"] == 1, timeout=10)
    time.sleep(0.3)  # a few words written
    client.close()
    wait_for(lambda: idle(slow_server), timeout=5)

    def stored() -> list[dict]:
        url = f"{slow_server.url}/api/conversations/{conversation['id']}"
        return session.get(url, timeout=5).json()["messages"]

    wait_for(lambda: len(stored()) == 2, timeout=5)
    question, reply = stored()
    assert question["content"] == "Tell me a long story"
    assert reply["role"] == "assistant" and reply["status"] == "cancelled"
    assert reply["content"].startswith("word")


@pytest.mark.reliability
def test_a_disconnect_storm_leaves_health_answering_and_the_queue_drained(slow_server):
    """30 clients, streaming and not, on both APIs, in three waves of ten: each starts a long
    generation (or is refused, the queue holding two) and vanishes. Health answers every probe within
    2 s throughout, the engine is idle within 10 s of the last one leaving, and a chat then completes."""
    wait_for(lambda: idle(slow_server))
    began = time.monotonic()
    model = requests.get(slow_server.url + "/v1/models", timeout=5).json()["data"][0]["id"]
    stop = threading.Event()
    probes: list[float] = []
    failures: list[str] = []

    def probe() -> None:
        while not stop.is_set() and time.monotonic() - began < 90:
            t0 = time.monotonic()
            try:
                r = requests.get(slow_server.url + "/api/health", timeout=2)
                if r.status_code != 200:
                    failures.append(f"health answered {r.status_code}")
            except requests.RequestException as exc:
                failures.append(repr(exc))
            probes.append(time.monotonic() - t0)
            time.sleep(0.1)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    seen: dict[str, int] = {}
    for wave in range(3):
        clients = []
        for i in range(10):
            stream, openai = i % 2 == 0, i % 4 >= 2
            body = {"messages": [{"role": "user", "content": f"story {wave}.{i}"}], "max_tokens": 800}
            body.update({"stream": stream, **({"model": model} if openai else {})})
            clients.append(send_chat(slow_server, body, "/v1/chat/completions" if openai else "/api/chat"))
        for client in clients:
            client.settimeout(0.5)  # a plain JSON request that was admitted says nothing until the end
            try:
                head = client.recv(64)
                status = head[9:12].decode() if head else "closed"
            except TimeoutError:
                status = "waiting"
            seen[status] = seen.get(status, 0) + 1
            client.close()
    left = time.monotonic()
    wait_for(lambda: idle(slow_server), timeout=10)
    drained = time.monotonic() - left
    wait_for(lambda: len(probes) >= 10, timeout=10)  # a fast machine can end the storm within a few probes
    stop.set()
    prober.join(5)

    assert not failures, failures[:3]
    assert len(probes) >= 10 and max(probes) < 2, (len(probes), max(probes))
    assert seen.get("503", 0) >= 3 and seen.get("200", 0) + seen.get("waiting", 0) >= 3, seen
    r = requests.post(slow_server.url + "/api/chat", json={"message": "hi", "max_tokens": 3}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert time.monotonic() - began < 60, f"the storm took {time.monotonic() - began:.0f} s"
    slowest = max(probes)
    print(f"storm: {seen}, {len(probes)} health probes, slowest {slowest:.3f} s, drained in {drained:.2f} s")
