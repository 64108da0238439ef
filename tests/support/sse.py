"""The one reader of server-sent events (text/event-stream) for the tests, whatever carries the stream.

It takes the body whole (`str` or `bytes`, e.g. a Flask test response's get_data()), or in raw pieces
as they arrive (urllib3's read1() chunks, a WSGI response iterable), or a requests.Response opened with
stream=True. Pieces may split lines and UTF-8 characters anywhere. Parsing follows the HTML spec's
event-stream rules: lines end in CRLF, LF or CR (and nothing else: U+2028 inside a reply is text), `:`
starts a comment (the service's ": stream open" and keep-alives), `data:` lines accumulate, and a
blank line dispatches the event; an event the stream ends in the middle of is not dispatched.

`data()` yields each event's data as text (e.g. the OpenAI stream's "[DONE]"); `events()` yields it
parsed as JSON. Both are lazy, so a test can take the first event while the server is still writing.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterable, Iterator
from typing import Any

_LINE_END = re.compile(r"\r\n|\r|\n")

Stream = str | bytes | Iterable[str] | Iterable[bytes] | Any
"""A body whole, its raw pieces as they arrive, or a requests.Response opened with stream=True."""


def _text(stream: Stream) -> Iterator[str]:
    """The stream as text, piece by piece."""
    if hasattr(stream, "iter_content"):  # a requests.Response opened with stream=True
        stream = stream.iter_content(chunk_size=512)  # as its iter_lines() would read it
    elif isinstance(stream, (str, bytes)):
        stream = [stream]
    decoder = codecs.getincrementaldecoder("utf-8")()
    for piece in stream:
        yield decoder.decode(piece) if isinstance(piece, bytes) else piece
    yield decoder.decode(b"", final=True)


def _lines(pieces: Iterator[str]) -> Iterator[str]:
    """The complete lines, without their ends."""
    pending = ""
    for piece in pieces:
        pending += piece
        # A CR at the very end may be the first half of a CRLF: keep it until the next piece.
        held = pending.endswith("\r")
        *complete, pending = _LINE_END.split(pending[:-1] if held else pending)
        if held:
            pending += "\r"
        yield from complete
    if pending.endswith("\r"):
        yield from _LINE_END.split(pending)[:-1]


def data(stream: Stream) -> Iterator[str]:
    """Each event's data, in order."""
    buffer: list[str] = []
    for line in _lines(_text(stream)):
        if line == "":
            if buffer:
                yield "\n".join(buffer)
            buffer = []
        elif not line.startswith(":"):
            field, _, value = line.partition(":")
            if field == "data":
                buffer.append(value[1:] if value.startswith(" ") else value)


def events(stream: Stream) -> Iterator[Any]:
    """Each event's data as JSON."""
    for text in data(stream):
        yield json.loads(text)
