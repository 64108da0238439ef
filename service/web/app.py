"""The Flask app factory: wires settings and engine to the routes, errors and response headers.

`create_app()` reads settings from the environment and starts loading the model in the background;
tests call `create_app(settings, engine=...)` with their own engine and skip the environment. The
composition root: the one module of `web` that names the real backend, and only inside the loader,
which runs in the engine's thread, so building an app never imports torch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from flask import Flask, Response, request, send_from_directory
from flask.json.provider import DefaultJSONProvider
from flask_compress import Compress

from ..config import Settings
from ..history import History
from ..inference import startup
from ..inference.engine import Engine
from ..metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ..metrics import Metrics
from ..models import ModelManager, public_id
from . import api, conversations, errors, openai_api
from .access import protect

STATIC = Path(__file__).parent.parent / "static"

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> Flask:
    """Build the app. Without `engine`, the models named by `settings` are offered and the default
    one starts loading at once; with one, it is the only model (tests hand in their own)."""
    settings = settings or Settings.from_env()
    metrics = Metrics()
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if engine is not None:
        models = ModelManager.single(engine, settings.model_id)
    else:
        # before the engine's thread imports Transformers; reads the weights ahead meanwhile
        startup.prepare(settings.model_id)
        sources = [m.strip() for m in settings.models.split(",") if m.strip()]
        models = ModelManager(
            sources,
            settings.model_id,
            lambda source: Engine(
                _transformers_loader(settings, source),
                queue_size=settings.queue_size,
                on_finish=partial(metrics.generation_finished, public_id(source)),
            ),
            dtype=settings.dtype,
            budget_bytes=settings.memory_budget_mb * 2**20 if settings.memory_budget_mb else None,
        ).start()
        _announce_when_ready(models, settings)

    app = Flask(__name__, static_folder=str(STATIC), static_url_path="/static")
    # One byte more than allowed, so reading a chunked body shows it is too large (errors.json_body).
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes + 1
    app.json = _insertion_ordered_json(app)
    app.extensions["settings"] = settings
    app.extensions["models"] = models
    app.extensions["metrics"] = metrics
    metrics.watch_engines(lambda: [(model, engine.stats()) for model, engine in models.engines()])
    app.register_blueprint(api.bp)
    app.register_blueprint(openai_api.bp)
    app.register_blueprint(conversations.bp)
    conversations.install_owner_cookie(app)
    if settings.history:
        store = History(settings.database_url or Path(settings.data_dir) / "history.db")
        logging.getLogger(__name__).info("conversation history in %s", store.describe())
        app.extensions["history"] = store
    protect(app, settings)

    @app.get("/")
    def index() -> Response:
        conversations.current_owner()  # a first visit gets its owner cookie with the page
        return send_from_directory(STATIC, "index.html", max_age=0)

    @app.get("/metrics")
    def prometheus_metrics() -> Response:
        """Prometheus' text format, behind the access token like the API (web/access.py)."""
        return Response(metrics.render(), mimetype=None, content_type=METRICS_CONTENT_TYPE)

    @app.after_request
    def count_request(response: Response) -> Response:
        # The URL rule, not the path: ids and unknown paths must not grow the label set.
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        metrics.request_done(route, request.method, response.status_code)
        return response

    errors.install(app, max_body_bytes=settings.max_body_bytes)
    _compress(app)

    @app.after_request
    def security_headers(response: Response) -> Response:
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if response.mimetype == "application/json":
            # Conversations, exports, replies and errors are one client's own: no cache keeps them.
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    return app


def page_url(settings: Settings) -> str:
    """The address to open in a browser: a wildcard bind is reached on this machine's loopback."""
    host = settings.host
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{settings.port}/"


def _announce_when_ready(models: ModelManager, settings: Settings, poll: float = 0.5) -> threading.Thread:
    """Print the address to open once the model answers, as `invoke run-local` does, so that
    `invoke serve` and `python -m service` say when (and where) the page is usable. A thread of
    the app (gunicorn builds the app in its worker), polling, never blocking the server."""

    def watch() -> None:
        started = time.monotonic()
        while True:
            state, offer, engine = models.status()
            if state == "ok":
                seconds = time.monotonic() - started
                print(f"qwen-box is ready after {seconds:.0f} s: open {page_url(settings)}", flush=True)
                return
            if state == "error":
                detail = offer.error or (engine.error if engine else None) or "no detail"
                print(
                    f"qwen-box: the model failed to load ({detail}); {page_url(settings)} says why",
                    flush=True,
                )
                return
            time.sleep(poll)

    thread = threading.Thread(target=watch, name="announce-ready", daemon=True)
    thread.start()
    return thread


def _compress(app: Flask) -> None:
    """gzip (or brotli, zstd) for the page (its HTML, JS, CSS) and the JSON answers: about 200 KB that
    would otherwise cross a slow link whole. Static files are streamed responses, so streams are
    compressed, but only of these types: an event stream (SSE) is not among them and reaches the
    client chunk by chunk, unaltered. gzip is preferred when a browser takes all three: for these
    files, compressed as streams, it is the smallest (229 KB → 72 KB; brotli 74, zstd 77)."""
    app.config.update(
        COMPRESS_MIMETYPES=[
            "text/html",
            "text/css",
            "text/javascript",
            "application/javascript",
            "application/json",
            "image/svg+xml",
        ],
        COMPRESS_ALGORITHM=["gzip", "br", "zstd"],
        COMPRESS_ALGORITHM_STREAMING=["gzip", "br", "zstd"],
        COMPRESS_STREAMING_ENDPOINT_CONDITIONAL=["static", "index"],
        COMPRESS_STREAMS=True,
        COMPRESS_MIN_SIZE=1024,
    )
    Compress(app)


def _transformers_loader(settings: Settings, source: str) -> Callable[[], Any]:
    """Loads `source` when called. torch and Transformers are imported there, in the engine's
    loading thread, so the server answers health checks while they load (they take seconds)."""

    def load() -> Any:
        try:
            from ..inference.backend import TransformersBackend
            from ..inference.vision import VisionBackend, is_vision

            if is_vision(source):
                return VisionBackend(
                    source,
                    dtype=settings.dtype,
                    threads=settings.torch_threads,
                    context_tokens=settings.context_tokens,
                    max_pixels=settings.image_max_pixels,
                )
            return TransformersBackend(
                source,
                dtype=settings.dtype,
                threads=settings.torch_threads,
                context_tokens=settings.context_tokens,
                max_batch=settings.max_batch,
            )
        finally:
            startup.resume_gc()  # paused by startup.prepare (or the worker) for the imports

    return load


def _insertion_ordered_json(app: Flask) -> DefaultJSONProvider:
    """Flask's JSON, keeping keys in the order the code writes them (a reply reads like its docs)."""
    provider = DefaultJSONProvider(app)
    provider.sort_keys = False
    return provider
