"""The history store's two databases behind one small interface: a SQLite file (the default) or
PostgreSQL (DATABASE_URL), so `history.py` writes its SQL once.

Each database gives `transaction()` (a write: serialised on SQLite, the conversation row locked on
PostgreSQL where `History` asks for it), `read()`, `migrate()` and `version`. SQL is written with `?`
placeholders, SQLite's; the PostgreSQL side turns them into psycopg's `%s`. Where the two must
differ (types, case-insensitive LIKE, row locks), the words are attributes of the database object,
not branches in the store.

PostgreSQL is reached through a small psycopg connection pool: the server's threads each borrow a
connection for one transaction. TLS follows the URL as libpq reads it (`sslmode=require` for Azure's
Flexible Server). The URL's password never reaches a log or an error message (`redact`).
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from .errors import HistoryUnavailable

log = logging.getLogger(__name__)

# Any 64-bit number that no other program using this database would pick: the migration lock's key.
MIGRATION_LOCK_KEY = 0x7177656E626F78  # "qwenbox"
POSTGRES_SCHEMES = ("postgresql", "postgres")


@dataclass(frozen=True)
class Migration:
    """One schema step whose SQL differs between the two databases (a plain string in
    `history.MIGRATIONS` runs as it is on both)."""

    sqlite: str
    postgresql: str


def migration_sql(migration: str | Migration, dialect: str) -> str:
    if isinstance(migration, str):
        return migration
    return migration.sqlite if dialect == "sqlite" else migration.postgresql


def is_postgres_url(url: str) -> bool:
    return urlsplit(url).scheme in POSTGRES_SCHEMES


def redact(url: str) -> str:
    """`url` with its password replaced by `***`, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")
    user = netloc[0].partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[2]}"))


class Connection(Protocol):
    """What `History` uses of a connection: sqlite3's own, or `_PostgresConnection`."""

    def execute(self, sql: str, args: Any = (), /) -> Any: ...
    def executemany(self, sql: str, rows: Any, /) -> Any: ...


def _statements(sql: str) -> list[str]:
    return [s for s in sql.split(";") if s.strip()]


class SQLiteDatabase:
    """One connection shared by the server's threads, serialised by a lock."""

    dialect = "sqlite"
    like = "LIKE"  # SQLite's LIKE ignores ASCII case already
    for_update = ""  # a write transaction holds the whole database (BEGIN IMMEDIATE)

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _owner_only(self.path)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=5000")

    def describe(self) -> str:
        return f"SQLite {self.path}"

    @property
    def version(self) -> int:
        with self._lock:
            return self._db.execute("PRAGMA user_version").fetchone()[0]

    def migrate(self, migrations: Sequence[str | Migration]) -> None:
        """Bring the schema to the newest version, each step in its own transaction."""
        for target in range(self.version + 1, len(migrations) + 1):
            with self.transaction() as db:
                for statement in _statements(migration_sql(migrations[target - 1], self.dialect)):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {target}")

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self._lock:
            yield self._db

    def close(self) -> None:
        with self._lock:
            self._db.close()


_PLACEHOLDER = re.compile(r"\?")


class _PostgresConnection:
    """A psycopg connection speaking the store's `?` SQL. PostgreSQL's text cannot hold NUL, which
    a reply or an import may: it is stored as U+FFFD, the character for "not representable"."""

    def __init__(self, conn: Any):
        self._conn = conn

    @staticmethod
    def _args(args: Sequence[Any]) -> list[Any]:
        return [a.replace("\x00", "\ufffd") if isinstance(a, str) else a for a in args]

    def execute(self, sql: str, args: Sequence[Any] = (), /) -> Any:
        return self._conn.execute(_PLACEHOLDER.sub("%s", sql), self._args(args))

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]], /) -> Any:
        cursor = self._conn.cursor()
        cursor.executemany(_PLACEHOLDER.sub("%s", sql), [self._args(r) for r in rows])
        return cursor


class PostgresDatabase:
    """A pool of connections to one PostgreSQL database, shared by every instance of the service."""

    dialect = "postgresql"
    like = "ILIKE"  # PostgreSQL's LIKE is case-sensitive; titles are searched without case
    for_update = " FOR UPDATE"  # a write locks the conversation it checks, as SQLite's lock would

    def __init__(
        self, url: str, *, max_connections: int = 4, connect_timeout: float = 10, retry_after: float = 5
    ):
        # Imported here: a SQLite-only service never loads psycopg.
        from psycopg.rows import dict_row
        from psycopg_pool import ConnectionPool

        # `connect_timeout`: how long a request (or the start) waits for a connection before the
        # database counts as unreachable (a 503 the client may retry), while the pool keeps trying.
        self.url = url
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=max_connections,
            kwargs={"row_factory": dict_row},
            name="history",
            open=True,
            timeout=connect_timeout,
            check=ConnectionPool.check_connection,  # a connection the server dropped is replaced
        )
        # A circuit: once a wait for a connection has failed, the next `retry_after` seconds fail at
        # once (each request used to hold a server thread for the whole timeout: 20 of them starved
        # the health probe), then one request at a time tries the database again.
        self.retry_after = retry_after
        self._down_until = 0.0
        self._trying = threading.Lock()

    def describe(self) -> str:
        return f"PostgreSQL {redact(self.url)}"

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        from psycopg import OperationalError
        from psycopg_pool import PoolTimeout

        trial = False
        if time.monotonic() < self._down_until:
            raise HistoryUnavailable()
        if self._down_until:  # it was down: one request tries again, the others fail at once meanwhile
            if not self._trying.acquire(blocking=False):
                raise HistoryUnavailable()
            trial = True
        try:
            with self._pool.connection() as conn:
                self._down_until = 0.0
                yield conn
        except (PoolTimeout, OperationalError) as exc:
            # libpq's message names host and port, never the password; the client is told less.
            log.warning("history database %s unreachable: %s", redact(self.url), exc)
            self._down_until = time.monotonic() + self.retry_after
            raise HistoryUnavailable() from None
        finally:
            if trial:
                self._trying.release()

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One transaction on a borrowed connection: committed when the block ends, rolled back if
        it raises (the pool's connection context does both)."""
        with self._connection() as conn:
            yield _PostgresConnection(conn)

    read = transaction

    @property
    def version(self) -> int:
        with self._connection() as conn:
            exists = conn.execute("SELECT to_regclass('qwenbox_schema') IS NOT NULL AS e").fetchone()["e"]
            if not exists:
                return 0
            row = conn.execute("SELECT version FROM qwenbox_schema").fetchone()
            return row["version"] if row else 0

    def migrate(self, migrations: Sequence[str | Migration]) -> None:
        """All pending steps in one transaction, under a lock every instance takes first: of several
        instances starting together, one migrates and the others then find the schema current.
        PostgreSQL's DDL is transactional, so a failed step leaves the schema as it was."""
        with self._connection() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
            conn.execute("CREATE TABLE IF NOT EXISTS qwenbox_schema (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM qwenbox_schema").fetchone()
            if row is None:
                conn.execute("INSERT INTO qwenbox_schema (version) VALUES (0)")
            current = row["version"] if row else 0
            for target in range(current + 1, len(migrations) + 1):
                for statement in _statements(migration_sql(migrations[target - 1], self.dialect)):
                    conn.execute(statement)
                conn.execute("UPDATE qwenbox_schema SET version = %s", (target,))

    def close(self) -> None:
        self._pool.close()


Database = SQLiteDatabase | PostgresDatabase


def open_database(location: Path | str) -> Database:
    """A PostgreSQL URL opens a pool to it; anything else is a SQLite file's path."""
    if isinstance(location, str) and is_postgres_url(location):
        return PostgresDatabase(location)
    return SQLiteDatabase(Path(location))


def _owner_only(path: Path) -> None:
    """Create the database file readable by its owner alone (0600), and narrow an existing one and
    its WAL and shared-memory files: the conversations are private. SQLite creates the -wal and
    -shm files with the database file's own mode, so a new store is 0600 throughout."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if file.exists() and file.stat().st_mode & 0o077:
            file.chmod(0o600)
