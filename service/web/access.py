"""Who may call what: the access token, per-client rate limits, and the client address behind proxies.

Kept apart from the routes so every route gets the same rules: `protect(app, settings)` installs
them on a built app.
"""

from __future__ import annotations

import hmac
import logging
from typing import cast

from flask import Flask, request
from flask.typing import RouteCallable
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from werkzeug.middleware.proxy_fix import ProxyFix

from ..config import Settings
from .errors import HttpError

log = logging.getLogger(__name__)

OPEN_PATHS = ("/api/health",)
PROTECTED_PREFIXES = ("/api/", "/v1/")
RATE_LIMITED_ENDPOINTS = ("api.chat", "openai.chat_completions")


def bearer_token() -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def protect(app: Flask, settings: Settings) -> None:
    """Install the token check, the rate limits and (behind a proxy) the real client address."""
    if settings.proxy_hops:
        # Flask's documented way to wrap WSGI middleware; its stubs declare wsgi_app a plain method.
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, x_for=settings.proxy_hops, x_proto=settings.proxy_hops, x_host=settings.proxy_hops
        )
    if settings.access_token:
        expected = settings.access_token.encode()

        @app.before_request
        def require_token() -> None:
            path = request.path
            if path in OPEN_PATHS or not path.startswith(PROTECTED_PREFIXES):
                return
            if not hmac.compare_digest(bearer_token().encode(), expected):
                raise HttpError(
                    401,
                    "missing or wrong access token: send 'Authorization: Bearer TOKEN'",
                    "authentication_error",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": 'Bearer realm="qwen-box"'},
                )
    elif settings.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "ACCESS_TOKEN is not set and HOST is %s: anyone who can reach this port can use the model",
            settings.host,
        )

    limiter = Limiter(
        get_remote_address, app=app, storage_uri="memory://", headers_enabled=True, strategy="moving-window"
    )
    chat_limit = limiter.shared_limit(settings.rate_limit, scope="chat")
    for endpoint in RATE_LIMITED_ENDPOINTS:
        # flask-limiter types its decorator for sync and async views alike; these views are sync.
        app.view_functions[endpoint] = cast(RouteCallable, chat_limit(app.view_functions[endpoint]))
