"""/api/conversations: list, create, read, rename, delete and export a client's own conversations,
and who owns a request (the store and the recording of a chat are `service.history`'s).

Who "owns" a request: a browser is known by a random id in an HttpOnly, SameSite cookie that the
service sets on first visit; an API client without that cookie is known by its access token. Another
owner's conversation answers 404, exactly like one that does not exist.
"""

from __future__ import annotations

import hashlib
import re
from typing import Annotated, Any, Literal, TypeVar

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..attachments import give_back, image_refs
from ..chat import ChatRequest, Content, MaybeContent
from ..errors import ConversationNotFound, HistoryDisabled, ImageNotFound, InvalidRequest
from ..history import DEFAULT_TITLE, TITLE_MAX, History, StoredMessage, Transcript, new_owner_id
from ..history import with_history as stored_chat
from ..images import ImageLimits, sniffed_mime
from .access import bearer_token
from .errors import json_body

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
        raise HistoryDisabled()
    return store


def conversation_id(value: Any) -> str:
    """An id as the store makes them, else `ConversationNotFound` without asking the store."""
    if not isinstance(value, str) or not _CONVERSATION_ID.match(value):
        raise ConversationNotFound(str(value))
    return value


class TitleBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    title: Annotated[Content, Field(max_length=TITLE_MAX)] | None = None


def _title(required: bool) -> str | None:
    data = json_body() if (required or request.content_length) else {}
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object")
    try:
        title = TitleBody.model_validate(data).title
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(map(str, first["loc"])) or "body"
        raise InvalidRequest(f"{where}: {first['msg'].removeprefix('Value error, ')}", param=where) from None
    return title


def _required_title() -> str:
    title = _title(required=True)
    if title is None:
        raise InvalidRequest("title: required", param="title")
    return title


@bp.get("")
def list_conversations() -> Response:
    try:
        limit = int(request.args.get("limit", 20))
    except ValueError:
        raise InvalidRequest("limit: must be a whole number", param="limit") from None
    if not 1 <= limit <= 100:
        raise InvalidRequest("limit: must be between 1 and 100", param="limit")
    query = request.args.get("q") or None
    page, cursor = history().list(
        current_owner(), limit=limit, before=request.args.get("before"), query=query
    )
    return jsonify(data=[c.to_dict() for c in page], next=cursor)


@bp.post("")
def create_conversation() -> tuple[Response, int]:
    title = _title(required=False) or DEFAULT_TITLE
    conv = history().create(current_owner(), title, model=current_app.extensions["models"].active.id)
    return jsonify(conv.to_dict()), 201


@bp.get("/<cid>")
def get_conversation(cid: str) -> Response:
    return jsonify(history().get(current_owner(), conversation_id(cid)).to_dict(with_messages=True))


@bp.patch("/<cid>")
def rename_conversation(cid: str) -> Response:
    title = _required_title()
    return jsonify(history().rename(current_owner(), conversation_id(cid), title).to_dict())


@bp.delete("/<cid>")
def delete_conversation(cid: str) -> tuple[str, int]:
    history().delete(current_owner(), conversation_id(cid))  # its images with it (a foreign key)
    return "", 204


@bp.get("/<cid>/export")
def export_conversation(cid: str) -> Response:
    conv = history().get(current_owner(), conversation_id(cid))
    response = jsonify(conv.to_dict(with_messages=True))
    response.headers["Content-Disposition"] = f'attachment; filename="conversation-{conv.id}.json"'
    return response


def with_history(chat: ChatRequest) -> tuple[ChatRequest, Transcript | None]:
    """`history.with_history` for this request: its store and its owner. A chat that names no
    conversation needs neither (and gives a browser no cookie)."""
    if chat.conversation_id is None:
        return chat, None
    store, owner = history(), current_owner()
    conversation_id(chat.conversation_id)  # a malformed id is not looked up
    full, transcript = stored_chat(chat, store, owner)
    settings = current_app.extensions["settings"]
    limits = ImageLimits(settings.image_max_pixels, settings.max_images, settings.image_max_bytes)
    give_back(store, owner, chat.conversation_id, full.messages, limits)
    return full, transcript


@bp.get("/<cid>/images/<image_id>")
def conversation_image(cid: str, image_id: str) -> Response:
    """An image of the caller's own conversation, as sent (the page's thumbnails after a reload)."""
    store, owner = history(), current_owner()
    conv = store.get(owner, conversation_id(cid))
    named = any(r["id"] == image_id for m in conv.messages for r in image_refs(m.meta))
    data = store.images(owner, conv.id, [image_id]).get(image_id) if named else None
    if data is None:
        raise ImageNotFound()
    # the type its bytes are, never the one a client wrote into the meta (text/html would be a page)
    response = Response(data, mimetype=sniffed_mime(data) or "application/octet-stream")
    response.headers["Cache-Control"] = "private, max-age=86400"
    return response


# --- editing a conversation: truncate (edit and resend), alternatives (regenerate), import ---------
IMPORT_MAX_MESSAGES = 2000
_M = TypeVar("_M", bound=BaseModel)
_REPLY_STATUS = Literal["stop", "length", "cancelled", "error"]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class TruncateBody(_Strict):
    start: Annotated[int, Field(ge=0, alias="from")]


class ImageRef(_Strict):
    """A stored picture's reference, as `attachments.stored_images` writes it."""

    id: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    mime: Literal["image/png", "image/jpeg", "image/webp", "image/gif"]
    width: Annotated[int, Field(ge=1)]
    height: Annotated[int, Field(ge=1)]


Figure = Annotated[float | int, Field(ge=0)] | None


class ReplyMeta(_Strict):
    """What a stored message's meta may hold (what this service writes): never anything else, so a
    conversation read back, imported or regenerated cannot carry a shape that breaks it later (an
    import with `images: 5`, or nested 500 deep, used to make every later request of it a 500)."""

    model: Annotated[str, Field(max_length=256)] | None = None
    usage: dict[Literal["prompt_tokens", "completion_tokens", "total_tokens"], Figure] | None = None
    timing: dict[Literal["queued_s", "ttft_s", "tokens_per_s", "total_s"], Figure] | None = None
    error: Annotated[MaybeContent, Field(max_length=4000)] | None = None
    images: Annotated[list[ImageRef], Field(max_length=64)] | None = None


class Version(_Strict):
    content: MaybeContent
    status: _REPLY_STATUS
    meta: ReplyMeta | None = None


class StoredMeta(ReplyMeta):
    """A reply's meta with its versions (regenerate), as an export holds it."""

    alternatives: Annotated[list[Version], Field(max_length=100)] | None = None
    shown: Annotated[int, Field(ge=0)] | None = None


class AlternativeBody(_Strict):
    content: MaybeContent
    status: _REPLY_STATUS = "stop"
    meta: ReplyMeta | None = None


class ShownBody(_Strict):
    shown: Annotated[int, Field(ge=0)]


class ImportedMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: MaybeContent
    status: Literal["complete", "stop", "length", "cancelled", "error"] = "complete"
    created_at: Annotated[float, Field(ge=0)] = 0.0
    meta: StoredMeta | None = None


class ImportBody(_Strict):
    """An export (`GET /api/conversations/ID/export`) read back: its own id, times and count are
    accepted and ignored (the import is a new conversation of the caller's)."""

    title: Annotated[Content, Field(min_length=1, max_length=TITLE_MAX)]
    messages: Annotated[list[ImportedMessage], Field(max_length=IMPORT_MAX_MESSAGES)]
    id: str | None = None
    created_at: float | None = None
    updated_at: float | None = None
    model: str | None = None
    message_count: int | None = None


def _plain(meta: ReplyMeta | None) -> dict[str, Any] | None:
    return meta.model_dump(exclude_none=True) if meta is not None else None


def _validated(model: type[_M]) -> _M:
    data = json_body()
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(map(str, first["loc"])) or "body"
        raise InvalidRequest(f"{where}: {first['msg'].removeprefix('Value error, ')}", param=where) from None


@bp.post("/<cid>/truncate")
def truncate_conversation(cid: str) -> Response:
    """Edit and resend: the messages from `from` on are deleted; the page then sends the edited question."""
    body = _validated(TruncateBody)
    return jsonify(
        history().truncate(current_owner(), conversation_id(cid), body.start).to_dict(with_messages=True)
    )


@bp.post("/<cid>/alternatives")
def add_alternative(cid: str) -> tuple[Response, int]:
    """Regenerate: a new version of the last reply, shown from now on; the earlier ones are kept."""
    body = _validated(AlternativeBody)
    reply = StoredMessage("assistant", body.content, body.status, meta=_plain(body.meta))
    conv = history().add_alternative(current_owner(), conversation_id(cid), reply)
    return jsonify(conv.to_dict(with_messages=True)), 201


@bp.patch("/<cid>/messages/<int:position>")
def show_alternative(cid: str, position: int) -> Response:
    """Page through a reply's versions: the one shown is the one the chat continues from."""
    body = _validated(ShownBody)
    conv = history().show_alternative(current_owner(), conversation_id(cid), position, body.shown)
    return jsonify(conv.to_dict(with_messages=True))


@bp.post("/import")
def import_conversation() -> tuple[Response, int]:
    """A new conversation of the caller's from an exported JSON (the body limit bounds its size)."""
    body = _validated(ImportBody)
    messages = [
        StoredMessage(m.role, m.content, m.status, m.created_at, _plain(m.meta)) for m in body.messages
    ]
    conv = history().import_conversation(current_owner(), body.title, messages, body.model)
    return jsonify(conv.to_dict(with_messages=True)), 201
