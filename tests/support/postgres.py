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
