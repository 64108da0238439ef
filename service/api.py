"""The native JSON API: /api/health and /api/chat (plain JSON or a server-sent event stream).

Thin by design: parse and validate the request (`chat`), build the prompt, hand it to the engine,
and format what comes back. Everything here is about HTTP; nothing here touches tensors.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, current_app, jsonify

from .chat import RequestError, parse_chat_request, start
from .config import Settings
from .engine import Engine, Finished, Generation
from .history_api import Transcript, with_history
from .http import json_body

bp = Blueprint("api", __name__, url_prefix="/api")

HEARTBEAT_SECONDS = 10.0


def _engine() -> Engine:
    return current_app.extensions["engine"]


def _settings() -> Settings:
    return current_app.extensions["settings"]


@bp.get("/health")
def health() -> tuple[Response, int]:
    """Never touches the model's queue, so it answers at once even mid-generation."""
    engine = _engine()
    if engine.state == "ok":
        return jsonify(status="ok", model=engine.backend.name,
                       context_length=engine.backend.context_length,
                       history="history" in current_app.extensions, queue=engine.stats()), 200
    if engine.state == "error":
        return jsonify(status="error", model=_settings().model_id, detail=engine.error), 503
    return jsonify(status="loading", model=_settings().model_id), 503


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
    parsed = parse_chat_request(json_body(), default_max_tokens=settings.default_max_tokens,
                                max_tokens_limit=settings.max_tokens_limit)
    parsed, transcript = with_history(parsed)
    started = start(_engine(), parsed)
    generation, model, dropped = started.generation, started.model, started.dropped_messages
    if transcript:
        transcript.accepted()
    if parsed.stream:
        return Response(_event_stream(generation, model, dropped, transcript),
                        mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        text, finished = generation.result()
    finally:
        generation.cancel()
    if transcript:
        transcript.reply(text, finished, model)
    if finished.error:
        raise RequestError(500, f"generation failed: {finished.error}", kind="server_error")
    body = {"message": {"role": "assistant", "content": text}, **_summary(finished, model, dropped)}
    return jsonify(body), 200


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _event_stream(generation: Generation, model: str, dropped: int,
                  transcript: Transcript | None) -> Iterator[str]:
    """One `delta` event per piece of text, then `done`. Closing the connection cancels the
    generation: the server notices on its next write, and `finally` runs when it closes us."""
    parts: list[str] = []
    finished: Finished | None = None
    try:
        yield ": stream open\n\n"
        for event in generation.events(heartbeat=HEARTBEAT_SECONDS):
            if event is None:
                yield ": keep-alive\n\n"
            elif isinstance(event, str):
                parts.append(event)
                yield _sse({"type": "delta", "text": event})
            else:
                finished = event
                if transcript:  # stored before `done` goes out, so a reload right after finds it
                    transcript.reply("".join(parts), finished, model)
                if event.error:
                    yield _sse({"type": "error",
                                "error": {"message": f"generation failed: {event.error}",
                                          "type": "server_error"}})
                yield _sse({"type": "done", **_summary(event, model, dropped)})
    finally:
        generation.cancel()
        if transcript:
            transcript.reply("".join(parts), finished, model)
