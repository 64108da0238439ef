"""llama.cpp as a peer in the benchmark: its `llama-server`, measured the way the bench measures us.

`python -m service.dev.bench --peer llama.cpp --peer-bin DIR --peer-model FILE.gguf` starts the
server on a loopback port with the bench's thread count, one slot and no web page, then sends it what
the bench sends this service's engine: a short warm-up, then fresh random 256-token prompts (token
ids, so no tokenizer is involved), greedy, `cache_prompt` off (a fresh prompt is read in full, as
ours is), end-of-text ignored so every run writes the same number of tokens. Times are taken here,
as each streamed token arrives: first token from the moment the request is sent, decode speed over
the tokens after the first. Load is from starting the process to `/health` answering 200 (llama.cpp
maps the file, so its pages arrive on first use: the first prompt pays for some of that). Peak RSS is
the server process's high-water mark (`VmHWM`), mapped weights included.

Nothing of llama.cpp is part of this project: docs/performance.md tells how to build it and which
GGUF file to download.
"""

from __future__ import annotations

import json
import random
import re
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Emit = Callable[[dict[str, Any]], None]


def server_binary(path: str | Path) -> Path:
    """The `llama-server` executable, given it or the folder it was built into."""
    p = Path(path)
    if p.is_dir():
        for candidate in (
            p / "llama-server",
            p / "bin" / "llama-server",
            p / "build" / "bin" / "llama-server",
        ):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"no llama-server in {p} (nor in its bin/ or build/bin/)")
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist")
    return p


def quant_label(gguf: str | Path) -> str:
    """The quantization a GGUF file's name says (Q4_K_M, Q8_0, F16...), or the name itself."""
    name = Path(gguf).name
    found = re.search(
        r"(?i)(?<![a-z0-9])(iq\d_[a-z0-9_]+|q\d_k_[sml]|q\d_k|q\d_\d|bf16|f16|f32)(?![a-z0-9])", name
    )
    return found.group(1).upper() if found else name


@dataclass(frozen=True)
class Completion:
    """One streamed completion as the client saw it; `server` is llama-server's own `timings`."""

    ttft_s: float
    decode_tok_s: float | None
    tokens: int
    server: dict[str, Any]


def read_stream(
    lines: Iterable[bytes], sent_at: float, clock: Callable[[], float] = time.perf_counter
) -> Completion:
    """Time the tokens of a `/completion` server-sent-event stream as they arrive.

    Each `data:` event before the last carries one token (`tokens`, or only `content` from servers
    that do not return ids); the last has `stop: true` and the server's timings."""
    stamps: list[float] = []
    server: dict[str, Any] = {}
    for raw in lines:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        body = line[5:].strip()
        if body == b"[DONE]":
            break
        event = json.loads(body)
        now = clock()
        if "error" in event:
            raise RuntimeError(f"llama-server: {event['error']}")
        if event.get("stop"):
            server = event.get("timings") or {}
            break
        count = len(event["tokens"]) if "tokens" in event else (1 if event.get("content") else 0)
        stamps.extend([now] * count)
    if not stamps:
        raise RuntimeError("llama-server streamed no tokens")
    rate = (
        (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 and stamps[-1] > stamps[0] else None
    )
    return Completion(stamps[0] - sent_at, rate, len(stamps), server)


def complete(url: str, prompt_ids: list[int], n_predict: int, timeout: float = 600) -> Completion:
    """Send one greedy streamed completion of `prompt_ids` to llama-server at `url`."""
    body = {
        "prompt": prompt_ids,
        "n_predict": n_predict,
        "temperature": 0,
        "top_k": 1,
        "cache_prompt": False,
        "ignore_eos": True,
        "return_tokens": True,
        "stream": True,
    }
    request = urllib.request.Request(
        url + "/completion", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    sent_at = time.perf_counter()
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return read_stream(response, sent_at)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def peak_rss_gib(pid: int) -> float:
    """A live process's peak resident memory (VmHWM), in GiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError(f"no VmHWM for process {pid}")


class LlamaServer:
    """A `llama-server` on a loopback port, started and stopped by this process."""

    def __init__(self, binary: Path, gguf: Path, threads: int, context: int = 4096):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [
            str(binary),
            "-m",
            str(gguf),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "-t",
            str(threads),
            "-tb",
            str(threads),
            "-c",
            str(context),
            "-np",
            "1",
            "--no-webui",
        ]
        self.log = tempfile.TemporaryFile()
        self.process: subprocess.Popen[bytes] | None = None
        self.load_s = float("nan")

    def start(self, timeout: float = 300) -> LlamaServer:
        t0 = time.perf_counter()
        self.process = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        self.load_s = time.perf_counter() - t0
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"llama-server was not ready after {timeout} s:\n{self.log_tail()}")

    def peak_rss_gib(self) -> float:
        assert self.process is not None
        return peak_rss_gib(self.process.pid)

    def log_tail(self, chars: int = 3000) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.log.close()


def measure(
    binary: str | Path,
    gguf: str | Path,
    *,
    threads: int,
    repeat: int,
    new_tokens: int,
    prompt_tokens: int = 256,
    vocab: int = 151936,
    emit: Emit = lambda event: None,
) -> dict[str, Any]:
    """llama.cpp's row of the bench table for one GGUF file: load, TTFT, decode speed, peak RSS."""
    label = f"llama.cpp {quant_label(gguf)}"
    rng = random.Random(1)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(vocab // 10, vocab - vocab // 10) for _ in range(n)]

    emit({"event": "phase", "phase": "load"})
    server = LlamaServer(server_binary(binary), Path(gguf), threads)
    with server:
        emit({"event": "figure", "phase": "load", "value": round(server.load_s, 2), "unit": "s"})
        complete(server.url, prompt(32), 4)  # warm-up, as for our engine
        ttft: list[float] = []
        decode: list[float] = []
        server_prompt: list[float] = []
        for i in range(repeat):
            c = complete(server.url, prompt(prompt_tokens), new_tokens)
            if c.decode_tok_s is None:
                raise RuntimeError("llama-server wrote a single token: no decode speed to measure")
            ttft.append(c.ttft_s)
            decode.append(c.decode_tok_s)
            if "prompt_per_second" in c.server:
                server_prompt.append(float(c.server["prompt_per_second"]))
            run = {"run": i + 1, "runs": repeat}
            emit(
                {
                    "event": "figure",
                    "phase": f"ttft_{prompt_tokens}",
                    "value": round(c.ttft_s, 3),
                    "unit": "s",
                    **run,
                }
            )
            emit(
                {
                    "event": "figure",
                    "phase": "decode",
                    "value": round(c.decode_tok_s, 2),
                    "unit": "tok/s",
                    **run,
                }
            )
        peak = server.peak_rss_gib()
    return {
        "engine": label,
        "gguf": str(gguf),
        "command": server.command,
        "threads": threads,
        "load_s": round(server.load_s, 2),
        "peak_rss_gib": round(peak, 2),
        f"ttft_{prompt_tokens}_s": round(statistics.median(ttft), 3),
        "decode_tok_s": round(statistics.median(decode), 2),
        "decode_runs": [round(x, 2) for x in decode],
        "server_prompt_tok_s": round(statistics.median(server_prompt), 1) if server_prompt else None,
    }
