"""Attention for one new token at a time, which PyTorch's CPU kernel does slowly.

Every decode step asks attention for a single query per sequence. PyTorch's CPU flash-attention
kernel (what `sdpa` picks) is built for long queries: for one query over 2,000 cached tokens it
takes about 2 ms per layer, 20 times what two small matrix products take, and it grows with the
batch. Over 28 layers that was a fifth of every decode step. So decode steps here run grouped-query
attention as plain products (the query heads that share a key/value head multiply its cache once,
no copy of the cache per head), and prompts (many queries) still go to `sdpa`.

It is registered with Transformers under the name below and chosen when a model is loaded.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "qwenbox"


def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              **kwargs) -> tuple[torch.Tensor, None]:
    """Transformers' attention contract: query (batch, heads, q, dim), key/value (batch, kv_heads,
    length, dim), a boolean mask (batch, 1, q, length) or None; returns (batch, q, heads, dim)."""
    batch, heads, q_length, dim = query.shape
    if q_length != 1 or dropout or kwargs.get("softcap") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    kv_heads = key.shape[1]
    scale = scaling if scaling is not None else dim ** -0.5
    grouped = query.view(batch, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(grouped, key.transpose(-1, -2)).float() * scale
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores.masked_fill_(~attention_mask, float("-inf"))
        else:
            scores += attention_mask
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(probs, value)
    return out.reshape(batch, 1, heads, dim), None


AttentionInterface.register(NAME, attention)
AttentionMaskInterface.register(NAME, sdpa_mask)
