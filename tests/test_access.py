"""Access token, rate limits and what a deployment must never leak."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from service.config import Settings
from service.web import create_app
from tests.support.live import LiveServer

TOKEN = "test-token-0123456789abcdef"
CHAT = {"message": "hi", "max_tokens": 2}
V1 = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}  # + the model's id


def v1(settings) -> dict:
    return {"model": Path(settings.model_id).name, **V1}


@pytest.fixture
def app_with_token(settings, scripted):
    return create_app(Settings(**{**settings.__dict__, "access_token": TOKEN}), engine=scripted("ok"))


ROUTES = [
    ("post", "/api/chat", CHAT),
    ("post", "/v1/chat/completions", V1),
    ("get", "/v1/models", None),
    ("get", "/api/does-not-exist", None),
]


@pytest.mark.parametrize("method,path,body", ROUTES)
@pytest.mark.parametrize(
    "header", [None, "Bearer wrong-token-0123456789", f"Basic {TOKEN}", "Bearer ", f"Bearer {TOKEN}x"]
)
def test_protected_routes_refuse_missing_or_wrong_tokens(
    app_with_token, settings, method, path, body, header
):
    headers = {"Authorization": header} if header else {}
    body = v1(settings) if body is V1 else body
    r = getattr(app_with_token.test_client(), method)(path, json=body, headers=headers)
    assert r.status_code == 401
    assert r.json["error"]["type"] == "authentication_error"
    assert r.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("method,path,body", ROUTES[:3])
def test_protected_routes_accept_the_right_token(app_with_token, settings, method, path, body):
    body = v1(settings) if body is V1 else body
    r = getattr(app_with_token.test_client(), method)(
        path, json=body, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert r.status_code == 200


@pytest.mark.parametrize("path", ["/api/health", "/", "/static/js/main.js"])
def test_health_and_page_stay_open(app_with_token, path):
    assert app_with_token.test_client().get(path).status_code == 200


def test_rate_limit_per_client_is_429_with_retry_after(settings, scripted):
    app = create_app(Settings(**{**settings.__dict__, "rate_limit": "3/minute"}), engine=scripted("ok"))
    client = app.test_client()
    codes = [client.post("/api/chat", json=CHAT).status_code for _ in range(3)]
    over = client.post("/v1/chat/completions", json=v1(settings))  # one budget for both APIs
    assert codes == [200, 200, 200]
    assert over.status_code == 429
    wait = int(over.headers["Retry-After"])
    assert 0 < wait <= 61
    assert f"retry in {wait} s" in over.json["error"]["message"]
    other = client.post("/api/chat", json=CHAT, environ_base={"REMOTE_ADDR": "10.9.8.7"})
    assert other.status_code == 200  # another client has its own budget
    assert client.get("/api/health").status_code == 200  # health is never limited


def test_settings_never_show_the_token():
    s = Settings(access_token=TOKEN)
    assert TOKEN not in repr(s) and TOKEN not in str(s)


def test_token_stays_out_of_the_server_log(tiny_model_dir, tmp_path):
    server = LiveServer(
        {"MODEL_ID": str(tiny_model_dir), "ACCESS_TOKEN": TOKEN, "LOG_LEVEL": "debug"},
        tmp_path / "gunicorn.log",
    )
    with server:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert requests.post(server.url + "/api/chat", json=CHAT, headers=auth, timeout=30).status_code == 200
        assert requests.post(server.url + "/api/chat", json=CHAT, timeout=30).status_code == 401
    log = server.log_path.read_text()
    assert "POST /api/chat" in log  # the access log is there...
    assert TOKEN not in log  # ...and the token is not


def test_retry_after_only_where_a_client_is_told_to_wait(settings, scripted):
    """Flask-Limiter's own headers put a Retry-After on every response it counted."""
    client = create_app(settings, engine=scripted("ok")).test_client()
    ok = client.post("/api/chat", json=CHAT)
    big = client.post("/api/chat", data="x" * 1_100_000, content_type="application/json")
    bad = client.post("/v1/chat/completions", json={"model": "nope"})
    assert (ok.status_code, big.status_code, bad.status_code) == (200, 413, 400)
    assert not any("Retry-After" in r.headers for r in (ok, big, bad))


def _with_hosts(settings, hosts: str, **more):
    return Settings(**{**settings.__dict__, "allowed_hosts": hosts, **more})


@pytest.mark.parametrize(
    "host,status",
    [
        ("127.0.0.1:8000", 200),
        ("localhost", 200),
        ("LOCALHOST:1234", 200),
        ("[::1]:8000", 200),
        ("qwen.example.org", 200),
        ("qwen.example.org:443", 200),
        ("a.lab.example.net", 200),
        ("attacker.example.com", 400),
        ("attacker.example.com:8000", 400),
        ("qwen.example.org.attacker.com", 400),
        ("127.0.0.1.nip.io", 400),
        ("example.net", 400),
    ],
)
@pytest.mark.parametrize("path", ["/api/models", "/api/health", "/"])
def test_only_configured_and_loopback_host_names_are_answered(settings, scripted, host, status, path):
    """DNS rebinding: a page served as attacker.example.com, whose name now points at 127.0.0.1."""
    app = create_app(_with_hosts(settings, "qwen.example.org, .lab.example.net"), engine=scripted("ok"))
    r = app.test_client().get(path, headers={"Host": host})
    assert r.status_code == status
    if status == 400:
        assert r.json["error"]["code"] == "host_not_allowed" and "ALLOWED_HOSTS" in r.json["error"]["message"]


def test_by_default_only_loopback_names_are_answered(client):
    assert client.get("/api/models", headers={"Host": "127.0.0.1:8000"}).status_code == 200
    r = client.post("/api/chat", json=CHAT, headers={"Host": "rebound.example.com"})
    assert r.status_code == 400 and r.is_json


def test_behind_a_proxy_the_forwarded_host_is_checked(settings, scripted):
    app = create_app(_with_hosts(settings, "qwen.example.org", proxy_hops=1), engine=scripted("ok"))
    client = app.test_client()
    good = {"Host": "127.0.0.1:8000", "X-Forwarded-Host": "qwen.example.org"}
    bad = {"Host": "127.0.0.1:8000", "X-Forwarded-Host": "attacker.example.com"}
    assert client.get("/api/models", headers=good).status_code == 200
    assert client.get("/api/models", headers=bad).status_code == 400


def test_a_star_answers_any_host(settings, scripted):
    app = create_app(_with_hosts(settings, "*"), engine=scripted("ok"))
    assert app.test_client().get("/api/models", headers={"Host": "any.example.com"}).status_code == 200


def test_health_shows_why_loading_failed_only_to_token_holders(settings):
    from service.inference.engine import Engine

    def broken():
        raise OSError("no model in /srv/secret/models/qwen")

    engine = Engine(broken).start()
    engine.wait_ready(5)
    app = create_app(Settings(**{**settings.__dict__, "access_token": TOKEN}), engine=engine)
    anonymous = app.test_client().get("/api/health")
    holder = app.test_client().get("/api/health", headers={"Authorization": f"Bearer {TOKEN}"})
    assert anonymous.status_code == holder.status_code == 503
    assert "/srv/secret" not in anonymous.get_data(as_text=True)
    assert "/srv/secret" in holder.json["detail"]


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://attacker.example.com"},
        {"Origin": "null"},  # a sandboxed frame or a file
        {"Origin": "http://localhost:8001"},  # another port is another origin
        {"Sec-Fetch-Site": "cross-site"},
    ],
)
@pytest.mark.parametrize(
    "method,path,kwargs",
    [
        ("post", "/api/conversations", {}),  # an empty body: what a form or a simple fetch can send
        ("post", "/api/conversations", {"data": "{}", "content_type": "text/plain"}),
        ("post", "/api/chat", {"json": CHAT}),
        ("delete", "/api/conversations/" + "0" * 24, {}),
    ],
)
def test_another_site_cannot_make_a_visitors_browser_change_anything(client, headers, method, path, kwargs):
    """A page of another site can make a visitor's browser send requests here, cookie and all; the
    browser names that site in Origin (and Sec-Fetch-Site), and nothing changes."""
    before = client.get("/api/conversations").get_json()
    r = getattr(client, method)(path, headers={"Host": "localhost:8000", **headers}, **kwargs)
    assert r.status_code == 403 and r.get_json()["error"]["code"] == "cross_site_request"
    assert client.get("/api/conversations").get_json() == before


@pytest.mark.parametrize(
    "headers",
    [
        {},  # curl, the openai client, a script: no Origin
        {"Origin": "http://localhost:8000"},
        {"Origin": "http://LOCALHOST:8000", "Sec-Fetch-Site": "same-origin"},
    ],
)
def test_the_page_itself_and_clients_without_a_browser_still_write(client, headers):
    r = client.post("/api/conversations", json={}, headers={"Host": "localhost:8000", **headers})
    assert r.status_code == 201, r.get_json()


def test_the_default_port_is_the_same_origin_whether_named_or_not():
    from service.web.access import same_origin

    assert same_origin("https://qwen.example.org", "qwen.example.org:443")
    assert same_origin("https://qwen.example.org:443", "qwen.example.org")
    assert same_origin("http://[::1]:8000", "[::1]:8000")
    assert not same_origin("http://qwen.example.org", "qwen.example.org:443")
    assert not same_origin("https://qwen.example.org.attacker.example", "qwen.example.org")
