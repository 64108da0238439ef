"""Reliability: whatever a client sends, the service answers 4xx in one JSON shape, never 5xx; a writer
killed at any moment leaves a whole database; an overfull queue is refused while health answers.

Bounded in count and time so the module stays in the default suite: the fuzzing runs a fixed number
of examples per route (derandomized, so a run is repeatable; a failure prints the input that caused
it), the kill rounds are few, and the live server tests send a handful of requests on loopback.
"""

from __future__ import annotations

import json
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from urllib.parse import quote

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.config import Settings
from service.history import History
from service.web import create_app
from tests.support.live import LiveServer, wait_for
from tests.support.paths import ROOT

pytestmark = pytest.mark.reliability

FUZZ = settings(
    max_examples=300,
    deadline=5000,  # ms per example: generous, the 2 cores are shared; a hang still fails
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# --- inputs --------------------------------------------------------------------------------------------
# Text that has broken something before, or could: NUL and controls, lone surrogates, blanks, markup,
# huge numbers, and plain words so that near-valid bodies get deep into the code.
NASTY_TEXT = st.sampled_from(
    [
        "",
        " ",
        "\t\n",
        "hi",
        "user",
        "text",
        "\x00",
        "a\x00b",
        "\x07",
        "\ud800",
        "x\udfff",
        "\ufeff",
        "<script>",
        "../../etc/passwd",
        "%s%n",
        "é" * 3,
        "0" * 24,
        "a" * 300,
        "null",
        "1e999",
    ]
)
TEXT = st.one_of(NASTY_TEXT, st.text(max_size=40))
NUMBER = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=False, allow_infinity=False)
)
SCALAR = st.one_of(st.none(), st.booleans(), NUMBER, TEXT)
ANY_JSON = st.recursive(
    SCALAR,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(TEXT, inner, max_size=4)),
    max_leaves=12,
)


def near(valid: dict) -> st.SearchStrategy:
    """Bodies close to `valid`: each field kept, dropped, or replaced by anything, plus a stray key."""
    fields = {key: st.one_of(st.just(value), ANY_JSON) for key, value in valid.items()}
    return st.fixed_dictionaries({}, optional=fields).flatmap(
        lambda body: st.one_of(
            st.just(body), st.dictionaries(TEXT, ANY_JSON, max_size=1).map(lambda extra: {**body, **extra})
        )
    )


MESSAGE = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["user", "assistant", "system", "developer", "tool"]), TEXT)},
    optional={
        "content": st.one_of(
            TEXT,
            st.lists(
                st.fixed_dictionaries({"type": st.one_of(st.just("text"), TEXT), "text": ANY_JSON}),
                max_size=3,
            ),
            ANY_JSON,
        ),
        "name": ANY_JSON,
    },
)
CHAT = near(
    {
        "message": "hi",
        "stream": False,
        "max_tokens": 3,
        "temperature": 0.5,
        "top_p": 0.9,
        "seed": 1,
        "stop": ["x"],
        "model": "m",
        "conversation_id": "0" * 24,
    }
) | st.fixed_dictionaries({"messages": st.lists(MESSAGE, max_size=3)}, optional={"max_tokens": ANY_JSON})
COMPLETION = near(
    {
        "model": "m",
        "stream": False,
        "max_tokens": 3,
        "max_completion_tokens": 3,
        "temperature": 1,
        "top_p": 1,
        "seed": 1,
        "stop": "x",
        "n": 1,
        "user": "u",
        "stream_options": {"include_usage": True},
        "response_format": {"type": "text"},
        "logprobs": False,
    }
).flatmap(lambda body: st.lists(MESSAGE, max_size=3).map(lambda msgs: {**body, "messages": msgs}))
BODY = st.one_of(ANY_JSON, CHAT, COMPLETION, near({"title": "t"}), near({"model": "m"}))
RAW = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([b"", b"{", b'{"a": 1', b"\xff\xfe", b"[" * 3000, b'{"message": "\\ud800"}', b"NaN"]),
)
CONTENT_TYPE = st.sampled_from(
    ["application/json"] * 6 + ["application/json; charset=utf-16", "text/plain", "", "multipart/form-data"]
)

# (method, path template); {cid} is a stored conversation of the client's own, or garbage
ROUTES = [
    ("POST", "/api/chat"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/api/models/active"),
    ("GET", "/api/health"),
    ("GET", "/api/models"),
    ("GET", "/v1/models"),
    ("GET", "/api/conversations"),
    ("POST", "/api/conversations"),
    ("GET", "/api/conversations/{cid}"),
    ("PATCH", "/api/conversations/{cid}"),
    ("DELETE", "/api/conversations/{cid}"),
    ("GET", "/api/conversations/{cid}/export"),
]
QUERY = st.dictionaries(
    st.sampled_from(["limit", "before", "q", "x"]), st.one_of(TEXT, NUMBER.map(str)), max_size=3
)


@pytest.fixture(scope="module")
def fuzz_target(tiny_model_dir, tmp_path_factory, tiny_backend, request):
    from tests.support.engines import scripted_engine

    config = Settings(
        model_id=str(tiny_model_dir),
        log_level="critical",
        data_dir=str(tmp_path_factory.mktemp("fuzz-data")),
        rate_limit="1000000/minute",
    )
    app = create_app(config, engine=scripted_engine(tiny_backend, "ok"))
    client = app.test_client()
    cid = client.post("/api/conversations", json={"title": "mine"}).json["id"]
    seen: Counter[str] = Counter()
    yield app, client, cid, seen
    line = (
        f"reliability fuzz: {seen['requests']} requests, {seen['5xx']} 5xx, "
        f"{seen['4xx']} 4xx, {seen['3xx']} 3xx, {seen['2xx']} 2xx"
    )
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():  # what capsys.disabled() does: shown under -q too
        print(f"\n{line}")


def _check(response, seen: Counter[str], what: str) -> None:
    """No 5xx; every 4xx in OpenAI's error shape, as JSON."""
    seen["requests"] += 1
    status = response.status_code
    data = response.get_data()  # a stream is read to its end: an error mid-stream would show here
    seen[f"{status // 100}xx"] += 1
    assert status < 500, f"{status} for {what}: {data[:500]!r}"
    if status >= 400:
        assert response.mimetype == "application/json", what
        error = json.loads(data)["error"]
        assert set(error) == {"message", "type", "param", "code"}, what
        assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
        assert error["param"] is None or isinstance(error["param"], str)


def _q(text: str) -> str:
    return quote(text, safe="", errors="surrogatepass")


@FUZZ
@given(
    route=st.sampled_from(ROUTES),
    body=st.one_of(BODY.map(lambda b: json.dumps(b).encode()), RAW, st.none()),
    content_type=CONTENT_TYPE,
    query=QUERY,
    cid=st.one_of(st.just(None), TEXT),
    auth=st.sampled_from([None, "Bearer x", "Basic ??", "Bearer " + "é" * 4]),
)
def test_fuzz_every_json_route_answers_4xx_json_never_5xx(
    fuzz_target, route, body, content_type, query, cid, auth
):
    app, client, own_cid, seen = fuzz_target
    method, template = route
    # As bytes on the wire: a lone surrogate goes as the invalid UTF-8 a client can send.
    path = template.replace("{cid}", own_cid if cid is None else _q(cid))
    headers = {"Authorization": auth} if auth else {}
    kwargs = {"query_string": "&".join(f"{_q(k)}={_q(v)}" for k, v in query.items()), "headers": headers}
    if body is not None:
        kwargs.update(data=body, content_type=content_type or None)
    response = client.open(path, method=method, **kwargs)
    try:
        _check(response, seen, f"{method} {path} {body[:200] if body else body!r}")
    finally:
        response.close()


@FUZZ
@given(body=st.one_of(CHAT, COMPLETION), stream=st.booleans(), v1=st.booleans())
def test_fuzz_near_valid_chats_never_5xx(fuzz_target, tiny_model_dir, body, stream, v1):
    """Bodies close enough to valid ones that many are answered: the reply path must hold up too."""
    app, client, cid, seen = fuzz_target
    if isinstance(body, dict):
        body = {**body, "stream": stream}
        if v1 and "model" in body:
            body["model"] = tiny_model_dir.name
        if "conversation_id" in body:
            body["conversation_id"] = cid
    response = client.post("/v1/chat/completions" if v1 else "/api/chat", json=body)
    try:
        _check(response, seen, json.dumps(body)[:300])
    finally:
        response.close()


# --- kill -9 while writing history ---------------------------------------------------------------------
WRITER = textwrap.dedent("""
    import sys
    from service.history import History, StoredMessage
    store = History(sys.argv[1])
    while True:
        conv = store.create("owner", "conversation")
        for i in range(5):
            role = "user" if i % 2 == 0 else "assistant"
            store.append("owner", conv.id, StoredMessage(role, f"{conv.id} {i}"))
            print(conv.id, i, flush=True)
""")


def test_kill_9_during_history_writes_leaves_a_whole_database(tmp_path):
    """SIGKILL at random moments, several rounds on the same file: after each, the database passes
    `PRAGMA integrity_check`, every message a writer saw committed is there, and every stored
    conversation holds its messages in order without a gap."""
    path = tmp_path / "history.db"
    rng = random.Random(12)
    committed: dict[str, int] = {}  # conversation -> highest message index confirmed
    for _ in range(4):
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        assert writer.stdout is not None
        for _ in range(rng.randint(5, 150)):
            cid, i = writer.stdout.readline().split()
            committed[cid] = int(i)
        time.sleep(rng.uniform(0, 0.05))  # and then at any moment, mid-transaction or not
        writer.send_signal(signal.SIGKILL)
        writer.wait(10)
        writer.stdout.close()
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert db.execute("PRAGMA foreign_key_check").fetchall() == []
            stored = [row[0] for row in db.execute("SELECT id FROM conversations")]
        store = History(path)
        for cid, last in committed.items():
            contents = [m.content for m in store.get("owner", cid).messages]
            assert contents[: last + 1] == [f"{cid} {i}" for i in range(last + 1)]
        for cid in stored:
            conv = store.get("owner", cid)
            assert conv.title == "conversation"
            assert [m.content for m in conv.messages] == [f"{cid} {i}" for i in range(len(conv.messages))]
        store.close()
    assert sum(last + 1 for last in committed.values()) >= 20


# --- the real server: an overfull queue, gunicorn's own errors, a chunked body ---------------------
LONG = {"message": "Tell me a long story", "stream": True, "max_tokens": 4000}


def _health_seconds(server: LiveServer) -> float:
    start = time.monotonic()
    r = requests.get(server.url + "/api/health", timeout=5)
    assert r.status_code == 200
    return time.monotonic() - start


def _stats(server: LiveServer) -> dict[str, int]:
    return requests.get(server.url + "/api/health", timeout=5).json()["queue"]


def _queue(server: LiveServer) -> tuple[int, int]:
    queue = _stats(server)
    return queue["active"], queue["waiting"]


def _ended(stats: dict[str, int]) -> int:
    return stats["completed"] + stats["cancelled"] + stats["failed"]


def test_queue_overflow_is_refused_with_retry_after_while_health_answers(live_server):
    """MAX_BATCH 1 + QUEUE_SIZE 1 (tests/conftest.py): two requests are taken, and of six more sent
    at once only as many get in as generations ended meanwhile (the tiny model is quick); the rest
    are refused with 503 and a Retry-After equal to what the message says."""
    server = live_server
    wait_for(lambda: _queue(server) == (0, 0))
    probes: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set() and len(probes) < 200:
            probes.append(_health_seconds(server))
            time.sleep(0.05)

    prober = threading.Thread(target=probe)
    prober.start()
    taken: list[requests.Response] = []
    readers = []  # kept: a dropped iter_content closes its connection, which the server takes as gone
    extras: list[requests.Response] = []
    try:
        for _ in range(2):
            r = requests.post(server.url + "/api/chat", json=LONG, stream=True, timeout=30)
            assert r.status_code == 200
            taken.append(r)
            readers.append(r.iter_content(64))
            next(readers[-1])  # its stream is open: the model has it, or it waits
        wait_for(lambda: _queue(server) == (1, 1), timeout=20)
        before = _stats(server)

        def send() -> None:
            r = requests.post(server.url + "/api/chat", json=LONG, stream=True, timeout=10)
            if r.status_code != 200:
                r.content  # noqa: B018 (read now: the streams are closed below)
            extras.append(r)

        senders = [threading.Thread(target=send) for _ in range(6)]
        for t in senders:
            t.start()
        for t in senders:
            t.join(30)
        ended = _ended(_stats(server)) - _ended(before)
        seen = len(probes)  # and health goes on answering while the taken streams still hold the model
        wait_for(lambda: len(probes) >= seen + 5, timeout=10)
    finally:
        for r in taken + extras:
            r.close()
        stop.set()
        prober.join(30)
    refused = [r for r in extras if r.status_code == 503]
    assert len(extras) == 6 and {r.status_code for r in extras} <= {200, 503}
    assert len(refused) >= max(1, 6 - ended), ([r.status_code for r in extras], ended)
    for r in refused:
        wait = int(r.headers["Retry-After"])
        assert wait >= 1 and f"retry in {wait} s" in r.json()["error"]["message"]
        assert r.json()["error"]["type"] == "server_busy"
    assert len(probes) >= 5 and max(probes) < 2.0, probes


def _raw(server: LiveServer, data: bytes) -> tuple[str, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    return status, {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}, body


@pytest.mark.parametrize(
    "request_bytes,status",
    [
        (b"GET /api/health?" + b"a" * 9000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 414),
        (b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431),
        (
            b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            + b"".join(b"X-%d: 1\r\n" % i for i in range(120))
            + b"\r\n",
            431,
        ),
        (b"GET /api/health HTTP/9.9\r\nHost: 127.0.0.1\r\n\r\n", 400),
    ],
)
def test_gunicorns_own_errors_are_json(live_server, request_bytes, status):
    line, headers, body = _raw(live_server, request_bytes)
    assert line.split()[1] == str(status), line
    assert headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]


def test_a_chunked_body_over_the_limit_is_413_through_gunicorn(live_server):
    body = b'{"message": "' + b"a" * 5_000_000 + b'"}'
    head = (
        b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + 65536]), body[i : i + 65536]) for i in range(0, len(body), 65536)
    )
    line, headers, data = _raw(live_server, head + chunks + b"0\r\n\r\n")
    assert line.split()[1] == "413", (line, data[:300])
    assert "larger than" in json.loads(data)["error"]["message"]
    assert "retry-after" not in headers
