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
    assert int(over.headers["Retry-After"]) > 0
    assert "rate limit" in over.json["error"]["message"]
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
