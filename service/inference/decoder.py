"""A lean decode step and prompt path for Qwen2-family text models, over the loaded Transformers
modules' weights.

A decode step reads every weight once, so its pace should be the products'; on a 2-core AVX2 host
Transformers' generic forward added ~30 ms to int4's ~85 ms of products (per layer: its
decorators, keyword plumbing, mask building, a cache append by concatenation that copies the whole
cache every step, three separate q/k/v products and two gate/up ones, each quantizing the same
activation row again). This module computes the same step with only the arithmetic:

- q, k and v as one product, and gate and up as one: their quantized rows concatenated once
  (`Int8Linear` has a scale per row and `Int4Linear` its groups per row, so the concatenation is the
  same weights, exact); the original layers become views of the fused rows, so no memory is added;
- per layer three calls to the compiled library (`kernels.cpp`, the same build as the products):
  RMSNorm with the residual add; rotary, the cache write and grouped-query attention over the
  cache (the padding mask read as is); SiLU x up. Without the compiled library the same step runs
  in PyTorch ops (torch's `rms_norm`, rotary on q and k at once, products over the cache as
  `attention.py` does, the padding mask built once per step, not once per layer);
- the KV cache written in place into a buffer with room to grow (`_Room`): the cache layers'
  `keys` / `values` are views of it, so everything else the backend does to a cache (join, release,
  trim, the prefix cache) works on them unchanged and simply makes the next step re-buffer.

Prompts (`LeanDecoder.prefill`) take the same fused products: Transformers' forward quantized and
packed each layer's input five times for its five products where two suffice, and built a causal
mask and applied it to every layer's scores; here SiLU x up is one compiled pass over the fused
product and attention is PyTorch's causal `sdpa` with no mask tensor (a piece after a cached prefix
goes through `attention.py`). On the 2-core AVX2 EPYC a 256-token int8 prompt took 3.59 s against
Transformers' 4.18 s (medians of 4, interleaved in one process, load ~4).

`LeanDecoder.build` returns None for a model it does not know (other architectures, sliding-window
attention, the vision models), which then read prompts and decode through the plain Transformers
forward.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from . import kernels
from .attention import attention as prompt_attention
from .memory import return_freed_memory
from .quantized import DECODE_ROWS, FUSED, Int4Linear, Int8Linear, kernel_plan

log = logging.getLogger(__name__)

ROOM = 256  # positions a cache buffer grows by: one copy of the cache per 256 steps, ~15 MB a row at 1.5B


@dataclass
class _Room:
    """A cache layer's keys and values with spare positions after them, and the views handed out."""

    keys: torch.Tensor  # (batch, kv_heads, capacity, dim)
    values: torch.Tensor
    key_view: torch.Tensor
    value_view: torch.Tensor


@dataclass
class _Layer:
    input_norm: torch.Tensor
    qkv: Callable[[torch.Tensor], torch.Tensor]
    o_proj: Callable[[torch.Tensor], torch.Tensor]
    post_norm: torch.Tensor
    gate_up: Callable[[torch.Tensor], torch.Tensor]
    down: Callable[[torch.Tensor], torch.Tensor]


def _fuse(layers: list[torch.nn.Module]) -> Callable[[torch.Tensor], torch.Tensor]:
    """One product for several layers that read the same input, their outputs side by side: the
    rows concatenated once, the originals rebound to views of them (the same bytes, nothing added).
    Layers that cannot be fused this way are called one by one and their outputs concatenated."""
    if all(type(m) is Int8Linear for m in layers):
        int8 = [m for m in layers if isinstance(m, Int8Linear)]
        fused8 = Int8Linear(
            _joined([m.values for m in int8]),
            torch.cat([m.scales for m in int8]),
            _cat_bias([m.bias for m in int8], [m.out_features for m in int8]),
        )
        start = 0
        for m in int8:
            end = start + m.out_features
            m.values, m.scales = fused8.values[start:end], fused8.scales[start:end]
            if m.bias is not None and fused8.bias is not None:
                m.bias = fused8.bias[start:end]
            start = end
        return fused8
    int4 = [m for m in layers if isinstance(m, Int4Linear)]
    if (
        len(int4) == len(layers)
        and all(m._kernel is not None for m in int4)
        and len({m.group for m in int4}) == 1
    ):
        fused4 = Int4Linear.from_groups(
            _joined([m.q4 for m in int4]),
            torch.cat([m.scales for m in int4]),
            torch.cat([m.lows for m in int4]),
            _cat_bias([m.bias for m in int4], [m.out_features for m in int4]),
        )
        start = 0
        for m4 in int4:
            end = start + m4.out_features
            m4.q4, m4.scales, m4.lows = fused4.q4[start:end], fused4.scales[start:end], fused4.lows[start:end]
            if m4.bias is not None and fused4.bias is not None:
                m4.bias = fused4.bias[start:end]
            start = end
        return fused4

    def separately(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(x) for m in layers], dim=-1)

    return separately


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """`parts`' rows as one tensor: a view when they lie one after another in one storage (a
    pre-quantized checkpoint, mapped, stores each `FUSED` group so), else their concatenation. The
    view keeps the weights where the file's pages are: a copy would add the fused layers' bytes (two
    thirds of the model) to the process's memory and their page faults to its start."""
    first = parts[0]
    storage, end = first.untyped_storage(), first.data_ptr()
    for part in parts:
        if (
            part.dtype != first.dtype
            or part.shape[1:] != first.shape[1:]
            or not part.is_contiguous()
            or part.untyped_storage().data_ptr() != storage.data_ptr()
            or part.data_ptr() != end
        ):
            return torch.cat(parts)
        end += part.nbytes
    rows = sum(part.shape[0] for part in parts)
    return first.as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())


def _direct(module: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The compiled product of a quantized layer called with its tensors bound, for a step's
    contiguous float32 rows: the layer's forward around it (reshapes, dtype checks, the kernel
    looked up) cost a few microseconds a call, ~1 ms over a step's 113 products."""
    library = kernels.library()
    if type(module) is Int8Linear and module.plan["int8 decode"] == "qwenbox" and library is not None:
        int8, values, scales, bias = library.int8_matmul, module.values, module.scales, module.bias

        def product8(x: torch.Tensor) -> torch.Tensor:
            return int8(x, values, scales, bias) if x.shape[0] <= DECODE_ROWS else module(x)

        return product8
    if type(module) is Int4Linear and module._kernel is not None:
        int4, q4, scales4, lows, bias4 = module._kernel, module.q4, module.scales, module.lows, module.bias
        return lambda x: int4(x, q4, scales4, lows, bias4)  # the same kernel for any number of rows
    return module


def _cat_bias(biases: list[torch.Tensor | None], sizes: list[int]) -> torch.Tensor | None:
    if all(b is None for b in biases):
        return None
    return torch.cat([torch.zeros(n) if b is None else b.float() for b, n in zip(biases, sizes, strict=True)])


def _rotary_tables(cos: torch.Tensor, sin: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary's cos and sin (rows, 1, dim), broadcast over the heads, with rotate_half's signs folded
    into sin, so that `_rotate` is two products and a sum."""
    dim = cos.shape[-1]
    half = dim // 2
    sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
    return cos.reshape(rows, 1, dim), sin.reshape(rows, 1, dim)


def _rotate(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary on qk (rows, heads, dim) with `_rotary_tables`' cos and sin: Transformers'
    x cos + rotate_half(x) sin, its halves swapped by a view."""
    rows, heads, dim = qk.shape
    swapped = qk.view(rows, heads, 2, dim // 2).flip(2).view(rows, heads, dim)
    return qk * cos + swapped * sin


def _silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) x up of the fused gate/up product, in PyTorch ops (the compiled library's
    `decode_silu_mul` where it is available)."""
    inner = gate_up.shape[-1] // 2
    return F.silu(gate_up[:, :inner]).mul_(gate_up[:, inner:])


class LeanDecoder:
    """The decode step of a Qwen2ForCausalLM: logits of the next token for each row of a batch."""

    def __init__(self, model: Any):  # a Qwen2ForCausalLM (Transformers' modules are untyped)
        config = model.config
        inner = model.model
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.norm = inner.norm.weight
        self.eps = float(config.rms_norm_eps)
        self.head = _direct(model.lm_head)
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        self.scale = self.dim**-0.5
        self.dtype = model.dtype
        # the small operations compiled where the products are (the same library and build)
        self.library = kernels.library() if kernel_plan()["int8 decode"] == "qwenbox" else None
        self.layers: list[_Layer] = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                _Layer(
                    input_norm=layer.input_layernorm.weight,
                    qkv=_direct(_fuse([getattr(attn, name) for name in FUSED[0]])),
                    o_proj=_direct(attn.o_proj),
                    post_norm=layer.post_attention_layernorm.weight,
                    gate_up=_direct(_fuse([getattr(mlp, name) for name in FUSED[1]])),
                    down=_direct(mlp.down_proj),
                )
            )
            # the replaced rows back to the system layer by layer: the fused copies never add up to a
            # second set of weights in the process's resident memory (int8: +0.35 GiB at load without)
            return_freed_memory()

    @classmethod
    def build(cls, model: Any) -> LeanDecoder | None:
        """The lean step for `model`, or None when it is not a model this step computes exactly
        (then the backend decodes through Transformers' forward)."""
        config = getattr(model, "config", None)
        if config is None or getattr(config, "model_type", None) != "qwen2":
            return None
        inner = getattr(model, "model", None)
        layers = getattr(inner, "layers", None)
        if layers is None or not hasattr(model, "lm_head") or not hasattr(inner, "rotary_emb"):
            return None
        if getattr(config, "use_sliding_window", False) or getattr(config, "hidden_act", "silu") != "silu":
            return None
        if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
            return None
        if any(type(layer).__name__ != "Qwen2DecoderLayer" for layer in layers):
            return None
        if model.dtype not in (torch.float32,):  # the quantized models' activations on CPUs without bf16
            return None
        decoder = cls(model)
        log.info("decode: lean Qwen2 step (fused q/k/v and gate/up products, in-place KV cache)")
        return decoder

    def step(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        cache_layers: Sequence[Any],
    ) -> torch.Tensor:
        """Logits (batch, vocab) of the token after `tokens` (batch,), at `positions` (batch,),
        with `mask` (batch, length + 1) the batch's attention mask including this token (1: a real
        token, 0: left padding) and `cache_layers` the batch cache's layers (keys and values of the
        `length` positions before this one), which it appends this token's keys and values to."""
        h = self.embed(tokens).to(self.dtype)  # (batch, hidden)
        cos, sin = self.rotary(h, positions[:, None])  # (batch, 1, dim)
        if self.library is not None:
            return self._compiled_step(h, cos, sin, mask.contiguous(), cache_layers)
        return self._torch_step(h, cos, sin, mask, cache_layers)

    def _compiled_step(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        cache_layers: Sequence[Any],
    ) -> torch.Tensor:
        """The step with its small operations in the compiled library: per layer four products and
        three calls (norm with the residual add, attention with rotary and the cache write, SiLU x up)."""
        lib = self.library
        assert lib is not None
        batch = h.shape[0]
        cos, sin = cos.reshape(batch, -1).contiguous(), sin.reshape(batch, -1).contiguous()
        add_norm, attention, silu_mul = lib.decode_add_rms_norm, lib.decode_attention, lib.decode_silu_mul
        eps, heads, scale = self.eps, self.heads, self.scale
        h = h.contiguous()
        delta: torch.Tensor | None = None
        for layer, cache in zip(self.layers, cache_layers, strict=True):
            x = add_norm(h, delta, layer.input_norm, eps)
            qkv = layer.qkv(x)
            room, length = self._room(cache)
            attended = attention(qkv, cos, sin, room.keys, room.values, mask, length, heads, scale)
            x = add_norm(h, layer.o_proj(attended), layer.post_norm, eps)
            delta = layer.down(silu_mul(layer.gate_up(x)))
        return self.head(add_norm(h, delta, self.norm, eps))

    def _torch_step(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        cache_layers: Sequence[Any],
    ) -> torch.Tensor:
        """The step in PyTorch ops, where the compiled library is not available."""
        batch = h.shape[0]
        heads, kv_heads, dim = self.heads, self.kv_heads, self.dim
        group = heads // kv_heads
        cos, sin = _rotary_tables(cos, sin, batch)
        width = mask.shape[1]
        additive = None
        if batch > 1 and not bool(mask.all()):
            additive = torch.zeros(batch, 1, 1, width).masked_fill_(
                mask[:, None, None, :] == 0, float("-inf")
            )
        q_size, kv_size = heads * dim, kv_heads * dim
        eps = self.eps
        for layer, cache in zip(self.layers, cache_layers, strict=True):
            x = F.rms_norm(h, (h.shape[-1],), layer.input_norm, eps)
            qkv = layer.qkv(x)  # (batch, q + k + v)
            qk = _rotate(qkv[:, : q_size + kv_size].view(batch, heads + kv_heads, dim), cos, sin)
            k = qk[:, heads:].view(batch, kv_heads, 1, dim)
            v = qkv[:, q_size + kv_size :].view(batch, kv_heads, 1, dim)
            room, length = self._room(cache)
            room.keys[:, :, length : length + 1] = k
            room.values[:, :, length : length + 1] = v
            keys, values = room.key_view, room.value_view
            q = qk[:, :heads].reshape(batch, kv_heads, group, dim)
            scores = torch.matmul(q, keys.transpose(-1, -2)).mul_(self.scale)  # (batch, kv, group, width)
            if additive is not None:
                scores.add_(additive)
            probs = torch.softmax(scores, dim=-1)
            attended = torch.matmul(probs, values).view(batch, q_size)
            h = h + layer.o_proj(attended)
            x = F.rms_norm(h, (h.shape[-1],), layer.post_norm, eps)
            h = h + layer.down(_silu_mul(layer.gate_up(x)))
        h = F.rms_norm(h, (h.shape[-1],), self.norm, eps)
        return self.head(h)

    def prefill(self, tokens: torch.Tensor, start: int, cache: Any) -> torch.Tensor:
        """Logits (vocab,) of the token after a prompt piece `tokens` (length,) at positions
        `start`.. of one sequence, its keys and values appended to `cache` (the sequence's own
        Transformers cache, holding its `start` earlier positions): what the model's forward with
        `logits_to_keep=1` computes, with the decode step's fused products (one q/k/v product and
        one gate/up product a layer, so each layer's input is quantized and packed twice, not five
        times), in-place residual adds, SiLU x up in one pass, causal attention without a mask
        tensor, and the final norm and the output head for the last position only."""
        length = tokens.shape[0]
        h = self.embed(tokens).to(self.dtype).contiguous()  # (length, hidden)
        positions = torch.arange(start, start + length)[None]
        cos, sin = self.rotary(h, positions)  # (1, length, dim)
        heads, kv_heads, dim = self.heads, self.kv_heads, self.dim
        cos, sin = _rotary_tables(cos, sin, length)
        q_size, kv_size = heads * dim, kv_heads * dim
        eps, lib = self.eps, self.library
        width = h.shape[-1]
        for index, layer in enumerate(self.layers):
            x = F.rms_norm(h, (width,), layer.input_norm, eps)
            qkv = layer.qkv(x)  # (length, q + k + v)
            qk = _rotate(qkv[:, : q_size + kv_size].view(length, heads + kv_heads, dim), cos, sin)
            q = qk[:, :heads].transpose(0, 1)[None]  # (1, heads, length, dim)
            k = qk[:, heads:].transpose(0, 1)[None]
            v = qkv[:, q_size + kv_size :].view(length, kv_heads, dim).transpose(0, 1)[None]
            keys, values = cache.update(k, v, index)
            attended = self._prompt_attention(q, keys, values)  # (length, heads x dim)
            h.add_(layer.o_proj(attended))
            x = F.rms_norm(h, (width,), layer.post_norm, eps)
            gate_up = layer.gate_up(x)
            h.add_(layer.down(lib.decode_silu_mul(gate_up) if lib is not None else _silu_mul(gate_up)))
        last = F.rms_norm(h[-1:], (width,), self.norm, eps)
        return self.head(last)[0]

    def _prompt_attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Causal grouped-query attention of a prompt piece's queries q (1, heads, length, dim) over
        the cache's keys and values (1, kv_heads, past + length, dim): (length, heads x dim)."""
        length, total = q.shape[2], keys.shape[2]
        if length == total:  # nothing before the piece: the plain causal triangle, no mask tensor
            out = F.scaled_dot_product_attention(
                q, keys, values, is_causal=True, scale=self.scale, enable_gqa=True
            )
            return out[0].transpose(0, 1).reshape(length, -1)
        attended, _ = prompt_attention(None, q, keys, values, None, scaling=self.scale)  # type: ignore[arg-type]
        return attended.reshape(length, -1)

    @staticmethod
    def _room(cache: Any) -> tuple[_Room, int]:
        """`cache`'s (a Transformers cache layer) room with space for this step's keys and values at
        the returned position, its views already one position longer. The room is reused while the
        layer still holds the views this step handed out last; anything else the backend did to the
        cache (a join, a release, a trim) replaced them, and then a new room is made."""
        room: _Room | None = getattr(cache, "_qwenbox_room", None)
        length = cache.keys.shape[2]
        if (
            room is None
            or cache.keys is not room.key_view
            or cache.values is not room.value_view
            or length >= room.keys.shape[2]
        ):
            old_k, old_v = cache.keys, cache.values
            batch, kv_heads, _, dim = old_k.shape
            capacity = length + ROOM
            keys = old_k.new_empty(batch, kv_heads, capacity, dim)
            values = old_v.new_empty(batch, kv_heads, capacity, dim)
            keys[:, :, :length] = old_k
            values[:, :, :length] = old_v
            room = _Room(keys, values, old_k, old_v)
            cache._qwenbox_room = room
        room.key_view = cache.keys = room.keys[:, :, : length + 1]
        room.value_view = cache.values = room.values[:, :, : length + 1]
        return room, length
