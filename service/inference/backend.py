"""The Transformers model behind the engine: batched decoding of a model `loading` has loaded.

Why not `model.generate()`: a chat server needs what it does not give. Several conversations decode
together in one forward pass (a CPU reads the weights once per step whatever the batch, so four
chats cost little more than one); a conversation's next turn reuses the KV cache of its last one
instead of reading the whole history again; and each request keeps its own sampling settings and
seed inside the batch. The pieces are Transformers' own (model forward, `DynamicCache`, logits
processors); only the scheduling is ours.

Sequences join a running batch left-padded to its length, leave it when they end, and the padding
that no row needs any more is trimmed. Before joining, a sequence reads its prompt into a cache of its
own, `PREFILL_CHUNK` tokens per `prefill` call, so the engine can run decode steps of the batch
between two pieces of a prompt (`admit` reads it all at once, for callers that do not interleave);
while the batch is empty, pieces are `LONE_PREFILL_CHUNK` long (a lone prompt is read in one pass).
For the models the lean path knows (`decoder.py`), prompts and decode steps go through it instead of
the model's forward: the same arithmetic, with fused products.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol, cast

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, DynamicCache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from .decoder import LeanDecoder
from .engine import SamplingOptions
from .loading import load_model

log = logging.getLogger(__name__)

PREFIX_CACHE_ENTRIES = 4
GREEDY_BELOW = 1e-6  # a temperature under this samples greedily
# Prompts are read this many tokens at a time (as llama.cpp's batch size does), and the engine runs
# a decode step of the running chats between two pieces: so a chat that is answering waits at most
# one piece for its next token while another's prompt is read (128 tokens: about 1.5 s at int8 on a
# 2-core AVX2 host, where 512 stalled it 6 s). Smaller pieces cost more forward passes and more decode
# steps in between (both delay the prompt's first token: reading is compute-bound, so a piece of 128
# already keeps the cores busy); larger ones stall the running chats longer and hold more activation
# memory at once. Four 256-token prompts sent together then give the first chat 7 tokens before the
# fourth's first. Compare sizes with `python -m service.dev.concurrency --prefill-chunks 64,128,256`:
# on a 2-core AVX2 EPYC (int8, prompt kernel) 64 / 128 / 256 gave the last chat its first token at
# 16.6 / 13.3 / 12.6 s and the running chats a longest wait of 1.2 / 1.9 / 3.5 s between two tokens.
PREFILL_CHUNK = 128
# With no chat decoding there is nothing to interleave, so a prompt is read this many tokens a pass
# instead: a lone 256-token prompt in one pass (each pass costs a forward of every layer, and pieces
# only delay its first token), yet a long one still bounded in the activation memory one pass holds
# (a 512-token pass: ~20 MB per MLP activation, its attention scores ~12 x 512 x context floats).
LONE_PREFILL_CHUNK = 512
MIN_PREFIX_REUSE = 16


@dataclass(eq=False)
class Sequence:
    """One request inside the backend: its tokens so far and how to pick the next one."""

    prompt_ids: list[int]
    options: SamplingOptions
    generated: list[int] = field(default_factory=list)
    length: int = 0  # tokens held in the KV cache for this row
    reused: int = 0  # prompt tokens served from the prefix cache
    cache: DynamicCache | None = None  # its own cache while its prompt is read, before it joins the batch
    penalties: LogitsProcessorList = field(default_factory=LogitsProcessorList)  # on the whole vocabulary
    top_k: int = 0  # sample among this many best tokens (0: all)
    warpers: LogitsProcessorList = field(default_factory=LogitsProcessorList)  # on those candidates
    greedy: bool = True
    generator: torch.Generator | None = None


class PrefixCache:
    """KV caches of recently finished sequences, by their token ids, to skip re-reading a
    conversation's history on its next turn (what llama.cpp's prompt cache does)."""

    def __init__(self, entries: int = PREFIX_CACHE_ENTRIES):
        self._entries: OrderedDict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self._max = entries

    def put(self, ids: list[int], kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        key = tuple(ids)
        self._entries[key] = kv
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def take(self, ids: list[int]) -> tuple[int, DynamicCache | None]:
        """The longest cached prefix of `ids` (leaving at least one token to compute) as a fresh
        cache of that length, or (0, None)."""
        best, best_key = 0, None
        for key in self._entries:
            n = _common_prefix(key, ids)
            if n > best:
                best, best_key = n, key
        best = min(best, len(ids) - 1)
        if best_key is None or best < MIN_PREFIX_REUSE:
            return 0, None
        self._entries.move_to_end(best_key)
        kv = self._entries[best_key]
        return best, DynamicCache(ddp_cache_data=[(k[:, :, :best], v[:, :, :best]) for k, v in kv])

    def clear(self) -> None:
        self._entries.clear()


def _common_prefix(a: tuple[int, ...], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class _KVLayer(Protocol):
    """What this backend touches of a cache layer: keys and values (batch, heads, positions, dim)."""

    keys: torch.Tensor
    values: torch.Tensor

    def batch_select_indices(self, indices: torch.Tensor) -> None: ...


def _kv_layers(cache: DynamicCache) -> list[_KVLayer]:
    """`cache`'s layers as this backend uses them. The models it loads have full-attention layers
    only (Transformers' `DynamicLayer`), and a cache here has always read a prompt, so each layer's
    keys and values (typed Optional for a layer not yet written) are there."""
    return cast(list[_KVLayer], cache.layers)


class TransformersBackend:
    """A causal LM on CPU that decodes any number of sequences together."""

    def __init__(
        self,
        model_id: str,
        *,
        dtype: str = "bfloat16",
        threads: int = 0,
        context_tokens: int = 4096,
        max_batch: int = 4,
    ):
        if threads:
            torch.set_num_threads(threads)
        started = time.perf_counter()
        self.name = model_id
        self.max_batch = max_batch
        self.tokenizer = AutoTokenizer.from_pretrained(model_id)
        self.model = load_model(model_id, dtype)
        config_ctx = getattr(self.model.config, "max_position_embeddings", None) or context_tokens
        self.context_length = min(context_tokens, config_ctx)
        self.generation_config = self.model.generation_config
        eos = self.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_token_ids = frozenset([eos] if isinstance(eos, int) else eos)
        self.prefix_cache = PrefixCache()
        # the lean decode step for the models it knows (None: Transformers' forward decodes)
        self.decoder = LeanDecoder.build(self.model)
        self._rows: list[Sequence] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None
        log.info("loaded %s (%s) in %.1f s", model_id, dtype, time.perf_counter() - started)

    # --- the engine's interface ------------------------------------------------------------------
    def admit(self, prompt_ids: list[int], options: SamplingOptions) -> tuple[Sequence, int]:
        """Read the whole prompt (reusing a cached prefix when there is one), join the batch, and
        return the sequence with its first token."""
        seq = self.begin(prompt_ids, options)
        while (token := self.prefill(seq)) is None:
            pass
        return seq, token

    def begin(self, prompt_ids: list[int], options: SamplingOptions) -> Sequence:
        """A new sequence, its cached prefix (if any) taken, its prompt not read yet."""
        seq = Sequence(list(prompt_ids), options)
        self._setup_sampling(seq)
        seq.reused, seq.cache = self.prefix_cache.take(seq.prompt_ids)
        seq.length = seq.reused
        return seq

    def prefill(self, seq: Sequence) -> int | None:
        """Read the next `PREFILL_CHUNK` tokens of the prompt into the sequence's own cache
        (`LONE_PREFILL_CHUNK` while no chat is decoding, since no one waits between two pieces);
        after the last piece, sample its first token and join the batch (returning the token)."""
        total = len(seq.prompt_ids)
        start = seq.length
        end = min(start + (PREFILL_CHUNK if self._rows else max(PREFILL_CHUNK, LONE_PREFILL_CHUNK)), total)
        cache = seq.cache if seq.cache is not None else DynamicCache()
        with torch.inference_mode():
            if self.decoder is not None:  # the lean path: fused products, no mask tensor
                logits = self.decoder.prefill(torch.tensor(seq.prompt_ids[start:end]), start, cache)
            else:
                out = self.model(
                    input_ids=torch.tensor([seq.prompt_ids[start:end]]),
                    attention_mask=torch.ones(1, end, dtype=torch.long),
                    position_ids=torch.arange(start, end).unsqueeze(0),
                    cache=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
                cache, logits = out.cache, out.logits[0, -1]
        seq.cache, seq.length = cache, end
        if end < total:
            return None
        token = self._sample(seq, logits)
        seq.cache = None
        self._join(seq, cache)
        return token

    def unread(self, seq: Sequence) -> int:
        """Prompt tokens `seq` has still to read (0 once it has joined the batch)."""
        return max(0, len(seq.prompt_ids) - seq.length)

    def step(self) -> list[int]:
        """One decode step for every sequence in the batch: the next token of each, in order."""
        rows = self._rows
        cache, mask = self._batch()
        last = torch.tensor([[s.generated[-1]] for s in rows])
        positions = torch.tensor([[s.length] for s in rows])
        self._mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=torch.long)], dim=1)
        with torch.inference_mode():
            if self.decoder is not None:
                logits = self.decoder.step(last[:, 0], positions[:, 0], self._mask, _kv_layers(cache))
            else:
                out = self.model(
                    input_ids=last,
                    attention_mask=self._mask,
                    position_ids=positions,
                    cache=cache,
                    use_cache=True,
                )
                self._cache, logits = out.cache, out.logits[:, -1]
        tokens = []
        for i, seq in enumerate(rows):
            seq.length += 1
            tokens.append(self._sample(seq, logits[i]))
        return tokens

    def release(self, seq: Sequence) -> None:
        """Take a finished sequence out of the batch, keeping its KV cache for a next turn; or drop
        the cache of one whose prompt was still being read (its client left)."""
        if seq not in self._rows:
            seq.cache = None
            return
        index = self._rows.index(seq)
        cache, mask = self._batch()
        width = mask.shape[1]
        kv = [
            (
                layer.keys[index : index + 1, :, width - seq.length :].clone(),
                layer.values[index : index + 1, :, width - seq.length :].clone(),
            )
            for layer in _kv_layers(cache)
        ]
        self.prefix_cache.put(seq.prompt_ids + seq.generated[:-1], kv)
        keep = [i for i in range(len(self._rows)) if i != index]
        self._rows.pop(index)
        if not self._rows:
            self._cache = self._mask = None
            return
        keep_t = torch.tensor(keep)
        mask = self._mask = mask[keep_t]
        for layer in _kv_layers(cache):
            layer.batch_select_indices(keep_t)
        unused = int((mask.sum(dim=0) == 0).cumprod(dim=0).sum())  # leading all-padding columns
        if unused:
            self._mask = mask[:, unused:]
            for layer in _kv_layers(cache):
                layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]

    def reset(self) -> None:
        self._rows, self._cache, self._mask = [], None, None

    @property
    def batch_size(self) -> int:
        return len(self._rows)

    # --- internals -------------------------------------------------------------------------------
    def _batch(self) -> tuple[DynamicCache, torch.Tensor]:
        """The running batch's KV cache and attention mask (there is a batch: a sequence is in it)."""
        if self._cache is None or self._mask is None:
            raise RuntimeError("no sequence is in the batch")
        return self._cache, self._mask

    def _join(self, seq: Sequence, cache: DynamicCache) -> None:
        """Append `seq`'s single-row cache to the batch, left-padding whichever side is shorter."""
        mask = torch.ones(1, seq.length, dtype=torch.long)
        if self._cache is None:
            self._rows, self._cache, self._mask = [seq], cache, mask
            return
        batch_cache, batch_mask = self._batch()
        width = batch_mask.shape[1]
        grow, pad = max(0, seq.length - width), max(0, width - seq.length)
        if grow:
            batch_mask = F.pad(batch_mask, (grow, 0))
        for mine, theirs in zip(_kv_layers(batch_cache), _kv_layers(cache), strict=True):
            keys, values = mine.keys, mine.values
            if grow:
                keys, values = F.pad(keys, (0, 0, grow, 0)), F.pad(values, (0, 0, grow, 0))
            new_k, new_v = theirs.keys, theirs.values
            if pad:
                new_k, new_v = F.pad(new_k, (0, 0, pad, 0)), F.pad(new_v, (0, 0, pad, 0))
            mine.keys, mine.values = torch.cat([keys, new_k]), torch.cat([values, new_v])
        self._mask = torch.cat([batch_mask, F.pad(mask, (pad, 0))])
        self._rows.append(seq)

    def _setup_sampling(self, seq: Sequence) -> None:
        """The model's generation_config defaults, overridden by the request."""
        gc_ = self.generation_config
        opts = seq.options
        temperature = (
            opts.temperature if opts.temperature is not None else (gc_.temperature if gc_.do_sample else 0.0)
        )
        # Below this the scores divided by it overflow (5e-324 made every probability NaN); at any
        # temperature this small sampling picks the top token anyway.
        seq.greedy = temperature < GREEDY_BELOW
        penalties, warpers = LogitsProcessorList(), LogitsProcessorList()
        if gc_.repetition_penalty not in (None, 1.0):
            penalties.append(RepetitionPenaltyLogitsProcessor(gc_.repetition_penalty))
        if gc_.suppress_tokens:
            penalties.append(SuppressTokensLogitsProcessor(gc_.suppress_tokens))
        if not seq.greedy:
            seq.top_k = gc_.top_k or 0
            warpers.append(TemperatureLogitsWarper(temperature))
            top_p = opts.top_p if opts.top_p is not None else gc_.top_p
            if top_p is not None and top_p < 1.0:
                warpers.append(TopPLogitsWarper(top_p))
            if getattr(gc_, "min_p", None):
                warpers.append(MinPLogitsWarper(gc_.min_p))
            seq.generator = torch.Generator()
            if opts.seed is not None:
                seq.generator.manual_seed(opts.seed)
            else:
                seq.generator.seed()
        seq.penalties, seq.warpers = penalties, warpers

    def _sample(self, seq: Sequence, logits: torch.Tensor) -> int:
        scores = logits.float().unsqueeze(0)
        if seq.penalties:
            # transformers annotates input_ids with the legacy torch.LongTensor class, which no torch
            # function is typed to return; this is an int64 tensor, as it expects.
            ids_so_far = torch.tensor([seq.prompt_ids + seq.generated])
            scores = seq.penalties(ids_so_far, scores)  # type: ignore[arg-type]
        if seq.greedy:
            token = int(scores.argmax(dim=-1))
        else:
            probs, ids = self.distribution(seq, scores)
            choice = int(torch.multinomial(probs[0], 1, generator=seq.generator))
            token = choice if ids is None else int(ids[0, choice])
        seq.generated.append(token)
        return token

    @staticmethod
    def distribution(seq: Sequence, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Probabilities to sample from and the token ids they belong to (None: the whole
        vocabulary). With top-k, temperature and top-p see only the k best scores: the same
        distribution as Transformers' chain (whose top-k sets every other score to -inf), without
        sorting 152k scores for top-p every token, which took 5-10 ms per sequence."""
        ids = None
        if 0 < seq.top_k < scores.shape[-1]:
            scores, ids = scores.topk(seq.top_k, dim=-1)
        # temperature, top-p and min-p read only the scores, never the ids (annotated as required)
        scores = seq.warpers(None, scores)  # type: ignore[arg-type]
        return torch.softmax(scores, dim=-1), ids
