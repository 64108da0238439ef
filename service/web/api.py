"""The native JSON API: /api/health, /api/chat (plain JSON or a server-sent event stream), /api/models.

Thin by design: parse and validate the request (`chat`), start it (`chat.start`), and format what
comes back; a request naming a conversation is recorded (`history`). Everything here is about HTTP;
nothing here touches tensors, and errors are raised as they are and worded by `web/errors.py`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Annotated, Any

from flask import Blueprint, Response, current_app, jsonify, request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..chat import parse_chat_request, start
from ..config import Settings
from ..errors import GenerationFailed, HistoryUnavailable, InvalidRequest
from ..history import Transcript
from ..images import ImageLimits
from ..inference.engine import Finished, Generation
from ..models import ModelManager
from . import disconnect, sse
from .access import token_ok
from .conversations import with_history
from .errors import answer, json_body

log = logging.getLogger(__name__)

bp = Blueprint("api", __name__, url_prefix="/api")


def models() -> ModelManager:
    return current_app.extensions["models"]


def _settings() -> Settings:
    return current_app.extensions["settings"]


@bp.get("/health")
def health() -> tuple[Response, int]:
    """Never touches the model's queue, so it answers at once even mid-generation. Open to all, so
    it names the model by its public id only (never its folder on disk); why a load failed (which
    may quote paths) is shown only to a caller the access token would admit."""
    state, offer, engine = models().status()
    if state == "ok" and engine is not None:
        return jsonify(
            status="ok",
            model=offer.id,
            model_id=offer.id,
            context_length=engine.context_length,
            history="history" in current_app.extensions,
            queue=engine.stats(),
        ), 200
    if state == "error":
        detail = offer.error or (engine.error if engine else None)
        if not token_ok(_settings()):
            detail = "the model failed to load; the server log says why"
        return jsonify(status="error", model=offer.id, model_id=offer.id, detail=detail), 503
    return jsonify(status="loading", model=offer.id, model_id=offer.id), 503


@bp.get("/models")
def list_models() -> Response:
    s = _settings()
    limits = {"max_images": s.max_images, "max_bytes": s.image_max_bytes, "max_pixels": s.image_max_pixels}
    active, data = models().describe()
    return jsonify(active=active, data=data, image_limits=limits)


class SelectBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    model: Annotated[str, Field(min_length=1, max_length=500)]


@bp.post("/models/active")
def select_model() -> tuple[Response, int]:
    """Switch the model that answers: 200 if it is loaded, 202 while it loads in the background."""
    try:
        body = SelectBody.model_validate(json_body())
    except ValidationError as exc:
        raise InvalidRequest(
            'give {"model": ID} with one of the ids from GET /api/models', param="model"
        ) from exc
    offer = models().select(body.model)
    status = 200 if offer.state == "loaded" else 202
    return jsonify(active=models().active.id, model=offer.id, state=offer.state), status


def image_limits(settings: Settings) -> ImageLimits:
    return ImageLimits(settings.image_max_pixels, settings.max_images, settings.image_max_bytes)


def _summary(finished: Finished, model: str, dropped: int) -> dict[str, Any]:
    return {
        "model": model,
        "finish_reason": finished.finish_reason,
        "usage": finished.usage.to_dict(),
        "timing": finished.timing.to_dict(),
        "context": {"dropped_messages": dropped},
    }


@bp.post("/chat")
def chat() -> Response | tuple[Response, int]:
    settings = _settings()
    parsed = parse_chat_request(
        json_body(settings.image_body_bytes),
        default_max_tokens=settings.default_max_tokens,
        max_tokens_limit=settings.max_tokens_limit,
        images=image_limits(settings),
    )
    parsed, transcript = with_history(parsed)
    started = start(models(), parsed)
    generation, model, dropped = started.generation, started.model, started.dropped_messages
    if transcript:
        transcript.accepted()
    gone = disconnect.watcher(request.environ)
    if parsed.stream:
        return sse.response(_event_stream(generation, model, dropped, transcript, gone))
    try:
        text, finished = generation.result(abandoned=gone)
    finally:
        generation.cancel()
    saved = _store_reply(transcript, text, finished, model)
    if finished.error:
        raise GenerationFailed(finished.error)
    body = {"message": {"role": "assistant", "content": text}, **_summary(finished, model, dropped)}
    if not saved:
        body["saved"] = False
    return jsonify(body), 200


def _store_reply(transcript: Transcript | None, text: str, finished: Finished | None, model: str) -> bool:
    """Record the reply; False when the history database cannot take it now: the client still gets
    the reply and is told it was not kept (it is never lost without a word)."""
    if transcript is None:
        return True
    try:
        transcript.reply(text, finished, model)
    except HistoryUnavailable:
        log.warning(
            "a reply of %d characters could not be stored: the history database is unreachable", len(text)
        )
        return False
    return True


def _event_stream(
    generation: Generation,
    model: str,
    dropped: int,
    transcript: Transcript | None,
    gone: Callable[[], bool],
) -> Iterator[str]:
    """One `delta` event per piece of text, then `done`. Closing the connection cancels the
    generation: `gone` sees it within a fraction of a second (even while the request is queued and
    nothing is written), else the server on its next write; `finally` runs when it closes us."""
    parts: list[str] = []
    finished: Finished | None = None
    try:
        yield ": stream open\n\n"
        for event in generation.events(heartbeat=sse.HEARTBEAT_SECONDS, abandoned=gone):
            if event is None:
                yield sse.KEEP_ALIVE
            elif isinstance(event, str):
                parts.append(event)
                yield sse.data({"type": "delta", "text": event})
            else:
                finished = event
                # stored before `done` goes out, so a reload right after finds it
                saved = _store_reply(transcript, "".join(parts), finished, model)
                if event.error:
                    failed = answer(GenerationFailed(event.error))
                    yield sse.data(
                        {"type": "error", "error": {"message": failed.message, "type": failed.kind}}
                    )
                if not saved:
                    unsaved = answer(HistoryUnavailable())
                    yield sse.data(
                        {
                            "type": "error",
                            "error": {
                                "message": f"the reply was not saved: {unsaved.message}",
                                "type": unsaved.kind,
                                "code": "reply_not_saved",
                            },
                        }
                    )
                summary = _summary(event, model, dropped)
                yield sse.data({"type": "done", **summary, **({} if saved else {"saved": False})})
    finally:
        generation.cancel()
        if finished is None:  # the client left first: keep what was said (a second try is a no-op)
            _store_reply(transcript, "".join(parts), finished, model)
