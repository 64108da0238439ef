"""Several instances of the real server, as a scale set runs them: two gunicorn processes sharing one
PostgreSQL history, and HAProxy on loopback standing in for the load balancer in front of two.

What "loses no request" means here, exactly: a request the load balancer accepted whose server had not
sent it a byte of answer (its connection failed because the instance was already dead and not yet
marked down, or the instance died while the request waited or was being generated as one JSON reply)
is sent again to the other instance (`retry-on conn-failure empty-response`, `option redispatch`), so its
client gets a whole reply. A stream that had started is not replayed (its client already has part of
a reply): it ends without its `done` event, and the client asks again.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from tests.support import sse
from tests.support.haproxy import HAProxy
from tests.support.live import LiveServer, wait_for
from tests.support.postgres import fresh_schema
from tests.support.slow_app import SLOW_APP

TOKEN = "scale-test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def instance(model_dir, log_dir, name: str, **env: str) -> LiveServer:
    """One instance: the production app with a scripted model (a token every SCRIPT_DELAY s)."""
    return LiveServer(
        {
            "MODEL_ID": str(model_dir),
            "ACCESS_TOKEN": TOKEN,
            "SCRIPT_DELAY": "0.02",
            "MAX_BATCH": "4",
            "QUEUE_SIZE": "8",
            **env,
        },
        log_dir / f"{name}.log",
        app=SLOW_APP,
    )


# --- two instances, one history -------------------------------------------------------------------------
def test_two_instances_sharing_postgresql_show_each_owner_their_own_and_nothing_else(
    tiny_model_dir, tmp_path
):
    """A browser starts a chat on one instance and continues it on the other; an API client (owned by
    its token) does the same; a second browser sees neither, on either instance."""
    with fresh_schema() as url:
        with (
            instance(tiny_model_dir, tmp_path, "one", DATABASE_URL=url) as one,
            instance(tiny_model_dir, tmp_path, "two", DATABASE_URL=url) as two,
        ):
            alice = requests.Session()
            alice.headers.update(AUTH)  # the token admits; the cookie (set on first visit) owns
            alice.get(
                one.url + "/", headers={"Authorization": None}, timeout=10
            )  # the page, as a browser loads it
            assert alice.cookies.get("qwenbox_owner")
            cid = alice.post(one.url + "/api/conversations", json={}, timeout=10).json()["id"]
            chat = {"conversation_id": cid, "message": "first, on one", "max_tokens": 5}
            assert alice.post(one.url + "/api/chat", json=chat, timeout=60).status_code == 200
            chat["message"] = "second, on two"
            assert alice.post(two.url + "/api/chat", json=chat, timeout=60).status_code == 200
            for server in (one, two):
                listed = alice.get(server.url + "/api/conversations", timeout=10).json()["data"]
                assert [c["id"] for c in listed] == [cid]
                messages = alice.get(f"{server.url}/api/conversations/{cid}", timeout=10).json()["messages"]
                assert [(m["role"], m["content"]) for m in messages if m["role"] == "user"] == [
                    ("user", "first, on one"),
                    ("user", "second, on two"),
                ]
                assert len(messages) == 4

            api = requests.Session()  # no cookie: owned by the token, the same on every instance
            api.headers.update(AUTH)
            api_cid = api.post(two.url + "/api/conversations", json={"title": "by token"}, timeout=10).json()[
                "id"
            ]
            assert [c["id"] for c in api.get(one.url + "/api/conversations", timeout=10).json()["data"]] == [
                api_cid
            ]
            assert api.get(f"{one.url}/api/conversations/{cid}", timeout=10).status_code == 404

            bob = requests.Session()
            bob.headers.update(AUTH)
            bob.get(two.url + "/", headers={"Authorization": None}, timeout=10)
            assert bob.cookies.get("qwenbox_owner") != alice.cookies.get("qwenbox_owner")
            for server in (one, two):
                assert bob.get(server.url + "/api/conversations", timeout=10).json()["data"] == []
                for other in (cid, api_cid):
                    assert bob.get(f"{server.url}/api/conversations/{other}", timeout=10).status_code == 404
                    assert (
                        bob.delete(f"{server.url}/api/conversations/{other}", timeout=10).status_code == 404
                    )
            assert len(alice.get(f"{two.url}/api/conversations/{cid}", timeout=10).json()["messages"]) == 4


# --- a load balancer in front ---------------------------------------------------------------------------
def served_by(balancer: HAProxy, max_tokens: int = 5) -> tuple[int, str, int]:
    r = requests.post(
        balancer.url + "/api/chat", json={"message": "hi", "max_tokens": max_tokens}, headers=AUTH, timeout=90
    )
    tokens = r.json()["usage"]["completion_tokens"] if r.status_code == 200 else -1
    return r.status_code, r.headers.get("X-Served-By", ""), tokens


def test_a_loading_instance_gets_no_traffic_until_it_is_healthy(tiny_model_dir, tmp_path):
    loaded = tmp_path / "loaded"  # the loading instance's model "loads" until this file exists
    ready = instance(tiny_model_dir, tmp_path, "ready", HISTORY="off")
    loading = instance(tiny_model_dir, tmp_path, "loading", HISTORY="off", LOAD_UNTIL=str(loaded))
    balancer = None
    try:
        ready.wait_healthy(90)
        balancer = HAProxy({"ready": ready.port, "loading": loading.port}, tmp_path)
        balancer.wait_state("loading", "DOWN", timeout=30)
        wait_for(lambda: requests.get(loading.url + "/api/health", timeout=5).status_code == 503, timeout=30)
        answers = [served_by(balancer) for _ in range(8)]
        assert requests.get(loading.url + "/api/health", timeout=5).json()["status"] == "loading"
        assert answers == [(200, "ready", 5)] * 8  # every one answered, none by the loading instance
        loaded.touch()
        loading.wait_healthy(90)
        balancer.wait_state("loading", "UP", timeout=30)
        servers = {served_by(balancer)[1] for _ in range(6)}
        assert servers == {"ready", "loading"}  # once healthy, it takes its share
    finally:
        if balancer:
            balancer.stop()
        loading.stop()
        ready.stop()


def test_killing_an_instance_mid_run_loses_no_request_that_had_not_started_streaming(
    tiny_model_dir, tmp_path
):
    """Two streams open (one on each instance) and 16 JSON chats, 4 at a time, through HAProxy; one
    instance is killed (SIGKILL) while its share is generating. Every JSON chat gets its whole reply
    (the killed instance's in-flight ones and those sent before it was marked down are retried on the
    other); the killed instance's stream ends without `done`, the survivor's completes; chats go on."""
    one = instance(tiny_model_dir, tmp_path, "one", HISTORY="off")
    two = instance(tiny_model_dir, tmp_path, "two", HISTORY="off")
    balancer = None
    try:
        one.wait_healthy(90)
        two.wait_healthy(90)
        balancer = HAProxy({"one": one.port, "two": two.port}, tmp_path)
        balancer.wait_state("one", "UP", timeout=30)
        balancer.wait_state("two", "UP", timeout=30)

        streams = [
            requests.post(
                balancer.url + "/api/chat",
                json={"message": "long", "max_tokens": 400, "stream": True},
                headers=AUTH,
                stream=True,
                timeout=90,
            )
            for _ in range(2)
        ]
        assert sorted(r.headers["X-Served-By"] for r in streams) == ["one", "two"]
        outcomes: dict[str, list[str]] = {}

        def read(r: requests.Response) -> None:
            kinds = []
            try:
                for event in sse.events(r):
                    kinds.append(event["type"])
            except requests.RequestException:
                kinds.append("broken")
            outcomes[r.headers["X-Served-By"]] = kinds

        readers = [threading.Thread(target=read, args=(r,)) for r in streams]
        for t in readers:
            t.start()

        killed = threading.Event()

        def kill_soon() -> None:
            time.sleep(1.0)  # JSON chats are generating on both by then
            one.kill()
            killed.set()

        killer = threading.Thread(target=kill_soon)
        killer.start()
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda _: served_by(balancer, max_tokens=30), range(16)))
        killer.join()
        for t in readers:
            t.join(90)
        assert killed.is_set()
        assert [(status, tokens) for status, _, tokens in results] == [(200, 30)] * 16, results
        assert balancer.retries() >= 1  # the test did what it is for: some request was sent again
        assert {by for _, by, _ in results} <= {"one", "two"} and any(by == "two" for _, by, _ in results)
        assert outcomes["two"][-1] == "done" and outcomes["two"].count("delta") == 400
        assert "done" not in outcomes["one"] and "delta" in outcomes["one"]  # started, then cut
        balancer.wait_state("one", "DOWN", timeout=10)
        assert [served_by(balancer) for _ in range(4)] == [(200, "two", 5)] * 4
    finally:
        if balancer:
            balancer.stop()
        for server in (one, two):
            if server.process.poll() is None:
                server.stop()
