"""Chats sent together: when each one's first and 64th token come, and the batch's decode speed.

    python -m service.dev.concurrency [--model DIR] [--precision int8] [--chats 4] [--prompt-tokens 256]

What a user of a shared server sees when several people ask at once: how long each waits for its
first token, whether a chat already answering keeps going while others' prompts are read (every
first token should come before any chat's 64th), and how fast the batch decodes once every prompt
is read, against one chat alone. Tokens are timed where the engine gets them from the model (the
random benchmark model's tokens mostly decode to no text, so a reader of the stream could not count
them), by wrapping the loaded backend's methods for the length of the measurement.

`concurrent_chats(engine)` measures on an engine already loaded (what `service.dev.bench` can call);
`measure(model, precision, threads)` loads one first, in the engine's own thread as the server does.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ..inference.engine import Engine, SamplingOptions


@contextmanager
def _token_clock(backend: Any, chat_of: dict[tuple[int, ...], int]) -> Iterator[dict[int, list[float]]]:
    """While inside, record when each chat's tokens come out of `backend` (a `TransformersBackend`):
    {chat index: [perf_counter of token 1, token 2, ...]}. Chats are told apart by their prompt ids."""
    times: dict[int, list[float]] = {i: [] for i in chat_of.values()}
    owner: dict[int, int] = {}  # id(sequence) -> chat

    def note(seq: Any, now: float) -> None:
        chat = owner.get(id(seq))
        if chat is None:
            chat = owner[id(seq)] = chat_of.get(tuple(seq.prompt_ids), -1)
        if chat >= 0:
            times[chat].append(now)

    patched: dict[str, Callable[..., Any]] = {}

    def patch(name: str, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
        if hasattr(backend, name):
            original = getattr(backend, name)
            patched[name] = original
            setattr(backend, name, wrap(original))

    def step_wrap(step: Callable[[], list[int]]) -> Callable[[], list[int]]:
        def timed() -> list[int]:
            rows = list(backend._rows)  # the batch in step order, before anything leaves it
            tokens = step()
            now = time.perf_counter()
            for seq in rows:
                note(seq, now)
            return tokens

        return timed

    def admit_wrap(admit: Callable[..., tuple[Any, int]]) -> Callable[..., tuple[Any, int]]:
        def timed(*args: Any) -> tuple[Any, int]:
            seq, token = admit(*args)
            if token is not None:
                note(seq, time.perf_counter())
            return seq, token

        return timed

    def prefill_wrap(prefill: Callable[[Any], int | None]) -> Callable[[Any], int | None]:
        def timed(seq: Any) -> int | None:
            token = prefill(seq)
            if token is not None:
                note(seq, time.perf_counter())
            return token

        return timed

    patch("step", step_wrap)
    patch("admit", admit_wrap)
    patch("prefill", prefill_wrap)
    try:
        yield times
    finally:
        for name in patched:
            delattr(backend, name)  # the class's own method shows through again


def _progress(message: str) -> None:
    """A line on stderr as each phase ends, so a slow run shows where it is."""
    print(f"[concurrency {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _rate(stamps: list[float], start: float, end: float) -> int:
    return sum(1 for t in stamps if start < t <= end)


def concurrent_chats(
    engine: Engine,
    *,
    chats: int = 4,
    prompt_tokens: int = 256,
    new_tokens: int = 128,
    nth: int = 64,
    seed: int = 1,
    alone_tok_s: float | None = None,
) -> dict[str, Any]:
    """One chat alone, then `chats` chats of fresh `prompt_tokens`-token prompts submitted together,
    each generating `new_tokens` greedily. Seconds are from submission. Returns the figures:

    - `first_token_s`, `nth_token_s`: per chat, when its first and `nth` tokens came;
    - `ordered`: whether every first token came before any chat's `nth`;
    - `aggregate_tok_s`: tokens per second of all chats together once every prompt was read, while
      all of them decode (from the last first token to the first chat's end);
    - `aggregate_to_end_tok_s`: the same until the last chat's end (the tail has fewer chats);
    - `longest_gap_s`: per chat, the longest wait between two of its tokens (a chat stalled while
      another's prompt is read shows it);
    - `alone_tok_s`: one chat's decode speed alone (measured unless given); `ratio`: aggregate over it.
    """
    backend: Any = engine.backend
    vocab = backend.model.config.vocab_size
    rng = random.Random(seed)

    def prompt() -> list[int]:
        return [rng.randrange(vocab // 10, vocab - vocab // 10) for _ in range(prompt_tokens)]

    greedy = SamplingOptions(max_tokens=new_tokens, temperature=0)
    backend.prefix_cache.clear()
    engine.submit(prompt()[:32], SamplingOptions(max_tokens=4, temperature=0)).result()  # warm-up
    _progress("warmed up")

    def run(n: int) -> tuple[float, dict[int, list[float]], list[Any]]:
        prompts = [prompt() for _ in range(n)]
        backend.prefix_cache.clear()
        with _token_clock(backend, {tuple(p): i for i, p in enumerate(prompts)}) as times:
            t0 = time.perf_counter()
            gens = [engine.submit(p, greedy) for p in prompts]
            finished = [g.result()[1] for g in gens]
        return t0, times, finished

    if alone_tok_s is None:
        t0, times, _ = run(1)
        alone = times[0]
        alone_tok_s = (len(alone) - 1) / (alone[-1] - alone[0])
        _progress(f"one chat alone: first token {alone[0] - t0:.2f} s, {alone_tok_s:.2f} tok/s")
    alone_rate = alone_tok_s

    t0, times, finished = run(chats)
    _progress(f"{chats} chats together: done in {max(ts[-1] for ts in times.values()) - t0:.1f} s")
    firsts = [times[i][0] for i in range(chats)]
    nths = [times[i][nth - 1] if len(times[i]) >= nth else None for i in range(chats)]
    last_first = max(firsts)
    first_end = min(times[i][-1] for i in range(chats))
    last_end = max(times[i][-1] for i in range(chats))
    together = sum(_rate(times[i], last_first, first_end) for i in range(chats))
    to_end = sum(_rate(times[i], last_first, last_end) for i in range(chats))
    aggregate = together / (first_end - last_first) if first_end > last_first else float("nan")
    reached = [t for t in nths if t is not None]
    return {
        "chats": chats,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "first_token_s": [round(t - t0, 2) for t in firsts],
        "engine_ttft_s": [None if f.timing.ttft_s is None else round(f.timing.ttft_s, 2) for f in finished],
        f"token_{nth}_s": [None if t is None else round(t - t0, 2) for t in nths],
        "longest_gap_s": [
            round(max(b - a for a, b in zip(ts, ts[1:], strict=False)), 2) for ts in times.values()
        ],
        "ordered": bool(reached) and last_first < min(reached),
        "all_prompts_read_s": round(last_first - t0, 2),
        "aggregate_tok_s": round(aggregate, 2),
        "aggregate_to_end_tok_s": round(to_end / (last_end - last_first), 2),
        "alone_tok_s": round(alone_rate, 2),
        "ratio": round(aggregate / alone_rate, 2),
        "completion_tokens": [f.usage.completion_tokens for f in finished],
    }


def _loaded_engine(model: str, precision: str, threads: int, chats: int) -> Engine:
    """`model` at `precision` in an engine of its own thread (as the server and `service.dev.bench`
    run it), loaded, with room for `chats` in one batch."""
    from ..inference.backend import TransformersBackend

    engine = Engine(
        lambda: TransformersBackend(
            model, dtype=precision, threads=threads, context_tokens=32768, max_batch=chats
        ),
        queue_size=16,
    ).start()
    if not engine.wait_ready():
        raise RuntimeError(f"the model failed to load: {engine.error}")
    _progress(f"loaded {precision} in {engine.stats()['load_seconds']} s")
    return engine


def measure(model: str, precision: str, threads: int, **kwargs: Any) -> dict[str, Any]:
    """Load `model` at `precision` in an engine (in its own thread, as the server and
    `service.dev.bench` do) and run `concurrent_chats` on it."""
    engine = _loaded_engine(model, precision, threads, kwargs.get("chats", 4))
    try:
        return {"precision": precision, "threads": threads, **concurrent_chats(engine, **kwargs)}
    finally:
        engine.close(wait=30)


def compare_chunks(model: str, precision: str, threads: int, chunks: list[int], **kwargs: Any) -> list[dict]:
    """`concurrent_chats` once per prompt piece size (`backend.PREFILL_CHUNK`), on one loaded model:
    how the size trades the running chats' waits against the prompts' first tokens."""
    from ..inference import backend as backend_module

    engine = _loaded_engine(model, precision, threads, kwargs.get("chats", 4))
    results: list[dict] = []
    alone = None
    try:
        for chunk in chunks:
            backend_module.PREFILL_CHUNK = chunk
            result = concurrent_chats(engine, alone_tok_s=alone, **kwargs)
            alone = result["alone_tok_s"]
            results.append({"precision": precision, "threads": threads, "prefill_chunk": chunk, **result})
            print(json.dumps(results[-1]), flush=True)
    finally:
        engine.close(wait=30)
    return results


def main(argv: list[str] | None = None) -> int:
    from .bench import DEFAULT_DIR, build_random_model

    summary = __doc__.split("\n\n")[0]
    p = argparse.ArgumentParser(prog="python -m service.dev.concurrency", description=summary)
    p.add_argument("--model", default="", help="model folder (default: the random Qwen2.5-1.5B)")
    p.add_argument("--precision", default="int8")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--chats", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prefill-chunks", default="", help="compare these piece sizes, e.g. 64,128,256")
    args = p.parse_args(argv)
    model = args.model or str(build_random_model(DEFAULT_DIR))
    if args.prefill_chunks:
        chunks = [int(c) for c in args.prefill_chunks.split(",")]
        sizes = dict(chats=args.chats, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens)
        compare_chunks(model, args.precision, args.threads, chunks, **sizes)
        return 0
    result = measure(
        model,
        args.precision,
        args.threads,
        chats=args.chats,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
    )
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
