"""The real PostgreSQL the history tests run against: `.ci/run` starts one on loopback (`.ci/postgres.sh`)
and exports its URL as QWENBOX_TEST_DATABASE_URL. Each test gets a schema of its own in that database
(through the URL's `options=-csearch_path=...`), dropped afterwards, so tests never see each other's rows.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest

ENV = "QWENBOX_TEST_DATABASE_URL"


def base_url() -> str:
    """The test server's URL; without it the test is skipped here, and fails in CI (which sets it)."""
    url = os.environ.get(ENV, "")
    if not url:
        reason = f"{ENV} is not set: no PostgreSQL to test against (`. .ci/postgres.sh` as root starts one)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return url


def with_options(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.update(params)
    return urlunsplit(parts._replace(query=urlencode(query)))


@contextmanager
def fresh_schema() -> Iterator[str]:
    """A URL whose connections use a new, empty schema (dropped with everything in it on exit)."""
    import psycopg

    url = base_url()
    schema = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield with_options(url, options=f"-csearch_path={schema}")
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


class Cuttable:
    """A TCP forwarder on loopback to the test PostgreSQL that can be cut and mended, to make the
    database unreachable for an app that is already running (its connections drop, new ones are
    refused) without touching the server the other tests use."""

    def __init__(self, url: str):
        import socket
        import threading

        parts = urlsplit(url)
        self._target = (parts.hostname, parts.port or 5432)
        self._socket, self._threading = socket, threading
        self._conns: list = []
        self._listener = None
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self.url = urlunsplit(
            parts._replace(netloc=f"{parts.username}:{parts.password}@127.0.0.1:{self.port}")
        )
        self.mend()

    def mend(self) -> None:
        listener = self._socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        self._listener = listener
        self._threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            server = self._socket.create_connection(self._target)
            self._conns += [client, server]
            for a, b in ((client, server), (server, client)):
                self._threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass

    def cut(self) -> None:
        try:  # wakes the thread blocked in accept(): close() alone would leave it listening
            self._listener.shutdown(self._socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        for s in self._conns:
            try:
                s.shutdown(self._socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self._conns.clear()
