"""The history store on its own, on SQLite and on PostgreSQL (`history_database`): ownership, paging,
search, migrations, surviving kill -9; and what only a shared database meets: several instances
migrating at once, two writers on one conversation, TLS as the URL says, a password never shown."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
from urllib.parse import urlsplit

import pytest

from service.errors import ConversationNotFound, HistoryUnavailable, InvalidRequest
from service.history import MIGRATIONS, History, StoredMessage, new_owner_id
from tests.support.paths import ROOT
from tests.support.postgres import base_url, fresh_schema, with_options


@pytest.fixture
def store(tmp_path, history_database):
    h = History(history_database or tmp_path / "history.db")
    yield h
    h.close()


def count(store: History, table: str) -> int:
    with store._db.read() as db:
        return db.execute(f"SELECT COUNT(*) AS n FROM {table}").fetchone()["n"]


def test_create_append_get(store):
    conv = store.create("alice", "  First   chat ", model="tiny")
    assert conv.title == "First chat"
    store.append("alice", conv.id, StoredMessage("user", "Hello"))
    store.append("alice", conv.id, StoredMessage("assistant", "Hi!", "stop", meta={"usage": {"x": 1}}))
    got = store.get("alice", conv.id)
    assert [(m.role, m.content, m.status) for m in got.messages] == [
        ("user", "Hello", "complete"),
        ("assistant", "Hi!", "stop"),
    ]
    assert got.messages[1].meta == {"usage": {"x": 1}}
    assert got.message_count == 2 and got.model == "tiny"
    assert got.updated_at >= conv.updated_at


def test_owners_cannot_reach_each_others_conversations(store):
    conv = store.create("alice", "secret")
    for attempt in (
        lambda: store.get("mallory", conv.id),
        lambda: store.rename("mallory", conv.id, "mine now"),
        lambda: store.delete("mallory", conv.id),
        lambda: store.append("mallory", conv.id, StoredMessage("user", "x")),
    ):
        with pytest.raises(ConversationNotFound):
            attempt()
    assert store.list("mallory")[0] == []
    assert store.get("alice", conv.id).title == "secret"
    assert store.get("alice", conv.id).messages == []


def test_pages_are_newest_first_without_gaps_or_repeats(store):
    ids = [store.create("bob", f"chat {i}").id for i in range(25)]
    seen, cursor, pages = [], None, 0
    while True:
        page, cursor = store.list("bob", limit=10, before=cursor)
        seen += [c.id for c in page]
        pages += 1
        if cursor is None:
            break
    assert pages == 3 and seen == list(reversed(ids))
    with pytest.raises(ValueError):
        store.list("bob", before="not-a-cursor")


def test_search_by_title_treats_wildcards_literally(store):
    store.create("bob", "Docker tips")
    store.create("bob", "100% sure")
    store.create("bob", "snake_case names")
    store.create("bob", "other")
    assert [c.title for c in store.list("bob", query="docker")[0]] == ["Docker tips"]
    assert [c.title for c in store.list("bob", query="%")[0]] == ["100% sure"]
    assert [c.title for c in store.list("bob", query="_")[0]] == ["snake_case names"]


def test_rename_and_delete(store):
    conv = store.create("bob", "old")
    store.append("bob", conv.id, StoredMessage("user", "x"))
    assert store.rename("bob", conv.id, "new").title == "new"
    with pytest.raises(ValueError):
        store.rename("bob", conv.id, "   ")
    with pytest.raises(ValueError):
        store.rename("bob", conv.id, "x" * 201)
    store.delete("bob", conv.id)
    with pytest.raises(ConversationNotFound):
        store.get("bob", conv.id)
    assert count(store, "messages") == 0  # the delete cascades to its messages


FIRST_ROWS = (
    "INSERT INTO conversations VALUES ('c1', 'alice', 'kept', 1.0, 2.0)",
    "INSERT INTO messages (conversation_id, role, content, created_at) "
    "VALUES ('c1', 'user', 'still here', 1.5)",
)


def test_migrates_a_database_from_the_first_schema(tmp_path, history_database):
    path = history_database or tmp_path / "old.db"
    if history_database:
        import psycopg

        with psycopg.connect(history_database) as db:
            for statement in MIGRATIONS[0].postgresql.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute("CREATE TABLE qwenbox_schema (version INTEGER NOT NULL)")
            db.execute("INSERT INTO qwenbox_schema VALUES (1)")
            for statement in FIRST_ROWS:
                db.execute(statement)
    else:
        with sqlite3.connect(path) as db:
            db.executescript(MIGRATIONS[0].sqlite)
            db.execute("PRAGMA user_version = 1")
            for statement in FIRST_ROWS:
                db.execute(statement)
    store = History(path)
    assert store.version == len(MIGRATIONS)
    conv = store.get("alice", "c1")
    assert conv.title == "kept" and conv.model is None
    assert [(m.content, m.status) for m in conv.messages] == [("still here", "complete")]
    store.close()
    again = History(path)
    assert again.version == len(MIGRATIONS)  # opening again changes nothing
    again.close()


WRITER = textwrap.dedent("""
    import sys
    from service.history import History, StoredMessage
    store = History(sys.argv[1])
    conv = store.create("alice", "busy")
    print(conv.id, flush=True)
    i = 0
    while True:
        store.append("alice", conv.id, StoredMessage("user" if i % 2 == 0 else "assistant", f"turn {i}"))
        print(i, flush=True)
        i += 1
""")


def test_a_writer_killed_mid_conversation_loses_nothing_it_committed(tmp_path, history_database):
    path = history_database or str(tmp_path / "history.db")
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    conv_id = writer.stdout.readline().strip()
    confirmed = [int(writer.stdout.readline()) for _ in range(200)][-1]
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    if not history_database:
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    store = History(path)
    turns = [m.content for m in store.get("alice", conv_id).messages]
    assert len(turns) >= confirmed + 1
    assert turns[: confirmed + 1] == [f"turn {i}" for i in range(confirmed + 1)]
    store.close()


def test_the_database_and_its_journal_files_are_the_owners_alone(tmp_path):
    store = History(tmp_path / "data" / "history.db")
    store.append("alice", store.create("alice", "private").id, StoredMessage("user", "secret"))
    files = [tmp_path / "data" / name for name in ("history.db", "history.db-wal", "history.db-shm")]
    assert all(f.exists() for f in files)
    assert {oct(f.stat().st_mode & 0o777) for f in files} == {"0o600"}
    store.close()


def test_an_existing_readable_database_is_narrowed_to_its_owner(tmp_path):
    path = tmp_path / "history.db"
    History(path).close()
    path.chmod(0o644)
    History(path).close()
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_title_with_a_lone_surrogate_is_refused(store):
    with pytest.raises(InvalidRequest, match="surrogate"):
        store.create("alice", "x \ud800")
    conv = store.create("alice", "ok")
    with pytest.raises(InvalidRequest, match="surrogate"):
        store.rename("alice", conv.id, "\udfff")
    assert store.get("alice", conv.id).title == "ok"


def test_owner_ids_are_random_and_long():
    ids = {new_owner_id() for _ in range(100)}
    assert len(ids) == 100 and all(len(i) >= 32 for i in ids)


def test_text_postgresql_cannot_hold_is_stored_not_refused(store):
    """A reply may hold NUL (a byte-level model can write one); SQLite keeps it, PostgreSQL's text
    cannot, so it is stored as U+FFFD there, and neither fails the write."""
    conv = store.create("alice", "nul")
    store.append("alice", conv.id, StoredMessage("assistant", "a\x00b", "stop"))
    stored = store.get("alice", conv.id).messages[0].content
    assert stored == ("a\ufffdb" if store.dialect == "postgresql" else "a\x00b")


# --- only a shared database (PostgreSQL) -------------------------------------------------------------
MIGRATE_AT_ONCE = textwrap.dedent("""
    import sys, time
    from service.history import History
    start = float(sys.argv[2])
    time.sleep(max(0.0, start - time.time()))  # every process opens the store at the same moment
    store = History(sys.argv[1])
    print(store.version, flush=True)
    store.close()
""")


def test_instances_starting_together_migrate_once():
    """Four processes open a new database at the same instant: one migrates under the advisory lock,
    the others wait for it and find the schema current (without the lock, two would both run
    CREATE TABLE and one would fail)."""
    import time

    with fresh_schema() as url:
        at = time.time() + 3
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", MIGRATE_AT_ONCE, url, str(at)],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(4)
        ]
        results = [p.communicate(timeout=60) for p in procs]
        assert [p.returncode for p in procs] == [0] * 4, [err[-800:] for _, err in results]
        assert [out.strip() for out, _ in results] == [str(len(MIGRATIONS))] * 4
        store = History(url)
        assert count(store, "qwenbox_schema") == 1
        store.close()


def test_two_instances_writing_one_conversation_take_turns():
    """Two stores (two instances' pools) append to one conversation from many threads; a third
    deletes another conversation while replies are still being written to it: every append lands
    once, in order per writer, and a write to the deleted one is `ConversationNotFound`, never a
    database error."""
    from concurrent.futures import ThreadPoolExecutor

    with fresh_schema() as url:
        a, b = History(url), History(url)
        conv = a.create("alice", "busy")

        def write(store: History, who: str) -> None:
            for i in range(20):
                store.append("alice", conv.id, StoredMessage("user", f"{who} {i}"))

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda args: write(*args), [(a, "a"), (b, "b"), (a, "c"), (b, "d")]))
        turns = [m.content for m in b.get("alice", conv.id).messages]
        assert len(turns) == 80
        for who in "abcd":
            assert [t for t in turns if t.startswith(who)] == [f"{who} {i}" for i in range(20)]

        doomed = a.create("alice", "doomed")
        errors: list[BaseException] = []

        def keep_writing() -> None:
            for i in range(200):
                try:
                    b.append("alice", doomed.id, StoredMessage("assistant", f"part {i}"))
                except ConversationNotFound:
                    return
                except BaseException as exc:  # anything else is the bug this test is for
                    errors.append(exc)
                    return

        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(keep_writing)
            a.delete("alice", doomed.id)
            future.result()
        assert errors == []
        with pytest.raises(ConversationNotFound):
            a.get("alice", doomed.id)
        a.close()
        b.close()


def test_tls_follows_the_url_and_the_password_is_never_shown(caplog):
    """sslmode in the URL is libpq's: `require` against this test server (no TLS) refuses to
    connect rather than talk in the clear; and neither `describe()` (the start-up log line) nor the
    failure's log names the password."""
    url = base_url()
    password = urlsplit(url).password
    assert password
    with pytest.raises(HistoryUnavailable):
        History(with_options(url, sslmode="require"))
    assert "server does not support SSL" in caplog.text
    assert password not in caplog.text and "***" in caplog.text
    with fresh_schema() as fresh:
        store = History(fresh)
        assert password not in store.describe() and store.describe().startswith("PostgreSQL postgresql://")
        store.close()
