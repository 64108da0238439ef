"""What building one prompt costs: CPU seconds and peak memory of `chat.build_prompt` on long
conversations, each case in a fresh process so its peak RSS is its own.

    python -m service.dev.prompt_cost [--tokenizer tiny|qwenlike] [--case NAME]

Cases: `request-903k` (a 903 KB /api/chat body of 1,000 turns, trimmed to fit), `huge-newest-413`
(a 900 KB newest message, refused), `stored-400` (a stored chat of 400 turns plus a new one).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = ("request-903k", "huge-newest-413", "stored-400")
_WORDS = "the quick brown fox jumps over the lazy dog while docker packages an image 42 café".split()


def _text(chars: int, seed: int) -> str:
    words, n, i = [], 0, seed
    while n < chars:
        w = _WORDS[i % len(_WORDS)]
        words.append(w)
        n += len(w) + 1
        i = i * 7 + 3
    return " ".join(words)[:chars]


def conversation(case: str) -> list[dict[str, str]]:
    if case == "request-903k":
        turns = [_text(903, i) for i in range(1000)]
    elif case == "huge-newest-413":
        turns = [_text(900, i) for i in range(4)] + [_text(900_000, 99)]
    elif case == "stored-400":
        turns = [_text(1500, i) for i in range(401)]
    else:
        raise SystemExit(f"unknown case {case}")
    roles = ["user", "assistant"]
    return [{"role": roles[(len(turns) - 1 - i) % 2], "content": t} for i, t in enumerate(turns)]


def qwenlike_tokenizer(path: Path):
    """A byte-level BPE with Qwen2's pre-tokenizer (its split regex, NFC) and a larger vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .tiny_models import _CORPUS, CHATML_TEMPLATE, SPECIAL_TOKENS

    pattern = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=8192,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [_CORPUS, " ".join(_WORDS)] * 50 + [_text(5000, i) for i in range(20)]
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(path)
    return fast


def _tokenizer(kind: str, folder: Path):
    from transformers import AutoTokenizer

    from .tiny_models import build_tokenizer

    if not (folder / "tokenizer.json").exists():
        (build_tokenizer if kind == "tiny" else qwenlike_tokenizer)(folder)
    return AutoTokenizer.from_pretrained(folder)


def measure(case: str, kind: str, folder: Path) -> dict:
    from service.chat import build_prompt
    from service.errors import PromptTooLong

    tokenizer = _tokenizer(kind, folder)
    messages = conversation(case)
    body_kb = len(json.dumps({"messages": messages})) / 1000
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cpu0, wall0 = time.process_time(), time.perf_counter()
    try:
        prompt = build_prompt(tokenizer, messages, context_length=4096, max_tokens=512)
        outcome = f"{len(prompt.ids)} tokens, {prompt.dropped_messages} turns dropped"
    except PromptTooLong as exc:
        outcome = f"413: {exc}"[:100]
    return {
        "case": case,
        "tokenizer": kind,
        "body_kb": round(body_kb),
        "cpu_s": round(time.process_time() - cpu0, 3),
        "wall_s": round(time.perf_counter() - wall0, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "rss_before_mb": round(rss0 / 1024),
        "outcome": outcome,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", choices=("tiny", "qwenlike"), action="append")
    parser.add_argument("--case", choices=CASES, action="append")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "qwenbox-prompt-cost"))
    args = parser.parse_args()
    kinds, cases = args.tokenizer or ["tiny", "qwenlike"], args.case or list(CASES)
    if args.one:
        print(json.dumps(measure(cases[0], kinds[0], Path(args.dir) / kinds[0])))
        return
    for kind in kinds:
        for case in cases:
            out = subprocess.run(
                [sys.executable, "-m", "service.dev.prompt_cost", "--one", "--case", case]
                + ["--tokenizer", kind, "--dir", args.dir],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            print(out.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
