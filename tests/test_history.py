"""The history store on its own: ownership, paging, search, migrations, and surviving kill -9."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from service.errors import ConversationNotFound, InvalidRequest
from service.history import MIGRATIONS, History, StoredMessage, new_owner_id
from tests.support.paths import ROOT


@pytest.fixture
def store(tmp_path):
    h = History(tmp_path / "history.db")
    yield h
    h.close()


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
    with sqlite3.connect(store.path) as db:
        assert db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0


def test_migrates_a_database_from_the_first_schema(tmp_path):
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.executescript(MIGRATIONS[0])
        db.execute("PRAGMA user_version = 1")
        db.execute("INSERT INTO conversations VALUES ('c1', 'alice', 'kept', 1.0, 2.0)")
        db.execute(
            "INSERT INTO messages (conversation_id, role, content, created_at) "
            "VALUES ('c1', 'user', 'still here', 1.5)"
        )
    store = History(path)
    assert store.version == len(MIGRATIONS)
    conv = store.get("alice", "c1")
    assert conv.title == "kept" and conv.model is None
    assert [(m.content, m.status) for m in conv.messages] == [("still here", "complete")]
    store.close()
    assert History(path).version == len(MIGRATIONS)  # opening again changes nothing


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


def test_a_writer_killed_mid_conversation_loses_nothing_it_committed(tmp_path):
    path = tmp_path / "history.db"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    conv_id = writer.stdout.readline().strip()
    confirmed = [int(writer.stdout.readline()) for _ in range(200)][-1]
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    store = History(path)
    turns = [m.content for m in store.get("alice", conv_id).messages]
    assert len(turns) >= confirmed + 1
    assert turns[: confirmed + 1] == [f"turn {i}" for i in range(confirmed + 1)]


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
