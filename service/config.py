"""Settings: every knob of the service, read once from the environment.

This is the one place configuration enters. `Settings.from_env()` is called once at start-up and the
resulting frozen object is handed to whatever needs it, so nothing below reads `os.environ` itself.
Each field's `doc` is what the README's settings table says.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from limits import parse_many

from .database import is_postgres_url

DEFAULT_MODEL_ID = "Qwen/Qwen2.5-1.5B-Instruct"
DTYPES = ("bfloat16", "float32", "int8", "int4")


_BOOLS = {
    "1": True,
    "true": True,
    "yes": True,
    "on": True,
    "0": False,
    "false": False,
    "no": False,
    "off": False,
}


class SettingsError(ValueError):
    """An environment variable holds a value the service cannot use."""


def _setting(default: Any, doc: str, *, secret: bool = False) -> Any:
    return field(default=default, repr=not secret, metadata={"doc": doc})


@dataclass(frozen=True)
class Settings:
    model_id: str = _setting(DEFAULT_MODEL_ID, "Hugging Face hub id or local folder of the chat model")
    models: str = _setting(
        "",
        "comma-separated hub ids / folders offered in the model menu (MODEL_ID is "
        "always offered and loads first)",
    )
    memory_budget_mb: int = _setting(
        0, "memory the loaded models may share before one is unloaded for another; 0 = 80% of RAM"
    )
    host: str = _setting("127.0.0.1", "address to listen on (the container sets 0.0.0.0)")
    port: int = _setting(8000, "port to listen on")
    dtype: str = _setting("int8", "weights precision: int8, int4, bfloat16 or float32 (see Speed and memory)")
    max_batch: int = _setting(4, "requests decoded together in one batch (more waiting ones queue)")
    torch_threads: int = _setting(0, "PyTorch compute threads; 0 = one per core")
    web_threads: int = _setting(16, "gunicorn threads for HTTP connections (each open stream holds one)")
    queue_size: int = _setting(8, "requests that may wait for the model; beyond it, 503 with Retry-After")
    context_tokens: int = _setting(4096, "prompt + reply tokens at most (capped by the model's own limit)")
    default_max_tokens: int = _setting(512, "reply length when a request gives no max_tokens")
    max_tokens_limit: int = _setting(2048, "largest max_tokens a request may ask for")
    max_body_bytes: int = _setting(1_000_000, "largest request body accepted (413 beyond)")
    image_max_pixels: int = _setting(
        1_048_576,
        "resolution cap: an image with more pixels is scaled down to this many before the model reads it "
        "(bounds prefill time: see Images in the README)",
    )
    max_images: int = _setting(
        4, "images one chat request may carry, over all its turns (refused beyond; 0 = none)"
    )
    image_max_bytes: int = _setting(
        5_000_000,
        "largest image accepted, as encoded bytes (refused beyond); a chat body may exceed "
        "MAX_BODY_BYTES by MAX_IMAGES of these in base64, and only by its images",
    )
    log_level: str = _setting("info", "gunicorn and service log level")
    data_dir: str = _setting("data", "folder for the history database (the image uses a /data volume)")
    history: bool = _setting(True, "keep conversations on disk; off = private mode, nothing is written")
    database_url: str = _setting(
        "",
        "where the history is kept: empty = SQLite in DATA_DIR; a `postgresql://USER:PASSWORD@HOST/DB` "
        "URL = PostgreSQL, shared by every instance (`?sslmode=require` for TLS, as Azure requires)",
        secret=True,
    )
    access_token: str = _setting(
        "",
        "when set, /api/* (but health) and /v1/* need `Authorization: Bearer "
        "TOKEN`; empty = open (fine on 127.0.0.1 only)",
        secret=True,
    )
    rate_limit: str = _setting("30/minute", "chat requests per client address (Flask-Limiter syntax)")
    proxy_hops: int = _setting(0, "reverse proxies in front whose X-Forwarded-For to trust (1 behind Caddy)")
    allowed_hosts: str = _setting(
        "127.0.0.1,localhost,[::1]",
        "comma-separated host names the service answers to, any port (`.example.com` = its subdomains "
        "too, `*` = any); loopback names always; others get 400 (stops DNS rebinding). A public "
        "server sets its DNS name",
    )

    @property
    def image_body_bytes(self) -> int:
        """What a chat body may carry in images beyond MAX_BODY_BYTES: MAX_IMAGES of them in base64."""
        return self.max_images * (self.image_max_bytes * 4 // 3 + 100)

    @property
    def largest_request_bytes(self) -> int:
        """The largest body the service reads: MAX_BODY_BYTES plus a chat's images. A proxy in front
        must let this much through (and may refuse more)."""
        return self.max_body_bytes + self.image_body_bytes + 1

    def allowed_host_names(self) -> tuple[str, ...]:
        """ALLOWED_HOSTS as a tuple of names (loopback names are added by the check itself)."""
        return tuple(h.strip() for h in self.allowed_hosts.split(",") if h.strip())

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from environment variables (field names, upper-cased), validated."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}  # each parsed to its field's type just below
        for f in fields(cls):
            name = f.name.upper()
            raw = env.get(name)
            if raw is None or raw.strip() == "":
                continue
            raw = raw.strip()
            if f.type == "int":
                try:
                    values[f.name] = int(raw)
                except ValueError:
                    raise SettingsError(f"{name} must be a whole number, got {raw!r}") from None
            elif f.type == "bool":
                if raw.lower() not in _BOOLS:
                    raise SettingsError(f"{name} must be on or off, got {raw!r}")
                values[f.name] = _BOOLS[raw.lower()]
            else:
                values[f.name] = raw
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Refuse settings that would only fail later, with a message naming the variable."""
        if self.dtype not in DTYPES:
            raise SettingsError(f"DTYPE must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not 0 < self.port < 65536:
            raise SettingsError(f"PORT must be between 1 and 65535, got {self.port}")
        for name in (
            "web_threads",
            "queue_size",
            "max_batch",
            "context_tokens",
            "default_max_tokens",
            "max_tokens_limit",
            "max_body_bytes",
            "image_max_pixels",
            "image_max_bytes",
        ):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name.upper()} must be at least 1")
        try:
            parse_many(self.rate_limit)
        except ValueError:
            raise SettingsError(f"RATE_LIMIT is not a rate like '30/minute': {self.rate_limit!r}") from None
        if self.proxy_hops < 0:
            raise SettingsError("PROXY_HOPS must be 0 or more")
        if self.access_token and len(self.access_token) < 16:
            raise SettingsError("ACCESS_TOKEN must be at least 16 characters")
        for host in self.allowed_host_names():
            if host != "*" and not re.fullmatch(r"\.?[A-Za-z0-9.-]+(:\d+)?|\[[0-9A-Fa-f:.]+\](:\d+)?", host):
                raise SettingsError(f"ALLOWED_HOSTS: {host!r} is not a host name or address")
        if self.database_url and not is_postgres_url(self.database_url):
            raise SettingsError("DATABASE_URL must be a postgresql:// URL (or empty for SQLite in DATA_DIR)")
        if self.max_images < 0:
            raise SettingsError("MAX_IMAGES must be 0 (no images) or more")
        if self.torch_threads < 0:
            raise SettingsError("TORCH_THREADS must be 0 (all cores) or more")
        if self.default_max_tokens > self.max_tokens_limit:
            raise SettingsError("DEFAULT_MAX_TOKENS cannot exceed MAX_TOKENS_LIMIT")
        if self.max_tokens_limit >= self.context_tokens:
            raise SettingsError("MAX_TOKENS_LIMIT must be smaller than CONTEXT_TOKENS")


def settings_table() -> str:
    """The settings as a Markdown table (variable, default, meaning), for the README and `--help`."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for f in fields(Settings):
        default = ("on" if f.default else "off") if f.type == "bool" else f.default
        rows.append(f"| `{f.name.upper()}` | `{default}` | {f.metadata['doc']} |")
    return "\n".join(rows)
