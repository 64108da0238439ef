"""What /metrics reports, in Prometheus' text format: one registry per app, fed at the two places work
already passes (a finished HTTP request, a finished generation) and read from the engines when scraped.

One registry per app rather than prometheus-client's global one, so every app (and every test) counts
only its own. gunicorn runs one worker per instance (`service/__main__.py`: one copy of the model), so
one process holds every count and prometheus-client's multiprocess mode is not needed; several
instances are several scrape targets, summed by Prometheus.

- `qwenbox_http_requests_total{route,method,status}`: every answered request; `route` is the URL rule
  (`/api/conversations/<cid>`) and `method` one of HTTP's own (any other is `other`), so ids, unknown
  paths and made-up methods cannot grow the label set
- `qwenbox_generations_total{model,finish_reason}`: ended generations (stop, length, cancelled, error)
- `qwenbox_generated_tokens_total{model}`, `qwenbox_prompt_tokens_total{model}`
- `qwenbox_time_to_first_token_seconds{model}`, `qwenbox_decode_tokens_per_second{model}`: histograms
- `qwenbox_generations_active{model}`, `qwenbox_queue_depth{model}`, `qwenbox_model_load_seconds{model}`:
  read from each engine at scrape time, so they are never stale
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .inference.engine import Finished

CONTENT_TYPE = CONTENT_TYPE_LATEST
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
RATE_BUCKETS = (1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 50.0, 100.0, 200.0)

EngineStats = Callable[[], Iterable[tuple[str, dict[str, Any]]]]


class _EngineCollector(Collector):
    """Queue depth, active generations and load time, asked of the engines when scraped."""

    def __init__(self, engines: EngineStats):
        self._engines = engines

    def collect(self) -> Iterator[Metric]:
        active = GaugeMetricFamily(
            "qwenbox_generations_active", "generations being decoded", labels=["model"]
        )
        waiting = GaugeMetricFamily(
            "qwenbox_queue_depth", "requests waiting for the model (not yet decoding)", labels=["model"]
        )
        load = GaugeMetricFamily(
            "qwenbox_model_load_seconds", "seconds the model took to load", labels=["model"]
        )
        for model, stats in self._engines():
            active.add_metric([model], stats["active"])
            waiting.add_metric([model], stats["waiting"])
            if stats.get("load_seconds") is not None:
                load.add_metric([model], stats["load_seconds"])
        yield from (active, waiting, load)


class Metrics:
    """One app's metrics; `render()` is the /metrics body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "qwenbox_http_requests", "HTTP requests answered", ["route", "method", "status"], registry=r
        )
        self.generations = Counter(
            "qwenbox_generations", "generations ended, by how", ["model", "finish_reason"], registry=r
        )
        self.generated_tokens = Counter(
            "qwenbox_generated_tokens", "tokens the model generated", ["model"], registry=r
        )
        self.prompt_tokens = Counter("qwenbox_prompt_tokens", "prompt tokens read", ["model"], registry=r)
        self.ttft = Histogram(
            "qwenbox_time_to_first_token_seconds",
            "seconds from submission to the first token",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.decode_rate = Histogram(
            "qwenbox_decode_tokens_per_second",
            "tokens per second after the first, per generation",
            ["model"],
            buckets=RATE_BUCKETS,
            registry=r,
        )

    def watch_engines(self, engines: EngineStats) -> None:
        """Report what `engines()` says of each engine (model id, `Engine.stats()`) at every scrape."""
        self.registry.register(_EngineCollector(engines))

    def request_done(self, route: str, method: str, status: int) -> None:
        self.requests.labels(route, method if method in METHODS else "other", str(status)).inc()

    def generation_finished(self, model: str, finished: Finished) -> None:
        """The engine's `on_finish` hook for `model` (runs on its scheduler thread)."""
        self.generations.labels(model, finished.finish_reason).inc()
        self.generated_tokens.labels(model).inc(finished.usage.completion_tokens)
        self.prompt_tokens.labels(model).inc(finished.usage.prompt_tokens)
        if finished.timing.ttft_s is not None:
            self.ttft.labels(model).observe(finished.timing.ttft_s)
        if finished.timing.tokens_per_s is not None:
            self.decode_rate.labels(model).observe(finished.timing.tokens_per_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
