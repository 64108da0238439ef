"""Who may call what: the Host a request names, the access token, per-client rate limits, and the
client address behind proxies.

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
PROTECTED_PREFIXES = ("/api/", "/v1/", "/metrics")
RATE_LIMITED_ENDPOINTS = ("api.chat", "openai.chat_completions")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def bearer_token() -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def token_ok(settings: Settings) -> bool:
    """Whether this request may see what the token protects: no token is set, or it sent it."""
    if not settings.access_token:
        return True
    return hmac.compare_digest(bearer_token().encode(), settings.access_token.encode())


def host_name(host: str) -> str:
    """`host` (a Host header, `name[:port]`) without its port, lower-cased; IPv6 keeps its brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        return host.partition("]")[0] + "]"
    return host.rpartition(":")[0] if ":" in host else host


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    """Whether a Host header names one of `allowed` (or a loopback name), on any port. An entry
    starting with a dot also allows every subdomain of it; "*" allows any host."""
    if "*" in allowed:
        return True
    name = host_name(host)
    if not name:
        return False
    for entry in (*LOOPBACK_HOSTS, *allowed):
        entry = host_name(entry) if not entry.startswith(".") else entry.lower()
        if name == entry or (entry.startswith(".") and name.endswith(entry)):
            return True
    return False


def same_origin(origin: str, host: str) -> bool:
    """Whether an Origin header (`scheme://name[:port]`, or "null" from a sandboxed page or a file)
    names this server as the client reached it (`host`, a Host header)."""
    scheme, sep, rest = origin.strip().partition("://")
    if not sep or not scheme or "/" in rest:
        return False
    default = {"http": ":80", "https": ":443"}.get(scheme.lower(), "")

    def with_port(netloc: str) -> str:
        netloc = netloc.lower()
        return netloc if netloc.rsplit("]", 1)[-1].count(":") else netloc + default

    return with_port(rest) == with_port(host) or rest.lower() == host.lower()


def protect(app: Flask, settings: Settings) -> None:
    """Install the Host check, the token check, the rate limits and (behind a proxy) the real
    client address."""
    allowed = settings.allowed_host_names()

    @app.before_request
    def require_known_host() -> None:
        # DNS rebinding: a page of another site whose name now resolves to 127.0.0.1 reaches this
        # server with its own name in Host; the browser treats it as same-origin. Checked first, on
        # every path, health included: every probe of ours names 127.0.0.1 or the configured name.
        host = request.host  # after ProxyFix: the name the client used, from X-Forwarded-Host
        if not host_allowed(host, allowed):
            raise HttpError(
                400,
                f"this server does not answer to the host name {host_name(host)!r}; "
                "add it to ALLOWED_HOSTS if it is yours",
                code="host_not_allowed",
            )

    @app.before_request
    def refuse_cross_site_writes() -> None:
        # A page of another site may make a visitor's browser POST here (a form, or fetch without
        # preflight: an empty body or a text/plain one), with the visitor's cookie: browsers say so
        # in Origin (and Sec-Fetch-Site). Nothing but this service's own page writes from a browser.
        if request.method in SAFE_METHODS:
            return
        origin = request.headers.get("Origin")
        site = request.headers.get("Sec-Fetch-Site", "")
        if site == "cross-site" or (origin is not None and not same_origin(origin, request.host)):
            raise HttpError(
                403,
                f"cross-site request refused: a page of {origin or 'another site'} may not change "
                "anything here",
                "permission_error",
                code="cross_site_request",
            )

    if settings.proxy_hops:
        # Flask's documented way to wrap WSGI middleware; its stubs declare wsgi_app a plain method.
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, x_for=settings.proxy_hops, x_proto=settings.proxy_hops, x_host=settings.proxy_hops
        )
    if settings.access_token:

        @app.before_request
        def require_token() -> None:
            path = request.path
            if path in OPEN_PATHS or not path.startswith(PROTECTED_PREFIXES):
                return
            if not token_ok(settings):
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

    # No rate-limit headers: Flask-Limiter's would overwrite the queue's Retry-After and put one on
    # every response; the 429 handler (web/errors.py) sets the one Retry-After a refusal needs.
    limiter = Limiter(
        get_remote_address, app=app, storage_uri="memory://", headers_enabled=False, strategy="moving-window"
    )
    app.extensions["rate_limiter"] = limiter
    chat_limit = limiter.shared_limit(settings.rate_limit, scope="chat")
    for endpoint in RATE_LIMITED_ENDPOINTS:
        # flask-limiter types its decorator for sync and async views alike; these views are sync.
        app.view_functions[endpoint] = cast(RouteCallable, chat_limit(app.view_functions[endpoint]))
