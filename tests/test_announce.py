"""`invoke serve` and `python -m service` print the address to open once the model is ready (the app
factory's watcher thread, as `invoke run-local` does for the container)."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from service.config import Settings
from service.web import create_app
from service.web.app import page_url


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:8000/"),
        ("0.0.0.0", "http://127.0.0.1:8000/"),
        ("::", "http://127.0.0.1:8000/"),
        ("::1", "http://[::1]:8000/"),
        ("box.lan", "http://box.lan:8000/"),
    ],
)
def test_the_address_to_open(host, url):
    assert page_url(Settings(host=host)) == url


def _printed(capsys, text: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    seen = ""
    while time.monotonic() < deadline:
        seen += capsys.readouterr().out
        if text in seen:
            return seen
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not printed; got {seen!r}")


def test_the_url_is_printed_once_the_model_is_ready(settings, capsys):
    app = create_app(replace(settings, port=8123))
    try:
        out = _printed(capsys, "qwen-box is ready after")
        assert "open http://127.0.0.1:8123/" in out
    finally:
        app.extensions["models"].close()


def test_a_failed_load_is_printed_with_its_reason(settings, tmp_path, capsys):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    app = create_app(replace(settings, model_id=str(empty), models=""))
    try:
        out = _printed(capsys, "the model failed to load")
        assert "http://127.0.0.1:8000/ says why" in out
    finally:
        app.extensions["models"].close()
