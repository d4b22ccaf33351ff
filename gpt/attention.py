"""Causal self-attention: the block the rest of the model is built around.

`CausalAttention` follows the seed notebook (and chapter 3 of "Build a Large Language Model
from Scratch") line for line, with its bug fixed: the notebook calls `attn_scores.masked_fill(...)`
and drops the result, so the mask never applies and every token attends to the future. Here
the mask is applied (`masked_fill_`, in place), and `tests/test_attention.py` proves it both
with the notebook's own worked example and with a leak test.

Design choices:
- The mask is a `context_length`-square boolean buffer, True above the diagonal (the future).
  It is a buffer so it follows the module across devices, and non-persistent so it is not
  written into checkpoints (it is derived from `context_length`, not learned).
- One head by default, exactly the notebook's module. With `num_heads > 1` the same math runs
  per head on `d_out // num_heads` channels, followed by an output projection, as GPT-2 has.
- The score-to-context step lives in `_attend`, the one place a fused kernel such as
  `torch.nn.functional.scaled_dot_product_attention` can replace the explicit math.
"""

import torch
from torch import nn


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
        out_proj: bool | None = None,
    ):
        super().__init__()
        if d_out % num_heads != 0:
            raise ValueError(f"d_out ({d_out}) must be divisible by num_heads ({num_heads})")
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.context_length = context_length
        # Created in the seed's order, so a seeded model gets the seed's weights.
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        # The output projection mixes the heads; a single head (the seed's module) has none
        # unless asked for.
        if out_proj is None:
            out_proj = num_heads > 1
        self.out_proj = nn.Linear(d_out, d_out) if out_proj else None
        self.dropout = nn.Dropout(dropout)
        # True above the diagonal: position i may not look at positions j > i.
        mask = torch.triu(torch.ones(context_length, context_length, dtype=torch.bool), diagonal=1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, d_in) -> (B, T, d_out); position t sees positions 0..t only."""
        b, num_tokens, _ = x.shape
        if num_tokens > self.context_length:
            raise ValueError(
                f"sequence of {num_tokens} tokens is longer than context_length "
                f"{self.context_length}; crop the input to its last {self.context_length} tokens"
            )
        # (B, T, d_out) -> (B, n_heads, T, head_dim)
        shape = (b, num_tokens, self.num_heads, self.head_dim)
        queries = self.W_query(x).view(shape).transpose(1, 2)
        keys = self.W_key(x).view(shape).transpose(1, 2)
        values = self.W_value(x).view(shape).transpose(1, 2)

        context = self._attend(queries, keys, values)  # (B, n_heads, T, head_dim)
        context = context.transpose(1, 2).reshape(b, num_tokens, self.d_out)
        if self.out_proj is not None:
            context = self.out_proj(context)
        return context

    def _attend(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Explicit scaled dot-product attention with the causal mask; shapes (B, H, T, D)."""
        num_tokens = queries.shape[-2]
        attn_scores = queries @ keys.transpose(-2, -1)  # (B, H, T, T)
        # In place: the seed's `masked_fill` (no underscore) returned a new tensor and lost it.
        attn_scores.masked_fill_(self.mask[:num_tokens, :num_tokens], -torch.inf)
        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        attn_weights = self.dropout(attn_weights)
        return attn_weights @ values
