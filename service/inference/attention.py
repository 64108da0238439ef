"""Attention for short queries, which PyTorch's CPU kernel does slowly.

A decode step asks attention for one query per sequence, and a conversation's next turn for a few
dozen queries over a long cached history. PyTorch's CPU flash-attention kernel (what `sdpa` picks)
is built for long queries: one query over 2,000 cached tokens takes it about 2 ms per layer, 20 times
what two small matrix products take, and 50 queries over 2,050 tokens three times. So when the
score matrix is small, attention here is grouped-query attention as plain products (the query heads
that share a key/value head multiply its cache once, with no copy of the cache per head); long
prompts, whose score matrix would be large, still go to `sdpa`.

It is registered with Transformers under the name below and chosen when a model is loaded.
"""

from __future__ import annotations

import functools
import os

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import kernels

NAME = "qwenbox"
MAX_SCORES = 1 << 17  # queries × keys up to which products beat sdpa (measured: 50 × 2,050 and 256 × 256)


def attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Transformers' attention contract: query (batch, heads, q, dim), key/value (batch, kv_heads,
    length, dim), a boolean or additive mask (batch, 1, q, length) or None for plain causal;
    returns (batch, q, heads, dim)."""
    batch, heads, q_length, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    if q_length * length > MAX_SCORES or dropout or kwargs.get("softcap") is not None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    group = heads // kv_heads
    scale = scaling if scaling is not None else dim**-0.5
    work = query.dtype if query.dtype != torch.bfloat16 or fast_bf16_products() else torch.float32
    grouped = query.reshape(batch, kv_heads, group * q_length, dim).to(work)
    key, value = key.to(work), value.to(work)
    scores = torch.matmul(grouped, key.transpose(-1, -2)).float().mul_(scale)
    per_query = scores.view(batch, kv_heads, group, q_length, length)
    if attention_mask is not None:
        mask = attention_mask[:, :, None]
        if mask.dtype == torch.bool:
            per_query.masked_fill_(~mask, float("-inf"))
        else:
            per_query.add_(mask)
    elif q_length > 1:  # the new queries are the last ones: each sees the history and itself
        future = torch.ones(q_length, q_length, dtype=torch.bool).triu(1)
        per_query[..., length - q_length :].masked_fill_(future, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(probs, value).view(batch, heads, q_length, dim)
    return out.transpose(1, 2).to(query.dtype).contiguous(), None


@functools.cache
def fast_bf16_products() -> bool:
    """Whether bf16 matrix products are fast here: only with AVX-512 BF16 (or AMX) instructions.
    Without them (AVX2 hosts, older Xeons) PyTorch falls back to a path 25-50 times slower than
    float32 for these shapes (measured with `invoke bench --isa AVX2`), so products run in float32."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if cap and not any(isa in cap for isa in ("BF16", "AMX", "ALL")):
        return False
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    return bool(kernels.cpu_flags() & {"avx512_bf16", "amx_bf16"})


AttentionInterface.register(NAME, attention)
AttentionMaskInterface.register(NAME, sdpa_mask)
