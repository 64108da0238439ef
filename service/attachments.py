"""Images of stored conversations: files beside the history database, named in the message's meta.

An image a user sent in a stored conversation is written once the model has taken the request
(never for a refused one), as the bytes the client sent, to ``DATA_DIR/images/<conversation>/<sha256>``
(folders 0700, files 0600, like the database: the conversations are private). The user turn's
`meta` (a column every store already has, SQLite or PostgreSQL) lists them as
``{"images": [{"id": sha256, "mime": "image/png", "width": w, "height": h}]}``, so the store itself
needs no new table. Deleting the conversation deletes its folder. An export carries these references
(ids and types), not the bytes: `GET /api/conversations/ID/images/IMAGE` serves each to its owner.

On the next turn of the conversation, the stored images come back as the model's context (the
newest MAX_IMAGES of them), so a follow-up question about the picture sees it again.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Any

from .errors import InvalidRequest
from .images import ImageLimits, Picture, open_picture

_ID = re.compile(r"[0-9a-f]{64}")
_SAFE_CONVERSATION = re.compile(r"[A-Za-z0-9_-]{1,64}")


class Attachments:
    """The image files of stored conversations, under one folder."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def _folder(self, conversation_id: str) -> Path:
        if not _SAFE_CONVERSATION.fullmatch(conversation_id):
            raise InvalidRequest("not a conversation id")
        return self.root / conversation_id

    def save(self, conversation_id: str, turns: list[dict[str, Any]]) -> None:
        """Write the pictures of `turns` (chat turns with "images": [Picture]) and note them in each
        turn's "meta", which the transcript stores with the message."""
        for turn in turns:
            pictures: list[Picture] = turn.get("images") or []
            if not pictures:
                continue
            folder = self._folder(conversation_id)
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            folder.mkdir(mode=0o700, exist_ok=True)
            refs = []
            for picture in pictures:
                digest = hashlib.sha256(picture.data).hexdigest()
                path = folder / digest
                if not path.exists():
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                    with os.fdopen(fd, "wb") as f:
                        f.write(picture.data)
                width, height = picture.original_size
                refs.append({"id": digest, "mime": picture.mime, "width": width, "height": height})
            turn["meta"] = {**(turn.get("meta") or {}), "images": refs}

    def read(self, conversation_id: str, image_id: str) -> bytes | None:
        """An image's bytes, or None when there is no such image."""
        if not _ID.fullmatch(image_id):
            return None
        path = self._folder(conversation_id) / image_id
        try:
            return path.read_bytes()
        except OSError:
            return None

    def context(self, conversation_id: str, turns: list[dict[str, Any]], limits: ImageLimits) -> None:
        """Give stored turns (with their "meta") their pictures back, the newest `limits.max_images`
        at most, less those the new turns bring. A file that has gone is left out."""
        room = limits.max_images - sum(len(t.get("images") or ()) for t in turns if not t.get("meta"))
        for turn in reversed(turns):
            refs = (turn.get("meta") or {}).get("images") or []
            if not refs or turn.get("images"):
                continue
            pictures = []
            for ref in reversed(refs):
                if room <= 0:
                    break
                data = self.read(conversation_id, str(ref.get("id", "")))
                if data is None:
                    continue
                pictures.append(
                    open_picture(
                        data, where="stored image", max_bytes=len(data), max_pixels=limits.max_pixels
                    )
                )
                room -= 1
            turn["images"], turn["stored"] = pictures[::-1], True

    def delete(self, conversation_id: str) -> None:
        """Remove a conversation's images (when the conversation is deleted)."""
        shutil.rmtree(self._folder(conversation_id), ignore_errors=True)
