"""The vision row of the benchmark: one picture at the resolution cap plus a short question.

`python -m service.dev.vision_bench` (or `vision_row()` from another benchmark) builds, once, a
model with HuggingFaceTB/SmolVLM-500M-Instruct's exact architecture and random weights
(`tiny_vision.SMOLVLM_500M`: it costs what the real one costs per image and per token), loads it the
way the service does (`VisionBackend`: language model int8, vision encoder float32), and measures in
a process of its own (so its peak RSS, loading included, is its own):

- time to first token for one image of IMAGE_MAX_PIXELS (1024 x 1024 by default) and a short
  question: the image processor, the vision encoder over its tiles, and the prefill of the prompt;
- decode tokens per second after it;
- peak RSS.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
DEFAULT_DIR = CACHE / "qwen-box" / "bench-smolvlm-500m"
QUESTION = "What is in this picture? Answer in one sentence."


def build(path: Path = DEFAULT_DIR) -> Path:
    """The random SmolVLM-500M architecture on disk (about 1 GB in bf16), built once."""
    if (path / "config.json").exists():
        return path
    import torch

    from .tiny_vision import SMOLVLM_500M, build_tiny_vision

    path.mkdir(parents=True, exist_ok=True)
    torch.set_default_dtype(torch.bfloat16)  # the random init in bf16: half the memory
    try:
        return build_tiny_vision(path, dims=SMOLVLM_500M, endless=True)
    finally:
        torch.set_default_dtype(torch.float32)


def default_max_pixels() -> int:
    """The service's own resolution cap (Settings.image_max_pixels' default): the row measures what
    a user's picture costs out of the box."""
    from ..config import Settings

    return Settings().image_max_pixels


def _label(folder: str) -> str:
    if Path(folder) == DEFAULT_DIR:
        return "SmolVLM-500M architecture, random weights"
    return Path(folder).name


def _measure(folder: str, precision: str, max_pixels: int, new_tokens: int, threads: int) -> dict[str, Any]:
    """In this process: load, then one question with one image at the cap. Returns the figures."""
    from PIL import Image

    from ..inference.vision import VisionBackend, VisionOptions

    t0 = time.perf_counter()
    backend = VisionBackend(folder, dtype=precision, threads=threads, max_pixels=max_pixels)
    load_s = time.perf_counter() - t0
    encoder = _timed_encoder(backend.model)
    # warm-up: a small picture (one tile) and 4 tokens, so first-call costs (kernel packing, thread
    # pools, allocator growth) are not counted in the figures below, as the text bench's warm-up does
    small = Image.effect_noise((64, 64), 64).convert("RGB")
    ids, inputs = backend.prepare([{"role": "user", "content": "Warm up.", "images": [small]}])
    seq, _ = backend.admit(ids, VisionOptions(max_tokens=4, inputs=inputs, images=1))
    for _ in range(3):
        backend.step()
    backend.release(seq)
    encoder.clear()
    side = int(math.sqrt(max_pixels))
    image = Image.effect_noise((side, side), 64).convert("RGB")  # a photo-like picture at the cap
    started = time.perf_counter()
    ids, inputs = backend.prepare([{"role": "user", "content": QUESTION, "images": [image]}])
    prepared = time.perf_counter()
    seq, _ = backend.admit(ids, VisionOptions(max_tokens=new_tokens, inputs=inputs, images=1))
    first = time.perf_counter()
    for _ in range(new_tokens - 1):
        backend.step()
    done = time.perf_counter()
    backend.release(seq)
    pixels = inputs["pixel_values"]
    image_token = backend.processor.image_token_id
    encoder_dtype = "float32" if precision in ("int8", "int4") else precision
    return {
        "model": _label(folder),
        "precision": f"{precision} language model, {encoder_dtype} vision encoder",
        "image": f"{side}x{side}",
        "prompt_tokens": len(ids),
        "image_tokens": sum(1 for i in ids if i == image_token),
        # Idefics3 cuts an image into tiles (batch, tiles, C, H, W); Qwen2-VL reads one grid of patches
        "image_tiles": int(pixels.shape[1]) if pixels.dim() == 5 else 1,
        "load_s": round(load_s, 2),
        "preprocess_s": round(prepared - started, 3),
        "ttft_s": round(first - started, 3),
        "encoder_s": round(sum(encoder), 3),  # of ttft_s: the vision encoder (and connector) alone
        "decode_tokens_per_s": round((new_tokens - 1) / (done - first), 2),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "threads": threads or os.cpu_count(),
    }


def _timed_encoder(model: Any) -> list[float]:
    """Seconds each call of the model's vision encoder took (appended as it runs): the share of TTFT
    that is the picture's, not the prompt's."""
    inner = model.get_submodule("model")
    vision = next(getattr(inner, n) for n in ("vision_model", "visual", "vision_tower") if hasattr(inner, n))
    times: list[float] = []
    started: list[float] = []
    vision.register_forward_pre_hook(lambda *_: started.append(time.perf_counter()))
    vision.register_forward_hook(lambda *_: times.append(time.perf_counter() - started.pop()))
    return times


class VisionRowFailed(RuntimeError):
    pass


def vision_row(
    precision: str = "int8",
    *,
    max_pixels: int = 0,
    new_tokens: int = 32,
    threads: int = 0,
    folder: Path | None = None,
    timeout: float = 600,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The vision row, measured in a fresh process (its peak RSS is its own): a dict of figures.
    `max_pixels` 0 is the service's default cap; `folder` another vision model (a tiny one in tests);
    VisionRowFailed says why the measuring process failed."""
    folder = build(folder or DEFAULT_DIR)
    command = [
        sys.executable, "-m", "service.dev.vision_bench", "--measure", str(folder),
        "--precision", precision, "--max-pixels", str(max_pixels or default_max_pixels()),
        "--new-tokens", str(new_tokens), "--threads", str(threads),
    ]  # fmt: skip
    try:
        out = subprocess.run(command, check=True, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.CalledProcessError as exc:
        raise VisionRowFailed(f"the vision row exited with {exc.returncode}\n{exc.stderr[-3000:]}") from exc
    except subprocess.TimeoutExpired as exc:
        raise VisionRowFailed(f"the vision row took more than {timeout:.0f} s") from exc
    return json.loads(out.stdout.strip().splitlines()[-1])


HEADER = "| row | prompt | TTFT | decode tok/s | peak RSS GiB |"


def _image_cell(row: dict[str, Any]) -> str:
    tiles = f"{row['image_tiles']} tiles, " if row.get("image_tiles", 1) > 1 else ""
    tokens = f"{row['image_tokens']} image tokens" if "image_tokens" in row else "image"
    return f"{row['image']} picture ({tiles}{tokens}) + question: {row['prompt_tokens']} tokens"


def markdown(row: dict[str, Any], text: dict[str, Any] | None = None) -> str:
    """The vision row as the benchmark shows it, under the text default's row (`text`: a result of
    `bench.measure`) when there is one, so the two read side by side."""
    lines = [HEADER, "|---|---|---|---|---|"]
    encoder = f" (vision encoder {row['encoder_s']} s)" if "encoder_s" in row else ""
    if text is not None:
        lines.append(
            f"| qwen-box {text['precision']} (text default) | 256 tokens | {text['ttft_256_s']} s | "
            f"{text['decode_tok_s']} | {text['peak_rss_gib']} |"
        )
    lines.append(
        f"| {row['model']} ({row['precision']}) | {_image_cell(row)} | {row['ttft_s']} s{encoder} | "
        f"{row['decode_tokens_per_s']} | {row['peak_rss_gib']} |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # the child process: measure this folder
    parser.add_argument("--precision", default="int8", choices=["int8", "int4", "bfloat16", "float32"])
    parser.add_argument(
        "--max-pixels", type=int, default=0, help="pixels per image (default: IMAGE_MAX_PIXELS')"
    )
    parser.add_argument("--model", default="", help="a vision model folder (default: random SmolVLM-500M)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.measure:
        row = _measure(args.measure, args.precision, args.max_pixels, args.new_tokens, args.threads)
        print(json.dumps(row))
        return 0
    row = vision_row(
        args.precision,
        max_pixels=args.max_pixels,
        new_tokens=args.new_tokens,
        threads=args.threads,
        folder=Path(args.model) if args.model else None,
    )
    print(json.dumps(row, indent=2))
    print(markdown(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
