"""The page's HTML, JS and CSS (and JSON answers) are compressed for clients that accept it; an event
stream never is, so a streamed reply still reaches the client piece by piece."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from backports import zstd  # flask-compress's own zstd codec on Python < 3.14

from service.web import create_app

STATIC = Path(__file__).resolve().parent.parent / "service" / "static"


@pytest.fixture
def client(settings, scripted):
    return create_app(settings, engine=scripted("A streamed reply, " * 20, delay=0.0)).test_client()


@pytest.mark.parametrize(
    ("path", "file", "mimetype"),
    [
        ("/", "index.html", "text/html"),
        ("/static/js/chat.js", "js/chat.js", "text/javascript"),
        ("/static/style.css", "style.css", "text/css"),
        ("/static/vendor/marked.min.js", "vendor/marked.min.js", "text/javascript"),
    ],
)
def test_page_files_are_compressed(client, path, file, mimetype):
    original = (STATIC / file).read_bytes()
    r = client.get(path, headers={"Accept-Encoding": "gzip"})
    assert r.status_code == 200 and r.mimetype == mimetype
    assert r.headers["Content-Encoding"] == "gzip" and "Accept-Encoding" in r.headers["Vary"]
    assert gzip.decompress(r.data) == original
    assert len(r.data) < len(original) / 2
    z = client.get(path, headers={"Accept-Encoding": "zstd, gzip;q=0.5"})
    assert z.headers["Content-Encoding"] == "zstd" and zstd.decompress(z.data) == original
    plain = client.get(path)
    assert "Content-Encoding" not in plain.headers and plain.data == original


def test_an_event_stream_is_never_compressed(client):
    r = client.post(
        "/api/chat",
        json={"message": "hi", "stream": True},
        headers={"Accept-Encoding": "gzip, zstd, br", "Accept": "text/event-stream"},
        buffered=False,
    )
    assert r.status_code == 200 and r.mimetype == "text/event-stream"
    assert "Content-Encoding" not in r.headers
    pieces = list(r.response)
    assert len(pieces) > 3  # one write per event, not one compressed blob
    assert b"".join(pieces).decode().count("data: ") > 3
