"""Telling that a client has gone while its request still waits for the model.

A streaming response learns it when a write fails, but a plain JSON request writes nothing until the
end, so without this a reply nobody will read keeps the model busy to its last token. gunicorn hands the
connection's socket to the app as `environ["gunicorn.socket"]`; a peer that closed it reads as
end-of-file. Servers that expose no socket (werkzeug's test client) are taken to keep their client.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping
from typing import Any


def client_gone(environ: Mapping[str, Any]) -> bool:
    """True when the peer has closed this request's connection (or it is broken); never blocks.

    The request body has been read by now, so anything readable is either end-of-file or the
    next pipelined request, which means the client is still there."""
    sock = environ.get("gunicorn.socket")
    if sock is None:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except ValueError:  # a TLS socket refuses flags: no way to peek, so assume the client stays
        return False
    except OSError:  # reset by peer, or closed under us
        return True


def watcher(environ: Mapping[str, Any]) -> Callable[[], bool]:
    """`client_gone` bound to one request's environ, to call from outside the request context
    (a streaming response runs after the view has returned)."""
    return lambda: client_gone(environ)
