"""/api/conversations: list, create, read, rename, delete and export a client's own conversations.

Who "owns" a request: a browser is known by a random id in an HttpOnly, SameSite cookie that the
service sets on first visit; an API client without that cookie is known by its access token. Another
owner's conversation answers 404, exactly like one that does not exist.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import replace
from typing import Annotated, Any

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..chat import ChatRequest, Content, RequestError
from ..history import DEFAULT_TITLE, TITLE_MAX, History, NotFound, StoredMessage, new_owner_id
from ..inference.engine import Finished
from .access import bearer_token
from .sse import json_body

bp = Blueprint("history", __name__, url_prefix="/api/conversations")

COOKIE = "qwenbox_owner"
_COOKIE_VALUE = re.compile(r"^[A-Za-z0-9_-]{32}$")
_CONVERSATION_ID = re.compile(r"^[0-9a-f]{24}$")
COOKIE_MAX_AGE = 2 * 365 * 24 * 3600


def current_owner() -> str:
    """The owner of this request; a browser without a valid cookie is given a new one."""
    if "owner" in g:
        return g.owner
    cookie = request.cookies.get(COOKIE, "")
    token = bearer_token()
    if _COOKIE_VALUE.match(cookie):
        g.owner = f"browser:{cookie}"
    elif token:
        g.owner = f"token:{hashlib.sha256(token.encode()).hexdigest()[:32]}"
    else:
        g.new_cookie = new_owner_id()
        g.owner = f"browser:{g.new_cookie}"
    return g.owner


def install_owner_cookie(app: Flask) -> None:
    """Set the owner cookie on the response whenever this request minted one."""

    @app.after_request
    def set_cookie(response: Response) -> Response:
        if "new_cookie" in g:
            response.set_cookie(
                COOKIE,
                g.new_cookie,
                max_age=COOKIE_MAX_AGE,
                httponly=True,
                samesite="Strict",
                secure=request.is_secure,
                path="/",
            )
        return response


def history() -> History:
    """The store, or 404 in private mode (the service keeps nothing, so there is nothing to find)."""
    store = current_app.extensions.get("history")
    if store is None:
        raise RequestError(
            404,
            "history is off on this service (private mode): nothing is stored",
            kind="not_found",
            code="history_disabled",
        )
    return store


def conversation_id(value: Any) -> str:
    if not isinstance(value, str) or not _CONVERSATION_ID.match(value):
        raise RequestError(404, "no such conversation", kind="not_found")
    return value


def not_found() -> RequestError:
    return RequestError(404, "no such conversation", kind="not_found")


class TitleBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    title: Annotated[Content, Field(max_length=TITLE_MAX)] | None = None


def _title(required: bool) -> str | None:
    data = json_body() if (required or request.content_length) else {}
    if not isinstance(data, dict):
        raise RequestError(422, "the body must be a JSON object")
    try:
        title = TitleBody.model_validate(data).title
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(map(str, first["loc"])) or "body"
        raise RequestError(
            422, f"{where}: {first['msg'].removeprefix('Value error, ')}", param=where
        ) from None
    if required and title is None:
        raise RequestError(422, "title: required", param="title")
    return title


@bp.get("")
def list_conversations() -> Response:
    try:
        limit = int(request.args.get("limit", 20))
    except ValueError:
        raise RequestError(422, "limit: must be a whole number", param="limit") from None
    if not 1 <= limit <= 100:
        raise RequestError(422, "limit: must be between 1 and 100", param="limit")
    query = request.args.get("q") or None
    try:
        page, cursor = history().list(
            current_owner(), limit=limit, before=request.args.get("before"), query=query
        )
    except ValueError:
        raise RequestError(422, "before: not a cursor this service returned", param="before") from None
    return jsonify(data=[c.to_dict() for c in page], next=cursor)


@bp.post("")
def create_conversation() -> tuple[Response, int]:
    title = _title(required=False) or DEFAULT_TITLE
    conv = history().create(current_owner(), title, model=current_app.extensions["models"].active.id)
    return jsonify(conv.to_dict()), 201


@bp.get("/<cid>")
def get_conversation(cid: str) -> Response:
    try:
        return jsonify(history().get(current_owner(), conversation_id(cid)).to_dict(with_messages=True))
    except NotFound:
        raise not_found() from None


@bp.patch("/<cid>")
def rename_conversation(cid: str) -> Response:
    title = _title(required=True)
    try:
        return jsonify(history().rename(current_owner(), conversation_id(cid), title).to_dict())
    except NotFound:
        raise not_found() from None


@bp.delete("/<cid>")
def delete_conversation(cid: str) -> tuple[str, int]:
    try:
        history().delete(current_owner(), conversation_id(cid))
    except NotFound:
        raise not_found() from None
    return "", 204


@bp.get("/<cid>/export")
def export_conversation(cid: str) -> Response:
    try:
        conv = history().get(current_owner(), conversation_id(cid))
    except NotFound:
        raise not_found() from None
    response = jsonify(conv.to_dict(with_messages=True))
    response.headers["Content-Disposition"] = f'attachment; filename="conversation-{conv.id}.json"'
    return response


class Transcript:
    """Writes one exchange of a stored conversation: the new turns once the model has taken the
    request, the reply once it has ended (however it ended)."""

    def __init__(self, store: History, owner: str, conversation_id: str, new_turns: list[dict[str, str]]):
        self.store, self.owner, self.id, self.new_turns = store, owner, conversation_id, new_turns
        self._done = False

    def accepted(self) -> None:
        for turn in self.new_turns:
            self.store.append(self.owner, self.id, StoredMessage(turn["role"], turn["content"]))
        if self.new_turns:
            conv = self.store.get(self.owner, self.id)
            if conv.title == DEFAULT_TITLE:
                self.store.rename(self.owner, self.id, _auto_title(self.new_turns[0]["content"]))

    def reply(self, text: str, finished: Finished | None, model: str) -> None:
        """Store the reply; `finished` is None when the client left before the end."""
        if self._done:
            return
        self._done = True
        status = finished.finish_reason if finished else "cancelled"
        meta = {"model": model}
        if finished:
            meta.update(usage=finished.usage.to_dict(), timing=finished.timing.to_dict())
            if finished.error:
                meta["error"] = finished.error
        try:
            self.store.append(self.owner, self.id, StoredMessage("assistant", text, status, meta=meta))
        except NotFound:  # deleted while the reply was being written: nothing left to add it to
            pass


def with_history(chat: ChatRequest) -> tuple[ChatRequest, Transcript | None]:
    """For a request naming a conversation: the stored turns become its context, and a
    `Transcript` records the exchange. Without one, the request goes through unchanged."""
    if chat.conversation_id is None:
        return chat, None
    store, owner = history(), current_owner()
    try:
        conv = store.get(owner, conversation_id(chat.conversation_id))
    except NotFound:
        raise not_found() from None
    system = chat.messages[:1] if chat.messages[0]["role"] == "system" else []
    new_turns = chat.messages[len(system) :]
    stored = [
        {"role": m.role, "content": m.content}
        for m in conv.messages
        if m.content.strip() and m.status != "error" and m.role != "system"
    ]
    full = replace(chat, messages=system + stored + new_turns)
    return full, Transcript(store, owner, conv.id, new_turns)


def _auto_title(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"
