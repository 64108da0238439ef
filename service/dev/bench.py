"""Benchmark: load time, peak memory, time to first token, decode speed and batching, per precision.

Run `invoke bench` (or `python -m service.dev.bench`). Without `--model` it builds, once, a model with
the exact Qwen2.5-1.5B-Instruct architecture and random weights: it costs the same per token as the
real one, so speed and memory figures hold (the text it writes is noise, which a benchmark ignores).

Each precision runs in its own process so peak RSS (loading included) is its own. Figures are
medians over `--repeat` runs; ratios are against bfloat16 measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

QWEN25_15B: dict[str, Any] = dict(
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
DEFAULT_DIR = CACHE / "qwen-box" / "bench-qwen2.5-1.5b"


def build_random_model(path: Path) -> Path:
    """Write the Qwen2.5-1.5B architecture with random bf16 weights (about 3.1 GB), once."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    if (path / "config.json").exists():
        return path
    from .tiny_models import build_tokenizer  # a real tokenizer; ids past its vocab decode to ""

    path.mkdir(parents=True, exist_ok=True)
    build_tokenizer(path)
    torch.manual_seed(0)
    with torch.device("cpu"):
        config = Qwen2Config(**QWEN25_15B, bos_token_id=151643, eos_token_id=151645)
        torch.set_default_dtype(torch.bfloat16)
        model = Qwen2ForCausalLM(config)
        torch.set_default_dtype(torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=[151645, 151643],
        do_sample=True,
        temperature=0.7,
        top_p=0.8,
        top_k=20,
        repetition_penalty=1.05,
    )
    model.save_pretrained(path)
    return path


# What an instruction-set cap means to each kernel library torch uses on a CPU: oneDNN (bf16 and
# fp32 matmuls), FBGEMM (the int8 GEMM) and ATen's own vectorised ops.
ISAS = {
    "AVX2": {
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
        "ATEN_CPU_CAPABILITY": "avx2",
    },
    "AVX512_CORE": {
        "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
        "FBGEMM_ENABLE_INSTRUCTIONS": "AVX512",
        "ATEN_CPU_CAPABILITY": "avx512",
    },
}


def isa_environment(isa: str) -> dict[str, str]:
    """Environment that makes a process compute as a CPU with only `isa` would ("" = native)."""
    return ISAS[isa] if isa else {}


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _measured(seconds: float | None) -> float:
    """A timing of a run that produced tokens, as every run here does (None would mean none came)."""
    if seconds is None:
        raise RuntimeError("a benchmark run produced no tokens to time")
    return seconds


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure(model: str, precision: str, threads: int, repeat: int, new_tokens: int) -> dict[str, Any]:
    """Everything for one precision, in this process (run it in a fresh one)."""
    import torch

    from ..inference.backend import TransformersBackend
    from ..inference.engine import Engine, SamplingOptions

    torch.manual_seed(0)
    # The backend is built in the engine's own thread, as the server does: the first thread to run
    # torch starts an OpenMP pool, and a second pool in the same process makes every small parallel
    # op wait on a sleeping thread (decode ran 40% slower when the model was loaded here instead).
    engine = Engine(
        lambda: TransformersBackend(
            model, dtype=precision, threads=threads, context_tokens=32768, max_batch=4
        ),
        queue_size=16,
    ).start()
    engine.wait_ready()
    backend = engine.backend
    assert isinstance(backend, TransformersBackend)  # what the engine was given: its model and caches
    load_s = engine.stats()["load_seconds"]
    rss_after_load = _peak_rss_gib()
    vocab = backend.model.config.vocab_size
    rng = random.Random(1)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(vocab // 10, vocab - vocab // 10) for _ in range(n)]

    def run(ids: list[int], n: int = new_tokens):
        backend.prefix_cache.clear()
        return engine.submit(ids, SamplingOptions(max_tokens=n, temperature=0)).result()[1]

    greedy = SamplingOptions(max_tokens=new_tokens, temperature=0)
    run(prompt(32), 4)  # warm-up: first calls pay one-off costs
    ttft_256: list[float] = []
    decode: list[float] = []
    for _ in range(repeat):
        f = run(prompt(256))
        ttft_256.append(_measured(f.timing.ttft_s))
        decode.append(_measured(f.timing.tokens_per_s))
    peaks = {"decode_256": _peak_rss_gib()}
    ttft_2000 = [_measured(run(prompt(2000), 2).timing.ttft_s) for _ in range(max(1, repeat - 1))]
    peaks["prompt_2000"] = _peak_rss_gib()

    fresh_50: list[float] = []
    next_turn_50: list[float] = []
    for _ in range(repeat):
        history = prompt(2000)
        backend.prefix_cache.clear()
        engine.submit(history, SamplingOptions(max_tokens=1, temperature=0)).result()
        turn = engine.submit(history + prompt(50), SamplingOptions(max_tokens=2, temperature=0)).result()[1]
        next_turn_50.append(_measured(turn.timing.ttft_s))
        fresh_50.append(_measured(run(prompt(50), 2).timing.ttft_s))

    peaks["next_turn"] = _peak_rss_gib()
    aggregate = {}
    for n in (1, 2, 4):
        rates = []
        for _ in range(repeat):
            backend.prefix_cache.clear()
            start = time.perf_counter()
            gens = [engine.submit(prompt(64), greedy) for _ in range(n)]
            results = [g.result()[1] for g in gens]
            elapsed = time.perf_counter() - start
            rates.append(sum(r.usage.completion_tokens for r in results) / elapsed)
        aggregate[n] = _median(rates)
    peaks["concurrent"] = _peak_rss_gib()
    engine.close(wait=30)
    return {
        "precision": precision,
        "threads": threads,
        "load_s": round(load_s, 2),
        "rss_after_load_gib": round(rss_after_load, 2),
        "peak_rss_gib": round(_peak_rss_gib(), 2),
        "peak_rss_gib_after": {k: round(v, 2) for k, v in peaks.items()},
        "ttft_256_s": round(_median(ttft_256), 3),
        "ttft_2000_s": round(_median(ttft_2000), 3),
        "ttft_fresh_50_s": round(_median(fresh_50), 3),
        "ttft_next_turn_50_s": round(_median(next_turn_50), 3),
        "decode_tok_s": round(_median(decode), 2),
        "aggregate_tok_s": {str(k): round(v, 2) for k, v in aggregate.items()},
        "decode_runs": [round(x, 2) for x in decode],
    }


def health_under_load(model: str, precision: str, threads: int, seconds: float = 20) -> dict[str, Any]:
    """p50/p99 of /api/health while 4 streams generate, through the real server on loopback."""
    import socket
    import urllib.error
    import urllib.request

    def get(path: str, timeout: float) -> int:
        with urllib.request.urlopen(url + path, timeout=timeout) as r:
            return r.status

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "MODEL_ID": model,
        "DTYPE": precision,
        "TORCH_THREADS": str(threads),
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "HISTORY": "off",
        "LOG_LEVEL": "warning",
        "RATE_LIMIT": "10000/minute",
        "CONTEXT_TOKENS": "4096",
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "service"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if get("/api/health", 5) == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.5)
        stop = time.monotonic() + seconds

        def chat() -> None:
            while time.monotonic() < stop:
                body = {"message": "benchmark " * 50, "max_tokens": 64, "temperature": 0, "stream": True}
                req = urllib.request.Request(
                    url + "/api/chat",
                    data=json.dumps(body).encode(),
                    headers={"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(req, timeout=120) as r:
                    for _ in r:
                        pass

        workers = [threading.Thread(target=chat) for _ in range(4)]
        for w in workers:
            w.start()
        latencies = []
        time.sleep(2)
        while time.monotonic() < stop:
            t = time.perf_counter()
            get("/api/health", 10)
            latencies.append((time.perf_counter() - t) * 1000)
            time.sleep(0.05)
        for w in workers:
            w.join()
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return {
        "health_p50_ms": round(_median(latencies), 1),
        "health_p99_ms": round(p99, 1),
        "health_samples": len(latencies),
    }


def table(results: list[dict[str, Any]]) -> str:
    base = next((r for r in results if r["precision"] == "bfloat16"), None)
    rows = [
        "| precision | load s | peak RSS GiB | TTFT 256 | TTFT 2000 | next turn / fresh (50) | "
        "decode tok/s | × bf16 | 2 chats | 4 chats | 4 / 1 |",
        "|" + "---|" * 11,
    ]
    for r in results:
        agg = r["aggregate_tok_s"]
        ratio = f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}×" if base else "—"
        rows.append(
            f"| {r['precision']} | {r['load_s']} | {r['peak_rss_gib']} | {r['ttft_256_s']} s | "
            f"{r['ttft_2000_s']} s | {r['ttft_next_turn_50_s']} / {r['ttft_fresh_50_s']} s "
            f"({r['ttft_next_turn_50_s'] / r['ttft_fresh_50_s']:.2f}×) | {r['decode_tok_s']} | "
            f"{ratio} | {agg['2']} | {agg['4']} | "
            f"{agg['4'] / agg['1']:.2f}× |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.dev.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="", help="model folder or hub id (default: random Qwen2.5-1.5B)")
    p.add_argument("--precisions", default="float32,bfloat16,int8,int4")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument(
        "--isa",
        default="",
        choices=["", *ISAS],
        help="compute as an older CPU would: AVX2 (no AVX-512) or AVX512_CORE (no VNNI, no bf16)",
    )
    p.add_argument("--health", action="store_true", help="also measure /api/health under 4 streams")
    p.add_argument("--json", default="bench-results.json", help="where to write the figures")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    model = args.model or str(build_random_model(DEFAULT_DIR))
    if args.worker:
        result = measure(model, args.precisions, args.threads, args.repeat, args.new_tokens)
        if args.health:
            result.update(health_under_load(model, args.precisions, args.threads))
        print(json.dumps(result), flush=True)
        return 0
    env = {**os.environ, **isa_environment(args.isa)}
    results = []
    for precision in args.precisions.split(","):
        cmd = [
            sys.executable,
            "-m",
            "service.dev.bench",
            "--worker",
            "--model",
            model,
            "--precisions",
            precision,
            "--threads",
            str(args.threads),
            "--repeat",
            str(args.repeat),
            "--new-tokens",
            str(args.new_tokens),
        ] + (["--health"] if args.health else [])
        print(f"measuring {precision} ...", file=sys.stderr, flush=True)
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            return out.returncode
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"model: {model}  threads: {args.threads}  repeat: {args.repeat}  isa: {args.isa or 'native'}")
    print(table(results))
    for r in results:
        if "health_p99_ms" in r:
            print(
                f"{r['precision']}: /api/health under 4 streams p50 {r['health_p50_ms']} ms, "
                f"p99 {r['health_p99_ms']} ms ({r['health_samples']} samples)"
            )
    Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
