"""`python -m service.dev.decode_rate`: decode tokens/s of one chat and of a batch, in this process.

What `invoke bench` reports as decode, without its other phases, so a change to the decode step can
be compared A/B in a few minutes: a fresh 256-token prompt then 128 greedy tokens through the engine
(as the bench runs it); `--plain` decodes through Transformers' forward instead of the lean step
(`decoder.py`). `--ab` times backend steps instead, the lean and the plain ones alternating in one
process (what a noisy machine allows to compare), for one row or `--batch N` rows decoding together.
Prints one JSON line per run and the medians.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from .bench import DEFAULT_DIR, build_random_model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="", help="model folder (default: the bench's random 1.5B)")
    parser.add_argument("--precision", default="int8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per chat")
    parser.add_argument("--batch", type=int, default=0, help="with --ab: this many rows decoding together")
    parser.add_argument("--plain", action="store_true", help="decode through Transformers' forward")
    parser.add_argument(
        "--ab", action="store_true", help="time backend steps, the lean and the plain ones alternating"
    )
    args = parser.parse_args(argv)
    if args.ab:
        return alternate(args)

    import torch

    from ..inference.backend import TransformersBackend
    from ..inference.engine import Engine, SamplingOptions

    model = args.model or str(build_random_model(DEFAULT_DIR))
    engine = Engine(
        lambda: TransformersBackend(
            model,
            dtype=args.precision,
            threads=args.threads,
            context_tokens=32768,
            max_batch=max(4, args.batch),
        ),
        queue_size=16,
    ).start()
    if not engine.wait_ready():
        raise SystemExit(f"the model failed to load: {engine.error}")
    backend = engine.backend
    assert isinstance(backend, TransformersBackend)
    if args.plain:
        backend.decoder = None
    vocab = backend.model.config.vocab_size
    rng = random.Random(1)
    greedy = SamplingOptions(max_tokens=args.tokens, temperature=0)

    def prompt() -> list[int]:
        return [rng.randrange(vocab // 10, vocab - vocab // 10) for _ in range(args.prompt)]

    backend.prefix_cache.clear()
    engine.submit(prompt()[:32], SamplingOptions(max_tokens=4, temperature=0)).result()  # warm-up
    one: list[float] = []
    for run in range(args.runs):
        backend.prefix_cache.clear()
        finished = engine.submit(prompt(), greedy).result()[1]
        one.append(finished.timing.tokens_per_s or 0.0)
        line = {"run": run + 1, "one_tok_s": round(one[-1], 2)}
        print(json.dumps(line), flush=True)
    summary = {
        "precision": args.precision,
        "path": "plain" if args.plain or backend.decoder is None else "lean",
        "threads": args.threads,
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "one_tok_s": round(statistics.median(one), 2),
    }
    print(json.dumps(summary), flush=True)
    engine.close()


def alternate(args: argparse.Namespace) -> None:
    """Decode steps timed in one process, blocks of 8 lean steps and 8 plain ones alternating over
    the same growing cache (in the thread that loaded the model: one OpenMP pool), so the machine's
    noise falls on both alike: median milliseconds a step of each, for one row or `--batch` rows."""
    import torch

    from ..inference.backend import TransformersBackend
    from ..inference.engine import SamplingOptions

    model = args.model or str(build_random_model(DEFAULT_DIR))
    backend = TransformersBackend(
        model, dtype=args.precision, threads=args.threads, max_batch=max(4, args.batch)
    )
    lean = backend.decoder
    vocab = backend.model.config.vocab_size
    rng = random.Random(1)
    greedy = SamplingOptions(max_tokens=10**6, temperature=0)
    for _ in range(max(1, args.batch)):
        backend.admit([rng.randrange(vocab // 10, vocab - vocab // 10) for _ in range(args.prompt)], greedy)
    times: dict[str, list[float]] = {"lean": [], "plain": []}
    for block in range(args.tokens // 8):
        path = "lean" if block % 2 == 0 else "plain"
        backend.decoder = lean if path == "lean" else None
        for _ in range(8):
            t0 = time.perf_counter()
            backend.step()
            times[path].append(time.perf_counter() - t0)
    summary = {
        "precision": args.precision,
        "rows": backend.batch_size,
        "context": args.prompt,
        "cpu": torch.backends.cpu.get_cpu_capability(),
    }
    for path, ts in times.items():
        ms = statistics.median(ts) * 1000
        summary[f"{path}_ms"] = round(ms, 2)
        summary[f"{path}_tok_s"] = round(backend.batch_size * 1000 / ms, 2)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
