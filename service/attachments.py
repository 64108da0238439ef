"""Images of stored conversations: kept in the history database, named in their message's meta.

An image a user sent in a stored conversation is stored once the model has taken the request (never
for a refused one), as the bytes the client sent, in the history database's `images` table beside
its message and in the same transaction (`History.append`): SQLite's file or PostgreSQL, so every
instance sharing a PostgreSQL history shows it and gives it back to the model, whichever instance
stored it. The user turn's `meta` lists them as
``{"images": [{"id": sha256, "mime": "image/png", "width": w, "height": h}]}``. An image is deleted
with its conversation (the table's foreign key), and when a truncate leaves no message naming it.
An export carries these references (ids and types), not the bytes:
`GET /api/conversations/ID/images/IMAGE` serves each to its owner.

On the next turn of the conversation, the stored images come back as the model's context (the
newest MAX_IMAGES of them), so a follow-up question about the picture sees it again.

What it costs: each picture its bytes as sent (at most IMAGE_MAX_BYTES, 5 MB; a phone photo's JPEG
is typically 1 to 4 MB), once per conversation however often it is sent. SQLite reuses the pages of
deleted images but does not shrink its file; PostgreSQL stores them compressed out of line (TOAST).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .images import ImageLimits, Picture, open_picture

if TYPE_CHECKING:
    from .history import History


@dataclass(frozen=True)
class StoredImage:
    """A picture of a stored user turn: its SHA-256 (the id its message's meta names), type and bytes."""

    id: str
    mime: str
    data: bytes


def image_refs(meta: Any) -> list[dict[str, Any]]:
    """The well-formed image references of a stored message's meta: `{"id", "mime", ...}` dicts. A
    meta stored before imports were validated may hold anything under "images" (5, true, a ref
    without "mime"): what is not a reference is skipped, so it can never break the conversation."""
    refs = meta.get("images") if isinstance(meta, dict) else None
    if not isinstance(refs, list):
        return []
    return [r for r in refs if isinstance(r, dict) and isinstance(r.get("id"), str) and r["id"]]


def stored_images(turn: dict[str, Any]) -> list[StoredImage]:
    """The pictures of a new chat turn ("images": [Picture]) to store with it; each is noted in the
    turn's "meta", which the transcript stores with the message."""
    pictures: list[Picture] = turn.get("images") or []
    if not pictures or turn.get("stored"):
        return []
    images, refs = [], []
    for picture in pictures:
        digest = hashlib.sha256(picture.data).hexdigest()
        width, height = picture.original_size
        images.append(StoredImage(digest, picture.mime, picture.data))
        refs.append({"id": digest, "mime": picture.mime, "width": width, "height": height})
    turn["meta"] = {**(turn.get("meta") or {}), "images": refs}
    return images


def give_back(
    store: History, owner: str, conversation_id: str, turns: list[dict[str, Any]], limits: ImageLimits
) -> None:
    """Give stored turns (with their "meta") their pictures back, the newest `limits.max_images` at
    most, less those the new turns bring. An image the store no longer has is left out."""
    room = limits.max_images - sum(len(t.get("images") or ()) for t in turns if not t.get("meta"))
    wanted: list[tuple[dict[str, Any], list[str]]] = []
    for turn in reversed(turns):
        refs = image_refs(turn.get("meta"))
        if not refs or turn.get("images") or room <= 0:
            continue
        ids = [r["id"] for r in refs][::-1][:room]
        wanted.append((turn, ids))
        room -= len(ids)
    found = store.images(owner, conversation_id, sorted({i for _, ids in wanted for i in ids}))
    for turn, ids in wanted:
        pictures = [
            open_picture(
                found[i], where="stored image", max_bytes=len(found[i]), max_pixels=limits.max_pixels
            )
            for i in reversed(ids)
            if i in found
        ]
        turn["images"], turn["stored"] = pictures, True
