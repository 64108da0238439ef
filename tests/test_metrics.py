"""/metrics: Prometheus' text format behind the access token, counting exactly what a bounded load run
on the real server did (requests by route and status, generations, tokens, histograms), and the
engine's own state (queue, active, load time) read at scrape time."""

from __future__ import annotations

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from service.web import create_app
from tests.support import sse
from tests.support.live import LiveServer, wait_for

TOKEN = "metrics-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample by (name, sorted labels); the text must parse as Prometheus' format."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(scrape: dict, name: str, **labels: str) -> float:
    return scrape.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape(server: LiveServer) -> dict:
    r = requests.get(server.url + "/metrics", headers=AUTH, timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain; version=")
    return samples(r.text)


@pytest.fixture(scope="module")
def server(endless_model_dir, tmp_path_factory):
    """The real server on the endless tiny model: every reply is exactly max_tokens long."""
    with LiveServer(
        {"MODEL_ID": str(endless_model_dir), "ACCESS_TOKEN": TOKEN, "MAX_BATCH": "2", "HISTORY": "off"},
        tmp_path_factory.mktemp("metrics-logs") / "gunicorn.log",
    ) as live:
        yield live


def test_metrics_need_the_token(server):
    assert requests.get(server.url + "/metrics", timeout=10).status_code == 401
    wrong = {"Authorization": "Bearer not-the-token-at-all"}
    assert requests.get(server.url + "/metrics", headers=wrong, timeout=10).status_code == 401


def test_metrics_count_exactly_what_a_bounded_load_run_did(server):
    """5 chats (JSON and streamed, through both APIs), 7 health checks, one refused chat and one
    stream dropped mid-reply: the counters move by exactly that, the tokens by what the replies said."""
    model = server.wait_healthy()["model"]  # the public id of the model's folder
    before = scrape(server)
    tokens = 0
    for i, max_tokens in enumerate((5, 7, 9)):
        r = requests.post(
            server.url + "/api/chat",
            json={"message": f"question {i}", "max_tokens": max_tokens},
            headers=AUTH,
            timeout=60,
        )
        assert r.status_code == 200
        tokens += r.json()["usage"]["completion_tokens"]
    r = requests.post(
        server.url + "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6},
        headers=AUTH,
        timeout=60,
    )
    assert r.status_code == 200
    tokens += r.json()["usage"]["completion_tokens"]
    with requests.post(
        server.url + "/api/chat",
        json={"message": "stream it", "max_tokens": 8, "stream": True},
        headers=AUTH,
        stream=True,
        timeout=60,
    ) as r:
        done = [e for e in sse.events(r) if e["type"] == "done"][0]
        tokens += done["usage"]["completion_tokens"]
    for _ in range(7):
        assert requests.get(server.url + "/api/health", timeout=10).status_code == 200
    assert requests.post(server.url + "/api/chat", json={"message": "x"}, timeout=10).status_code == 401
    # A long stream dropped after its first piece: cancelled, within a token or so.
    r = requests.post(
        server.url + "/api/chat",
        json={"message": "long", "max_tokens": 2000, "stream": True},
        headers=AUTH,
        stream=True,
        timeout=60,
    )
    next(e for e in sse.events(r) if e["type"] == "delta")
    r.close()
    wait_for(
        lambda: (
            value(scrape(server), "qwenbox_generations_total", model=model, finish_reason="cancelled")
            - value(before, "qwenbox_generations_total", model=model, finish_reason="cancelled")
            == 1
        )
    )
    after = scrape(server)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    requests_total = "qwenbox_http_requests_total"
    assert moved(requests_total, route="/api/chat", method="POST", status="200") == 5  # 4 + the dropped one
    assert moved(requests_total, route="/api/chat", method="POST", status="401") == 1
    assert moved(requests_total, route="/v1/chat/completions", method="POST", status="200") == 1
    assert moved(requests_total, route="/api/health", method="GET", status="200") == 7
    assert moved("qwenbox_generations_total", model=model, finish_reason="length") == 5
    assert moved("qwenbox_generations_total", model=model, finish_reason="cancelled") == 1
    assert tokens == 5 + 7 + 9 + 6 + 8
    cancelled_tokens = moved("qwenbox_generated_tokens_total", model=model) - tokens
    assert 1 <= cancelled_tokens < 2000  # the dropped stream's, stopped early
    assert moved("qwenbox_time_to_first_token_seconds_count", model=model) == 6
    assert moved("qwenbox_decode_tokens_per_second_count", model=model) == 6
    assert moved("qwenbox_prompt_tokens_total", model=model) > 0
    assert value(after, "qwenbox_generations_active", model=model) == 0
    assert value(after, "qwenbox_queue_depth", model=model) == 0
    assert value(after, "qwenbox_model_load_seconds", model=model) > 0


def test_routes_are_labelled_by_rule_not_path(settings, engine):
    """Conversation ids and unknown paths must not grow the label set without bound."""
    app = create_app(settings, engine=engine)
    client = app.test_client()
    client.get("/")
    for cid in ("0" * 24, "1" * 24):
        assert client.get(f"/api/conversations/{cid}").status_code == 404
    assert client.get("/no/such/path/abc").status_code == 404
    scraped = samples(client.get("/metrics").get_data(as_text=True))
    rule = ("route", "/api/conversations/<cid>")
    assert scraped[("qwenbox_http_requests_total", (("method", "GET"), rule, ("status", "404")))] == 2
    unmatched = (("method", "GET"), ("route", "unmatched"), ("status", "404"))
    assert scraped[("qwenbox_http_requests_total", unmatched)] == 1
    assert not any("abc" in str(key) or "0" * 24 in str(key) for key in scraped)


def test_made_up_methods_share_one_label(settings, engine):
    """A client choosing random HTTP methods must not grow /metrics either (300 of them made 600
    lines before): every method HTTP does not define is counted as `other`. Each 405 says in its
    `Allow` header which methods the route takes."""
    client = create_app(settings, engine=engine).test_client()
    for i in range(30):
        answer = client.open("/api/health", method=f"X{i}Y")
        assert answer.status_code == 405
        assert set(answer.headers["Allow"].split(", ")) == {"GET", "HEAD", "OPTIONS"}
        assert answer.get_json()["error"]["message"].startswith(f"X{i}Y is not allowed here")
    scraped = samples(client.get("/metrics").get_data(as_text=True))
    other = (("method", "other"), ("route", "unmatched"), ("status", "405"))
    assert scraped[("qwenbox_http_requests_total", other)] == 30
    assert not any("X1Y" in str(key) for key in scraped)
