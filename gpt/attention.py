"""Causal self-attention: the block the rest of the model is built around.

`CausalAttention(d_in, d_out, context_length, dropout, qkv_bias=False)` is the module of chapter 3
of "Build a Large Language Model from Scratch": its weights are created in the chapter's order, so
a seeded module has the chapter's weights and gives its outputs (`tests/test_attention.py` checks
the mask against the seed notebook's worked example, and that no position sees the future).

Design choices:
- The mask is a `context_length`-square boolean buffer, True above the diagonal (the future).
  It is a buffer so it follows the module across devices, and non-persistent so it is not
  written into checkpoints (it is derived from `context_length`, not learned).
- One head and no output projection by default: the chapter's module. With `num_heads > 1` the
  same math runs per head on `d_out // num_heads` channels; `out_proj` adds the linear layer
  that mixes the heads, as GPT-2's blocks have.
- Two ways to compute the same thing, chosen by `impl`: "explicit" is the chapter's math
  (scores, mask, softmax, dropout, weighted sum), kept as the reference; "sdpa" (`DEFAULT_IMPL`,
  for this module and for `ModelConfig.attn_impl`) hands the same computation to
  `torch.nn.functional.scaled_dot_product_attention`, which picks a fused kernel (flash /
  memory-efficient attention) and never materialises the (T, T) score matrix. Tests check the
  two agree in outputs and gradients.
- The explicit weights are computed in one place, `_masked_softmax`, which the explicit
  forward pass and `attention_weights` (for looking at them: `python -m gpt attention-map`)
  both call, so the weights one sees are the ones the explicit path uses, whichever path the
  model runs with. The sdpa path never computes them.
- A `KVCache` lets sampling feed one new token at a time: the keys and values of earlier
  tokens are kept instead of recomputed. New queries at positions start..start+T-1 see keys
  0..start+T-1, so the mask slice is rows start..start+T-1 of the same buffer.
"""

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_IMPL = "sdpa"  # the fused kernel: faster, and no (T, T) scores in memory
ATTENTION_IMPLS = (DEFAULT_IMPL, "explicit")


class LayerKVCache:
    """Keys and values of one attention layer, preallocated for `context_length` positions."""

    def __init__(self, batch: int, num_heads: int, context_length: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype):
        shape = (batch, num_heads, context_length, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions filled so far

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, H, T, D) new keys/values; return all of them so far, (B, H, length, D)."""
        end = self.length + keys.shape[-2]
        if end > self.keys.shape[-2]:
            raise ValueError(f"the KV cache holds {self.keys.shape[-2]} positions; {end} needed")
        self.keys[:, :, self.length:end] = keys
        self.values[:, :, self.length:end] = values
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class StaticKVCache:
    """Keys and values of one layer at fixed addresses and shapes, the position a tensor: what a
    compiled, CUDA-graph-captured decoding step needs (as gpt-fast's and transformers' static caches).

    New keys and values are written at positions `pos`..`pos`+T-1 (`pos`, a 0-d long tensor that
    every layer shares, counts the positions filled before this call; the caller advances it), and
    attention runs over all `context_length` slots, the ones not yet filled masked out. No Python
    number changes from one token to the next, so a compiled step never recompiles; the caller
    keeps `pos` + T within `context_length`.
    """

    def __init__(self, batch: int, num_heads: int, context_length: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype, pos: torch.Tensor):
        shape = (batch, num_heads, context_length, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = pos
        for buffer in (self.keys, self.values):  # CUDA graphs may then write into them in place
            torch._dynamo.mark_static_address(buffer)

    def write(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store (B, H, T, D) new keys/values -> every slot's keys and values (B, H, L, D), and the
        (T, L) mask of the slots each new query may see (filled ones, up to its own position)."""
        positions = self.pos + torch.arange(keys.shape[-2], device=keys.device)  # (T,)
        self.keys.index_copy_(2, positions, keys)
        self.values.index_copy_(2, positions, values)
        allowed = torch.arange(self.keys.shape[-2], device=keys.device) <= positions[:, None]  # (T, L)
        return self.keys, self.values, allowed


class CausalAttention(nn.Module):
    """Masked (causal) multi-head self-attention with dropout on the attention weights."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        context_length: int,
        dropout: float,
        qkv_bias: bool = False,
        num_heads: int = 1,
        out_proj: bool = False,
        impl: str = DEFAULT_IMPL,
    ):
        super().__init__()
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
        if d_out % num_heads != 0:
            raise ValueError(f"d_out ({d_out}) must be divisible by num_heads ({num_heads})")
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.context_length = context_length
        self.impl = impl
        # Created in the chapter's order, so a seeded module gets the chapter's weights.
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        # The output projection mixes the heads (GPT-2's blocks have one; the chapter's module none).
        self.out_proj = nn.Linear(d_out, d_out) if out_proj else None
        self.dropout = nn.Dropout(dropout)
        # True above the diagonal: position i may not look at positions j > i.
        mask = torch.triu(torch.ones(context_length, context_length, dtype=torch.bool), diagonal=1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor, cache: LayerKVCache | None = None) -> torch.Tensor:
        """(B, T, d_in) -> (B, T, d_out); position t sees positions 0..t only.

        With `cache`, `x` holds the tokens after those already cached, whose keys and values
        are reused; the new keys and values are added to it.
        """
        b, num_tokens, _ = x.shape
        start = cache.length if isinstance(cache, LayerKVCache) else 0  # a StaticKVCache's caller checks
        if start + num_tokens > self.context_length:
            raise ValueError(
                f"sequence of {start + num_tokens} tokens is longer than context_length "
                f"{self.context_length}; crop the input to its last {self.context_length} tokens"
            )
        queries, keys, values = self._project(x)  # each (B, n_heads, T, head_dim)
        allowed = None  # derived from the shapes, except with a static cache
        if isinstance(cache, StaticKVCache):  # keys/values: (B, n_heads, context_length, head_dim)
            keys, values, allowed = cache.write(keys, values)
        elif cache is not None:  # keys/values become (B, n_heads, start + T, head_dim)
            keys, values = cache.append(keys, values)

        if self.impl == "sdpa":
            context = self._attend_sdpa(queries, keys, values, allowed)
        else:
            context = self._attend_explicit(queries, keys, values, allowed)  # (B, n_heads, T, head_dim)
        context = context.transpose(1, 2).reshape(b, num_tokens, self.d_out)
        if self.out_proj is not None:
            context = self.out_proj(context)
        return context

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, d_in) -> (B, n_heads, T, T): row t is how position t spreads its attention.

        The explicit path's weights, before dropout, for either `impl`; each row sums to 1 and
        everything above the diagonal is 0.
        """
        queries, keys, _ = self._project(x)
        return self._masked_softmax(queries, keys)

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, d_in) -> queries, keys, values, each (B, n_heads, T, head_dim)."""
        shape = (*x.shape[:2], self.num_heads, self.head_dim)  # (B, T, n_heads, head_dim)
        queries = self.W_query(x).view(shape).transpose(1, 2)
        keys = self.W_key(x).view(shape).transpose(1, 2)
        values = self.W_value(x).view(shape).transpose(1, 2)
        return queries, keys, values

    def _masked_softmax(self, queries: torch.Tensor, keys: torch.Tensor,
                        allowed: torch.Tensor | None = None) -> torch.Tensor:
        """softmax(QK^T / sqrt(head_dim)) with the causal mask: (B, H, T, D) -> (B, H, T, start + T).

        `allowed` (T, keys), from a static cache, replaces the mask taken from the shapes."""
        num_queries, num_keys = queries.shape[-2], keys.shape[-2]
        start = num_keys - num_queries  # > 0 when earlier keys come from a cache
        attn_scores = queries @ keys.transpose(-2, -1)  # (B, H, T, start + T)
        # The future's scores become -inf, so softmax gives it weight exactly 0 (in place: no copy).
        future = self.mask[start:num_keys, :num_keys] if allowed is None else ~allowed
        attn_scores.masked_fill_(future, -torch.inf)
        return torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)

    def _attend_explicit(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                         allowed: torch.Tensor | None = None) -> torch.Tensor:
        """Explicit scaled dot-product attention with the causal mask; shapes (B, H, T, D)."""
        attn_weights = self.dropout(self._masked_softmax(queries, keys, allowed))  # (B, H, T, start + T)
        return attn_weights @ values

    def _attend_sdpa(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     allowed: torch.Tensor | None = None) -> torch.Tensor:
        """The same computation through PyTorch's fused kernel; shapes (B, H, T, D)."""
        # nn.Dropout follows train()/eval() by itself; SDPA's dropout_p does not.
        dropout_p = self.dropout.p if self.training else 0.0
        if allowed is not None:  # a static cache: its mask says which slots are filled
            return F.scaled_dot_product_attention(queries, keys, values, attn_mask=allowed, dropout_p=dropout_p)
        num_queries, num_keys = queries.shape[-2], keys.shape[-2]
        if num_queries == num_keys:  # no cache: the plain causal case, the fastest kernels
            return F.scaled_dot_product_attention(queries, keys, values, dropout_p=dropout_p, is_causal=True)
        if num_queries == 1:  # one new token after the cache sees every key: nothing to mask
            return F.scaled_dot_product_attention(queries, keys, values, dropout_p=dropout_p)
        # Several new tokens after a cache; SDPA's is_causal would align the mask top-left.
        start = num_keys - num_queries
        allowed = ~self.mask[start:num_keys, :num_keys]
        return F.scaled_dot_product_attention(queries, keys, values, attn_mask=allowed, dropout_p=dropout_p)
