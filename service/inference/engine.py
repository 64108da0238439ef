"""The engine: one model, a bounded queue, and a scheduler that decodes requests in a batch.

It knows nothing of HTTP. A caller hands in prompt token ids and sampling options and gets a
`Generation` back at once; the engine's worker thread admits it into the running batch when there
is room and pushes text deltas and a final `Finished` into it. Cancelling (a client gone, a Stop
button) takes effect between two tokens. The model loads in a background thread so a server can
answer health checks meanwhile.

The model sits behind the small `Backend` protocol (admit, step, release): `backend.TransformersBackend`
is the real one; tests may hand in another that yields chosen tokens through this same path. Turning
tokens into text (and cutting it at stop sequences) is `text`'s; this module never imports torch.

A backend that can also read a prompt a piece at a time (`PromptReader`: begin, prefill, unread;
unless its `prompt_in_pieces` is False) has
its prompts read between decode steps, as llama.cpp's server and vLLM do: each turn of the scheduler
reads one piece of one waiting prompt, then advances every running chat by a token. So a chat that
is answering keeps answering while another's prompt is read (reading a whole 2,000-token prompt at
once stalled it for 25 s on a 2-core AVX2 host), and a short prompt does not wait behind a long
one: the prompt with the fewest tokens left to read goes first, which gives the lowest mean wait for
a first token (four equal prompts sent together get theirs after one, two, three and four prompts'
time, where taking turns would give all four theirs after four) and lets a conversation's next turn,
whose history is already cached, through at once. A prompt passed over for `STARVATION_LIMIT`
pieces goes next whatever its length, so a stream of short ones cannot hold a long one back forever.
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, cast, runtime_checkable

from ..errors import ModelUnavailable, QueueFull
from .memory import return_freed_memory
from .text import IncrementalDetokenizer, StopScanner

log = logging.getLogger(__name__)

# Pieces of other prompts a waiting prompt lets go first before it is read next, whatever its length.
STARVATION_LIMIT = 32


@dataclass(frozen=True)
class SamplingOptions:
    """What a request may choose; `None` means the model's own `generation_config` default."""

    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


@dataclass(frozen=True)
class Timing:
    """Seconds, measured from the moment the request was submitted (what a user waits)."""

    queued_s: float
    ttft_s: float | None
    tokens_per_s: float | None
    total_s: float

    def to_dict(self) -> dict[str, float | None]:
        def r(x: float | None) -> float | None:
            return None if x is None else round(x, 4)

        return {
            "queued_s": r(self.queued_s),
            "ttft_s": r(self.ttft_s),
            "tokens_per_s": r(self.tokens_per_s),
            "total_s": r(self.total_s),
        }


@dataclass(frozen=True)
class Finished:
    """The last event of a generation. `error` is set when the model failed mid-way."""

    finish_reason: str  # "stop" | "length" | "cancelled" | "error"
    usage: Usage
    timing: Timing
    error: str | None = None


class Backend(Protocol):
    """A loaded model as the engine drives it: sequences join a batch, step together, and leave."""

    name: str
    tokenizer: Any
    context_length: int
    eos_token_ids: frozenset[int]
    max_batch: int

    def admit(self, prompt_ids: list[int], options: SamplingOptions) -> tuple[Any, int]:
        """Read the prompt and join the batch: (the backend's handle on it, its first token)."""

    def step(self) -> list[int]:
        """One more token for every sequence in the batch, in the order they joined."""

    def release(self, sequence: Any) -> None:
        """Take a sequence out of the batch (it ended, or its client left), or stop reading its prompt."""

    def reset(self) -> None:
        """Forget the whole batch (after a failed step)."""


@runtime_checkable
class PromptReader(Protocol):
    """What a backend offers besides `Backend` to have its prompts read in pieces between decode
    steps; the engine then calls these instead of `admit`."""

    def begin(self, prompt_ids: list[int], options: SamplingOptions) -> Any:
        """A handle on a new sequence whose prompt is still to be read (nothing is computed yet)."""

    def prefill(self, sequence: Any) -> int | None:
        """Read the next piece of the prompt: its first token once all of it is read (the sequence
        has then joined the batch, last), None while some is left."""

    def unread(self, sequence: Any) -> int:
        """Prompt tokens still to read."""


@dataclass(eq=False)
class Generation:
    """One request's handle: iterate `events()` for text deltas and a final `Finished`."""

    prompt_ids: list[int]
    options: SamplingOptions
    submitted_at: float = field(default_factory=time.perf_counter)
    halt: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False
    _events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)

    def cancel(self) -> None:
        """Stop this generation after the current token (or skip it if still waiting)."""
        self.cancelled = True
        self.halt.set()

    def events(
        self,
        heartbeat: float | None = None,
        *,
        abandoned: Callable[[], bool] | None = None,
        poll: float = 0.25,
    ) -> Iterator[str | Finished | None]:
        """Yield text deltas (`str`), then one `Finished`. With `heartbeat`, yield `None` whenever that
        many seconds pass without an event, so a streaming caller can write a keep-alive.

        With `abandoned`, ask it every `poll` seconds (while waiting in the queue as while generating)
        whether the caller is still wanted, and cancel when it is not: the caller knows how to tell
        that its client left, the engine does not."""
        wait = heartbeat
        if abandoned is not None:
            wait = poll if heartbeat is None else min(poll, heartbeat)
        now = time.monotonic()
        silent_since, next_check = now, now + poll
        while True:
            try:
                event: str | Finished | None = self._events.get(timeout=wait)
            except queue.Empty:
                event = None
            now = time.monotonic()
            if abandoned is not None and not self.cancelled and now >= next_check:
                next_check = now + poll
                if abandoned():
                    self.cancel()
            if event is None:
                if heartbeat is not None and now - silent_since >= heartbeat:
                    silent_since = now
                    yield None
                continue
            silent_since = now
            yield event
            if isinstance(event, Finished):
                return

    def result(
        self, *, abandoned: Callable[[], bool] | None = None, poll: float = 0.25
    ) -> tuple[str, Finished]:
        """Wait for the whole reply: (text, Finished); `abandoned` as for `events()`."""
        parts: list[str] = []
        for event in self.events(abandoned=abandoned, poll=poll):
            if isinstance(event, Finished):
                return "".join(parts), event
            if event is not None:  # no heartbeat was asked for, so this is text
                parts.append(event)
        raise AssertionError("unreachable: events() always ends with Finished")

    def _put(self, event: str | Finished) -> None:
        self._events.put(event)


class Engine:
    """Owns the model and the single worker thread that runs generations one after another."""

    def __init__(
        self,
        load: Callable[[], Backend],
        *,
        queue_size: int = 8,
        on_finish: Callable[[Finished], None] | None = None,
    ):
        """`on_finish` sees every generation's end, however it ended (the metrics' hook); it runs on
        the scheduler thread, so it must be quick, and its failure never reaches a generation."""
        self._load = load
        self._on_finish = on_finish
        self._queue: queue.Queue[Generation | None] = queue.Queue(maxsize=queue_size)
        self._backend: Backend | None = None
        self._state = "loading"
        self._error: str | None = None
        self._running: list[_Run] = []  # decoding, in the order they joined the backend's batch
        self._reading: list[_Run] = []  # on the model, their prompts still being read
        self._counts = {"completed": 0, "cancelled": 0, "failed": 0}
        self._load_seconds: float | None = None
        self._started = False
        self._closing = False
        self._lock = threading.Lock()

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> Engine:
        """Load the model in the background and start serving the queue. Returns at once."""
        if not self._started:
            self._started = True
            self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
            self._thread.start()
        return self

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until the model is loaded (True) or failed / timed out (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._state == "loading":
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return self._state == "ok"

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            backend = self._load()
        except Exception as exc:  # noqa: BLE001 - any load failure is reported through health
            log.exception("model failed to load")
            self._error = f"{type(exc).__name__}: {exc}"
            self._state = "error"
            self._fail_waiting()
            return
        if self._closing:
            return
        self._backend = backend
        self._load_seconds = time.perf_counter() - t0
        self._state = "ok"
        log.info("model %s ready in %.1f s", backend.name, self._load_seconds)
        del backend
        self._serve(self._backend)
        self._release()  # here, once no frame holds the model any more, so its memory can go back

    def _serve(self, backend: Backend) -> None:
        """The scheduler: admit waiting requests while the batch has room, read a piece of one
        admitted prompt (with a `PromptReader`), then advance every running one by a token, until
        `close()`."""
        pieces = isinstance(backend, PromptReader) and getattr(backend, "prompt_in_pieces", True)
        reader = cast(PromptReader, backend) if pieces else None
        while True:
            while len(self._running) + len(self._reading) < backend.max_batch:
                try:
                    generation = self._queue.get(block=not (self._running or self._reading))
                except queue.Empty:
                    break
                if generation is None:
                    self._drop_running("the model was unloaded", reading=True)
                    return
                self._admit(backend, reader, generation)
            for run in [r for r in self._reading + self._running if r.generation.halt.is_set()]:
                self._end(backend, run)
            if reader is not None and self._reading:
                self._read_prompt(reader, backend)
            if not self._running:
                continue
            try:
                tokens = backend.step()
            except Exception as exc:  # noqa: BLE001 - reported to the requests in the batch
                log.exception("decode step failed")
                self._drop_running(f"{type(exc).__name__}: {exc}", backend)
                continue
            for run, token in zip(list(self._running), tokens, strict=True):
                if run.push(token):
                    self._end(backend, run)

    def _admit(self, backend: Backend, reader: PromptReader | None, generation: Generation) -> None:
        if generation.cancelled:
            self._finish(generation, "cancelled", 0, time.perf_counter(), None, None)
            return
        run = _Run(generation, backend)
        try:
            if reader is not None:
                run.sequence = reader.begin(generation.prompt_ids, generation.options)
                with self._lock:
                    self._reading.append(run)
                return
            run.sequence, token = backend.admit(generation.prompt_ids, generation.options)
        except Exception as exc:  # noqa: BLE001 - reported to the one request, the engine goes on
            log.exception("prefill failed")
            self._finish(
                generation, "error", 0, run.started, None, None, error=f"{type(exc).__name__}: {exc}"
            )
            return
        self._joined(backend, run, token)

    def _read_prompt(self, reader: PromptReader, backend: Backend) -> None:
        """One piece of the prompt with the fewest tokens left to read (or of one passed over too
        often); once a prompt is read, its chat joins the running ones with its first token."""
        overdue = [r for r in self._reading if r.passed >= STARVATION_LIMIT]
        run = overdue[0] if overdue else min(self._reading, key=lambda r: reader.unread(r.sequence))
        for other in self._reading:
            other.passed = 0 if other is run else other.passed + 1
        try:
            token = reader.prefill(run.sequence)
        except Exception as exc:  # noqa: BLE001 - reported to the one request, the engine goes on
            log.exception("prefill failed")
            with self._lock:
                self._reading.remove(run)
            backend.release(run.sequence)
            self._finish(
                run.generation, "error", 0, run.started, None, None, error=f"{type(exc).__name__}: {exc}"
            )
            return
        if token is None:
            return
        with self._lock:
            self._reading.remove(run)
        self._joined(backend, run, token)

    def _joined(self, backend: Backend, run: _Run, token: int) -> None:
        """`run` is in the backend's batch now (last), with `token` its first."""
        with self._lock:
            self._running.append(run)
        if run.push(token):
            self._end(backend, run)

    def _end(self, backend: Backend, run: _Run) -> None:
        with self._lock:
            (self._running if run in self._running else self._reading).remove(run)
        backend.release(run.sequence)
        self._finish(run.generation, run.finish_reason(), len(run.tokens), run.started, run.first, run.last)
        if not self._running and not self._reading:
            # A generation's caches grow a little every step, and glibc keeps what they leave
            # behind: without this, each long chat started from a higher floor (+0.5 GiB over the
            # benchmark's run). Idle is when it costs no one anything (a few ms).
            return_freed_memory()

    def _drop_running(self, error: str, backend: Backend | None = None, *, reading: bool = False) -> None:
        """End every running request with `error`; with `backend`, also clear its batch (after a
        failed step its state cannot be trusted: the prompts being read have their own, and go on);
        with `reading`, also the requests whose prompts are being read."""
        with self._lock:
            runs, self._running = self._running, []
            if reading:
                runs, self._reading = runs + self._reading, []
        for run in runs:
            self._finish(
                run.generation, "error", len(run.tokens), run.started, run.first, run.last, error=error
            )
        if backend is not None:
            backend.reset()

    def close(self, wait: float | None = None) -> None:
        """Unload the model: refuse new requests, end the running ones, fail the waiting ones, and
        let the worker drop the weights so their memory goes back to the system. With `wait`,
        block up to that many seconds for the worker to finish."""
        if self._closing:
            return
        self._closing = True
        if self._state == "ok":
            self._state = "unloaded"
        with self._lock:
            for run in self._running + self._reading:
                run.generation.cancel()
        self._fail_waiting("the model was unloaded")
        if self._started:
            self._queue.put(None)
            if wait:
                self._thread.join(wait)

    def _release(self) -> None:
        self._backend = None
        gc.collect()
        return_freed_memory()
        log.info("model unloaded")

    def _fail_waiting(self, reason: str = "the model failed to load") -> None:
        while True:
            try:
                generation = self._queue.get_nowait()
            except queue.Empty:
                return
            if generation is not None:
                self._finish(generation, "error", 0, generation.submitted_at, None, None, error=reason)

    # --- state -----------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        """ "loading", "ok", "error", or "unloaded" after `close()`."""
        return self._state

    @property
    def error(self) -> str | None:
        return self._error

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            raise ModelUnavailable(self._unavailable())
        return self._backend

    @property
    def name(self) -> str:
        """The loaded model's name; `ModelUnavailable` until it has loaded."""
        return self.backend.name

    @property
    def tokenizer(self) -> Any:
        """The loaded model's tokenizer, which builds its prompts; `ModelUnavailable` until loaded."""
        return self.backend.tokenizer

    @property
    def context_length(self) -> int:
        """Tokens the model reads and writes in one sequence; `ModelUnavailable` until loaded."""
        return self.backend.context_length

    def _unavailable(self) -> str:
        if self._state == "error":
            return f"the model failed to load: {self._error}"
        if self._state == "unloaded":
            return "the model was unloaded"
        return "the model is still loading"

    def stats(self) -> dict[str, Any]:
        """Queue depth and counters, cheap enough for every health check."""
        with self._lock:
            active = len(self._running) + len(self._reading)
        return {
            "active": active,
            "waiting": self._queue.qsize(),
            **self._counts,
            "load_seconds": None if self._load_seconds is None else round(self._load_seconds, 2),
        }

    # --- requests --------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], options: SamplingOptions) -> Generation:
        """Queue a generation and return its handle at once.

        Raises `ModelUnavailable` if the model is not ready and `QueueFull` if too many wait.
        """
        if self._state != "ok":
            raise ModelUnavailable(self._unavailable())
        generation = Generation(list(prompt_ids), options)
        try:
            self._queue.put_nowait(generation)
        except queue.Full:
            raise QueueFull(retry_after=self._retry_after()) from None
        return generation

    def _retry_after(self) -> int:
        """A rough wait in seconds for a retry: the queue ahead, a few seconds each."""
        return max(1, min(60, 5 * (self._queue.qsize() + 1)))

    def _finish(
        self,
        generation: Generation,
        reason: str,
        n_tokens: int,
        started: float,
        first: float | None,
        last: float | None,
        error: str | None = None,
    ) -> None:
        now = time.perf_counter()
        t0 = generation.submitted_at
        rate = None
        if first is not None and last is not None and n_tokens > 1 and last > first:
            rate = (n_tokens - 1) / (last - first)
        timing = Timing(
            queued_s=started - t0,
            ttft_s=None if first is None else first - t0,
            tokens_per_s=rate,
            total_s=now - t0,
        )
        usage = Usage(len(generation.prompt_ids), n_tokens)
        key = {"cancelled": "cancelled", "error": "failed"}.get(reason, "completed")
        self._counts[key] += 1
        finished = Finished(reason, usage, timing, error)
        if self._on_finish is not None:
            try:
                self._on_finish(finished)
            except Exception:  # noqa: BLE001 - an observer's fault must not lose a reply
                log.exception("on_finish failed")
        generation._put(finished)


class _Run:
    """A generation in the batch: its tokens, text released so far, stop sequences and timing."""

    def __init__(self, generation: Generation, backend: Backend):
        self.generation = generation
        self.sequence: Any = None
        self.eos = backend.eos_token_ids
        self.detok = IncrementalDetokenizer(backend.tokenizer)
        self.stops = StopScanner(generation.options.stop)
        self.tokens: list[int] = []
        self.started = time.perf_counter()
        self.first: float | None = None
        self.last: float | None = None
        self.passed = 0  # pieces of other prompts read since this one's last (while it is read)

    def push(self, token_id: int) -> bool:
        """Take the next token; True when this generation has ended."""
        self.last = time.perf_counter()
        if self.first is None:
            self.first = self.last
        self.tokens.append(token_id)
        text = self.stops.push(self.detok.push(token_id))
        if text:
            self.generation._put(text)
        ended = (
            self.stops.hit
            or token_id in self.eos
            or len(self.tokens) >= self.generation.options.max_tokens
            or self.generation.halt.is_set()
        )
        if ended:
            tail = self.stops.push(self.detok.flush()) + self.stops.flush()
            if tail:
                self.generation._put(tail)
        return ended

    def finish_reason(self) -> str:
        if self.generation.cancelled:
            return "cancelled"
        if self.stops.hit or (self.tokens and self.tokens[-1] in self.eos):
            return "stop"
        if len(self.tokens) >= self.generation.options.max_tokens:
            return "length"
        return "stop"
