"""Conversation history: a store of conversations, each owned by one client, and the glue that
makes a chat request part of a stored conversation (plain Python: the routes and the owner cookie are
`web/conversations.py`'s).

Two databases behind one class. SQLite by default: one file on the data volume, no server to run,
transactions that survive a killed process (WAL journal). PostgreSQL when DATABASE_URL names one
(`service/database.py` connects): several instances behind a load balancer then share one history,
so a conversation started on one is continued on another. The same SQL serves both but for a few
words (`Dialect`); the schema is versioned (SQLite's `PRAGMA user_version`, PostgreSQL's one-row
`qwenbox_schema` table) and migrated at start by the same `MIGRATIONS`.
Every read and write takes the owner, so one client can never reach another's conversations:
a conversation that is not yours is simply not found (`ConversationNotFound`).

A chat request that names a conversation (`with_history`) is answered with the stored turns as its
context, and a `Transcript` records the exchange: the new turns once the model has taken the request,
the reply once it has ended, however it ended. The first turn titles a new conversation.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .attachments import StoredImage, image_refs, stored_images
from .chat import ChatRequest
from .database import Connection, Database, Migration, SQLiteDatabase, open_database
from .errors import ConversationNotFound, InvalidRequest
from .inference.engine import Finished

# Each entry moves the schema from version i to i + 1, on SQLite and PostgreSQL alike. Never edit one
# that has shipped: add another. A plain string runs as it is on both (write portable SQL: TEXT,
# INTEGER, ALTER TABLE ... ADD COLUMN); a `Migration(sqlite=..., postgresql=...)` where they differ.
MIGRATIONS: list[str | Migration] = [
    Migration(
        sqlite="""
        CREATE TABLE conversations (
            id TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            title TEXT NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        );
        CREATE INDEX conversations_by_owner ON conversations (owner, updated_at DESC, id);
        CREATE TABLE messages (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
            role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
            content TEXT NOT NULL,
            created_at REAL NOT NULL
        );
        CREATE INDEX messages_by_conversation ON messages (conversation_id, id);
        """,
        # PostgreSQL's REAL is 4 bytes (a timestamp to the minute): DOUBLE PRECISION is SQLite's
        # REAL. Ids compare bytewise (COLLATE "C"), as SQLite's do, so paging cursors agree.
        postgresql="""
        CREATE TABLE conversations (
            id TEXT COLLATE "C" PRIMARY KEY,
            owner TEXT NOT NULL,
            title TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL
        );
        CREATE INDEX conversations_by_owner ON conversations (owner, updated_at DESC, id);
        CREATE TABLE messages (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            conversation_id TEXT COLLATE "C" NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
            role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
            content TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL
        );
        CREATE INDEX messages_by_conversation ON messages (conversation_id, id);
        """,
    ),
    """
    ALTER TABLE messages ADD COLUMN status TEXT NOT NULL DEFAULT 'complete';
    ALTER TABLE messages ADD COLUMN meta TEXT;
    ALTER TABLE conversations ADD COLUMN model TEXT;
    """,
    # The images of stored user turns (service/attachments.py), in the database beside their messages
    # so that every instance sharing a PostgreSQL history can show them; one row per picture and
    # conversation (`id` is the bytes' SHA-256), dropped with the conversation and when no message
    # refers to it any longer.
    Migration(
        sqlite="""
        CREATE TABLE images (
            conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
            id TEXT NOT NULL,
            mime TEXT NOT NULL,
            data BLOB NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (conversation_id, id)
        );
        """,
        postgresql="""
        CREATE TABLE images (
            conversation_id TEXT COLLATE "C" NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
            id TEXT COLLATE "C" NOT NULL,
            mime TEXT NOT NULL,
            data BYTEA NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (conversation_id, id)
        );
        """,
    ),
]

TITLE_MAX = 200
DEFAULT_TITLE = "New chat"


@dataclass
class StoredMessage:
    role: str
    content: str
    status: str = "complete"  # complete | stop | length | cancelled | error
    created_at: float = 0.0
    meta: dict[str, Any] | None = None


@dataclass
class Conversation:
    id: str
    title: str
    created_at: float
    updated_at: float
    model: str | None = None
    message_count: int = 0
    messages: list[StoredMessage] = field(default_factory=list)

    def to_dict(self, with_messages: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not with_messages:
            d.pop("messages")
        return d


# `History.list` shadows the builtin inside the class: its annotations use these names.
_Ids = list[int]
_Versions = list[dict[str, Any]]
_Messages = list[StoredMessage]


def new_owner_id() -> str:
    """A random, unguessable owner id for a browser cookie."""
    return secrets.token_urlsafe(24)


class History:
    """The store, over a SQLite file (a path) or PostgreSQL (a postgresql:// URL), migrated on open."""

    def __init__(self, location: Path | str):
        self._db: Database = open_database(location)
        self.path = self._db.path if isinstance(self._db, SQLiteDatabase) else None
        self.dialect = self._db.dialect
        try:
            self.migrate()
        except BaseException:
            self._db.close()
            raise

    def describe(self) -> str:
        """Where the history is kept, for the log (a URL without its password)."""
        return self._db.describe()

    @property
    def version(self) -> int:
        return self._db.version

    def migrate(self) -> None:
        """Bring the schema to the newest version (several instances may start at once)."""
        self._db.migrate(MIGRATIONS)

    def close(self) -> None:
        self._db.close()

    def _tx(self) -> AbstractContextManager[Connection]:
        return self._db.transaction()

    # --- conversations -----------------------------------------------------------------------------
    def create(self, owner: str, title: str = DEFAULT_TITLE, model: str | None = None) -> Conversation:
        now = time.time()
        conv = Conversation(secrets.token_hex(12), _title(title), now, now, model)
        with self._tx() as db:
            db.execute(
                "INSERT INTO conversations (id, owner, title, created_at, updated_at, model) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (conv.id, owner, conv.title, now, now, model),
            )
        return conv

    def list(
        self, owner: str, *, limit: int = 20, before: str | None = None, query: str | None = None
    ) -> tuple[list[Conversation], str | None]:
        """Newest first. `before` is the cursor the previous page returned; `query` filters titles."""
        sql = (
            "SELECT c.*, (SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id) AS n "
            "FROM conversations c WHERE owner = ?"
        )
        args: list[Any] = [owner]
        if before:
            updated, _, conv_id = before.partition("_")
            try:
                args += [float(updated), float(updated), conv_id]
            except ValueError:
                raise InvalidRequest("before: not a cursor this service returned", param="before") from None
            sql += " AND (updated_at < ? OR (updated_at = ? AND id < ?))"
        if query:
            sql += f" AND title {self._db.like} ? ESCAPE '\\'"
            args.append("%" + query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%")
        sql += " ORDER BY updated_at DESC, id DESC LIMIT ?"
        args.append(limit + 1)
        with self._db.read() as db:
            rows = db.execute(sql, args).fetchall()
        page = [_conversation(r, r["n"]) for r in rows[:limit]]
        cursor = f"{page[-1].updated_at!r}_{page[-1].id}" if len(rows) > limit else None
        return page, cursor

    def get(self, owner: str, conversation_id: str) -> Conversation:
        with self._db.read() as db:
            row = self._find(db, owner, conversation_id)
            if row is None:
                raise ConversationNotFound(conversation_id)
            messages = db.execute(
                "SELECT role, content, status, created_at, meta FROM messages "
                "WHERE conversation_id = ? ORDER BY id",
                (conversation_id,),
            ).fetchall()
        conv = _conversation(row, len(messages))
        conv.messages = [
            StoredMessage(
                m["role"],
                m["content"],
                m["status"],
                m["created_at"],
                json.loads(m["meta"]) if m["meta"] else None,
            )
            for m in messages
        ]
        return conv

    def rename(self, owner: str, conversation_id: str, title: str) -> Conversation:
        with self._tx() as db:
            cur = db.execute(
                "UPDATE conversations SET title = ? WHERE id = ? AND owner = ?",
                (_title(title), conversation_id, owner),
            )
            if cur.rowcount == 0:
                raise ConversationNotFound(conversation_id)
        return self.get(owner, conversation_id)

    def delete(self, owner: str, conversation_id: str) -> None:
        with self._tx() as db:
            cur = db.execute("DELETE FROM conversations WHERE id = ? AND owner = ?", (conversation_id, owner))
            if cur.rowcount == 0:
                raise ConversationNotFound(conversation_id)

    def append(
        self, owner: str, conversation_id: str, message: StoredMessage, images: Sequence[StoredImage] = ()
    ) -> None:
        """Add one whole message (a reply is appended once, when it has ended, never in parts), with
        the pictures its meta refers to, in one transaction (a picture already stored is kept)."""
        now = time.time()
        with self._tx() as db:
            if self._find(db, owner, conversation_id, lock=True) is None:
                raise ConversationNotFound(conversation_id)
            if images:
                db.executemany(
                    "INSERT INTO images (conversation_id, id, mime, data, created_at) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT (conversation_id, id) DO NOTHING",
                    [(conversation_id, i.id, i.mime, i.data, now) for i in images],
                )
            db.execute(
                "INSERT INTO messages (conversation_id, role, content, status, created_at, meta) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    conversation_id,
                    message.role,
                    message.content,
                    message.status,
                    now,
                    json.dumps(message.meta) if message.meta else None,
                ),
            )
            db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (now, conversation_id))

    def images(self, owner: str, conversation_id: str, image_ids: Sequence[str]) -> dict[str, bytes]:
        """The bytes of those of `image_ids` that `owner`'s conversation holds, by id."""
        if not image_ids:
            return {}
        marks = ", ".join("?" for _ in image_ids)
        with self._db.read() as db:
            rows = db.execute(
                "SELECT i.id, i.data FROM images i JOIN conversations c ON c.id = i.conversation_id "
                f"WHERE c.id = ? AND c.owner = ? AND i.id IN ({marks})",
                (conversation_id, owner, *image_ids),
            ).fetchall()
        return {r["id"]: bytes(r["data"]) for r in rows}

    def image_bytes(self, conversation_id: str | None = None) -> int:
        """What the stored pictures take in the database (of one conversation, or all): for tests
        and the operator's question "how big has it grown"."""
        sql, args = "SELECT COALESCE(SUM(LENGTH(data)), 0) AS n FROM images", []
        if conversation_id is not None:
            sql, args = sql + " WHERE conversation_id = ?", [conversation_id]
        with self._db.read() as db:
            return int(db.execute(sql, args).fetchone()["n"])

    @staticmethod
    def _drop_unreferenced_images(db: Connection, conversation_id: str) -> None:
        """Delete the conversation's pictures that no message's meta names any longer (after a
        truncate), so nothing stays behind that the chat cannot show."""
        kept = {
            ref["id"]
            for row in db.execute("SELECT meta FROM messages WHERE conversation_id = ?", (conversation_id,))
            if row["meta"]
            for ref in image_refs(json.loads(row["meta"]))
        }
        sql, args = "DELETE FROM images WHERE conversation_id = ?", [conversation_id]
        if kept:
            sql += f" AND id NOT IN ({', '.join('?' for _ in kept)})"
            args += sorted(kept)
        db.execute(sql, args)

    def _find(self, db: Connection, owner: str, conversation_id: str, *, lock: bool = False) -> Any:
        """The conversation's row if `owner` has it. With `lock`, inside a write, PostgreSQL holds the
        row until the transaction ends, so two instances editing one conversation take turns (and a
        delete cannot slip between the check and the write), as SQLite's one writer does."""
        return db.execute(
            "SELECT * FROM conversations WHERE id = ? AND owner = ?" + (self._db.for_update if lock else ""),
            (conversation_id, owner),
        ).fetchone()

    # --- editing a conversation: truncate (edit and resend), alternatives (regenerate), import -----
    def _message_ids(self, db: Connection, owner: str, conversation_id: str) -> _Ids:
        if self._find(db, owner, conversation_id, lock=True) is None:
            raise ConversationNotFound(conversation_id)
        rows = db.execute("SELECT id FROM messages WHERE conversation_id = ? ORDER BY id", (conversation_id,))
        return [r["id"] for r in rows]

    def truncate(self, owner: str, conversation_id: str, start: int) -> Conversation:
        """Delete the messages from position `start` (0-based, as `get` lists them) to the end: an
        edited question is resent from there, and what followed it no longer belongs to the chat."""
        with self._tx() as db:
            ids = self._message_ids(db, owner, conversation_id)
            if not 0 <= start < len(ids):
                raise InvalidRequest(
                    f"from: must be a message position, 0 to {len(ids) - 1}" if ids else "from: no messages",
                    param="from",
                )
            db.execute(
                "DELETE FROM messages WHERE conversation_id = ? AND id >= ?", (conversation_id, ids[start])
            )
            self._drop_unreferenced_images(db, conversation_id)
            db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (time.time(), conversation_id))
        return self.get(owner, conversation_id)

    def add_alternative(self, owner: str, conversation_id: str, reply: StoredMessage) -> Conversation:
        """A regenerated reply: it becomes the shown version of the last reply, and every earlier
        version stays in its `meta.alternatives` (a reload pages through the same versions)."""
        with self._tx() as db:
            ids = self._message_ids(db, owner, conversation_id)
            last = db.execute("SELECT * FROM messages WHERE id = ?", (ids[-1],)).fetchone() if ids else None
            if last is None or last["role"] != "assistant":
                raise InvalidRequest(
                    "only the last reply can be regenerated, and this chat ends with a question"
                )
            versions = _versions(last)
            versions.append(_version(reply.content, reply.status, reply.meta))
            self._show(db, last["id"], versions, len(versions) - 1)
        return self.get(owner, conversation_id)

    def show_alternative(self, owner: str, conversation_id: str, position: int, shown: int) -> Conversation:
        """Show version `shown` of the reply at `position`: it is what the next turn continues from."""
        with self._tx() as db:
            ids = self._message_ids(db, owner, conversation_id)
            if not 0 <= position < len(ids):
                raise ConversationNotFound(conversation_id)
            row = db.execute("SELECT * FROM messages WHERE id = ?", (ids[position],)).fetchone()
            versions = _versions(row)
            if row["role"] != "assistant" or not 0 <= shown < len(versions):
                raise InvalidRequest(f"shown: must be 0 to {len(versions) - 1}", param="shown")
            self._show(db, row["id"], versions, shown)
        return self.get(owner, conversation_id)

    @staticmethod
    def _show(db: Connection, message_id: int, versions: _Versions, shown: int) -> None:
        chosen = versions[shown]
        meta = dict(chosen["meta"] or {})
        meta.update(alternatives=versions, shown=shown)
        db.execute(
            "UPDATE messages SET content = ?, status = ?, meta = ? WHERE id = ?",
            (chosen["content"], chosen["status"], json.dumps(meta), message_id),
        )

    def import_conversation(
        self, owner: str, title: str, messages: _Messages, model: str | None = None
    ) -> Conversation:
        """A new conversation of `owner` holding `messages` (an export read back), in one transaction."""
        conv = Conversation(secrets.token_hex(12), _title(title), 0.0, 0.0, model)
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT INTO conversations (id, owner, title, created_at, updated_at, model) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (conv.id, owner, conv.title, now, now, model),
            )
            db.executemany(
                "INSERT INTO messages (conversation_id, role, content, status, created_at, meta) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (
                        conv.id,
                        m.role,
                        m.content,
                        m.status,
                        m.created_at or now,
                        json.dumps(m.meta) if m.meta else None,
                    )
                    for m in messages
                ],
            )
        return self.get(owner, conv.id)


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _title(title: str) -> str:
    title = " ".join(title.split())
    if not title:
        raise InvalidRequest("title: must not be blank", param="title")
    if _LONE_SURROGATE.search(title):
        raise InvalidRequest("title: holds a lone UTF-16 surrogate, which is not text", param="title")
    if len(title) > TITLE_MAX:
        raise InvalidRequest(f"title: must be at most {TITLE_MAX} characters", param="title")
    return title


def _conversation(row: Any, count: int) -> Conversation:
    return Conversation(row["id"], row["title"], row["created_at"], row["updated_at"], row["model"], count)


_REPLY_STATUSES = ("complete", "stop", "length", "cancelled", "error")


def _version(content: str, status: str, meta: dict[str, Any] | None) -> dict[str, Any]:
    meta = {k: v for k, v in (meta or {}).items() if k not in ("alternatives", "shown")}
    return {"content": content, "status": status, "meta": meta or None}


def _versions(row: Any) -> list[dict[str, Any]]:
    """Every version of a stored reply: its `meta.alternatives`, or the reply alone."""
    meta = json.loads(row["meta"]) if row["meta"] else {}
    versions = meta.get("alternatives")
    if isinstance(versions, list):  # an imported file may hold anything here: keep what is sound
        versions = [
            _version(v["content"], v["status"], v.get("meta") if isinstance(v.get("meta"), dict) else None)
            for v in versions
            if isinstance(v, dict)
            and isinstance(v.get("content"), str)
            and v.get("status") in _REPLY_STATUSES
        ]
        if versions:
            return versions
    return [_version(row["content"], row["status"], meta)]


# --- a chat request inside a stored conversation -----------------------------------------------------
class Transcript:
    """Writes one exchange of a stored conversation: the new turns once the model has taken the
    request, the reply once it has ended (however it ended)."""

    def __init__(self, store: History, owner: str, conversation_id: str, new_turns: list[dict[str, Any]]):
        self.store, self.owner, self.id, self.new_turns = store, owner, conversation_id, new_turns
        self._done = False

    def accepted(self) -> None:
        for turn in self.new_turns:
            images = stored_images(turn)  # a user turn's pictures, named in its meta
            message = StoredMessage(turn["role"], turn["content"], meta=turn.get("meta"))
            self.store.append(self.owner, self.id, message, images)
        if self.new_turns:
            conv = self.store.get(self.owner, self.id)
            if conv.title == DEFAULT_TITLE:
                title = auto_title(self.new_turns[0]["content"]) or "Image"
                self.store.rename(self.owner, self.id, title)

    def reply(self, text: str, finished: Finished | None, model: str) -> None:
        """Store the reply; `finished` is None when the client left before the end."""
        if self._done:
            return
        self._done = True
        status = finished.finish_reason if finished else "cancelled"
        meta: dict[str, Any] = {"model": model}
        if finished:
            meta.update(usage=finished.usage.to_dict(), timing=finished.timing.to_dict())
            if finished.error:
                meta["error"] = finished.error
        try:
            self.store.append(self.owner, self.id, StoredMessage("assistant", text, status, meta=meta))
        except ConversationNotFound:  # deleted while the reply was being written: nothing to add it to
            pass


def with_history(chat: ChatRequest, store: History, owner: str) -> tuple[ChatRequest, Transcript | None]:
    """For a request naming a conversation: the stored turns become its context, and a
    `Transcript` records the exchange. Without one, the request goes through unchanged.
    Raises `ConversationNotFound` when `owner` has no such conversation."""
    if chat.conversation_id is None:
        return chat, None
    conv = store.get(owner, chat.conversation_id)
    system = chat.messages[:1] if chat.messages[0]["role"] == "system" else []
    new_turns = chat.messages[len(system) :]
    stored = [
        {"role": m.role, "content": m.content, **({"meta": m.meta} if _has_images(m) else {})}
        for m in conv.messages
        if (m.content.strip() or _has_images(m)) and m.status != "error" and m.role != "system"
    ]
    full = replace(chat, messages=system + stored + new_turns)
    return full, Transcript(store, owner, conv.id, new_turns)


def _has_images(message: StoredMessage) -> bool:
    """A user turn that carried images (their references are in its meta: service/attachments.py)."""
    return message.role == "user" and bool(image_refs(message.meta))


def auto_title(text: str, limit: int = 60) -> str:
    """A new conversation's title: its first message on one line, cut at `limit` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"
