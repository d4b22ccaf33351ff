"""Causal self-attention: the block the rest of the model is built around.

`CausalAttention(d_in, d_out, context_length, dropout, qkv_bias=False)` is the module of chapter 3 of
"Build a Large Language Model from Scratch", its weights created in the chapter's order. The causal
mask is a non-persistent buffer: it follows the module across devices and is derived from
`context_length`, so it is never saved. `impl` picks how the same math runs: "explicit" (scores,
mask, softmax, dropout: the reference) or "sdpa" (PyTorch's fused kernel, which never holds the
(T, T) scores); tests check that the two agree. Packed sequences and the KV cache add rows and
columns to the same mask.
"""

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_IMPL = "sdpa"  # the fused kernel: faster, and no (T, T) scores in memory
ATTENTION_IMPLS = (DEFAULT_IMPL, "explicit")


def check_fits(num_tokens: int, context_length: int) -> None:
    """A ValueError if `num_tokens` are more than the mask (and the position table) cover."""
    if num_tokens > context_length:
        raise ValueError(f"a sequence of {num_tokens} tokens is longer than context_length {context_length}; "
                         f"crop it to its last {context_length} tokens")


class LayerCache:
    """One attention layer's keys and values for up to `context_length` positions, at fixed addresses.

    `cache` is the `gpt.model.KVCache` of every layer, which counts the positions filled before
    this call, as `pos` on the device and as `length` on the host. Two ways to use the same slots:
    - compiled: new keys and values go in at positions `pos`..`pos`+T-1, and attention runs over
      every slot, the causal mask's rows at those positions hiding the slots not yet filled (they
      lie in the future too). No Python number changes from one token to the next, so the step
      never recompiles, and a CUDA graph replays on the same memory;
    - eager: they go in at `length`..`length`+T-1 and attention runs over the filled slots only,
      with no mask for a single new token: fewer kernels, and no reads of empty slots.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, cache):
        self.keys, self.values, self.cache = keys, values, cache  # keys, values: (B, H, context_length, D)

    def write(self, keys: torch.Tensor, values: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store (B, H, T, D) new keys and values -> the keys and values to attend to, (B, H, slots, D),
        and compiled, the new positions (T,); eager, None (the filled slots end at the new tokens)."""
        num_tokens = keys.shape[-2]
        if torch.compiler.is_compiling():
            positions = self.cache.pos + torch.arange(num_tokens, device=keys.device)
            self.keys.index_copy_(2, positions, keys)
            self.values.index_copy_(2, positions, values)
            return self.keys, self.values, positions
        start, end = self.cache.length, self.cache.length + num_tokens
        self.keys[:, :, start:end] = keys
        self.values[:, :, start:end] = values
        return self.keys[:, :, :end], self.values[:, :, :end], None


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

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None,
                apart: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, d_in) -> (B, T, d_out); position t sees positions 0..t only.

        With `cache`, `x` holds the tokens after those already cached, whose keys and values
        are reused; the new keys and values are added to it (the caller keeps it within the context).
        With `apart` (B, 1, T, T), True where query and key belong to different sequences packed in
        one row (`gpt.model.conversations_apart`), position t sees only the positions 0..t of its own.
        """
        b, num_tokens, _ = x.shape
        if cache is None:
            check_fits(num_tokens, self.context_length)
        queries, keys, values = self._project(x)  # each (B, n_heads, T, head_dim)
        future = None  # the rows of the mask the shapes give: the last T of the first `keys` rows
        if cache is not None:  # keys, values: (B, n_heads, slots, head_dim)
            keys, values, positions = cache.write(keys, values)
            if positions is not None:  # every slot: the mask's rows at the new positions, (T, slots)
                future = self.mask[positions, :keys.shape[-2]]
        if apart is not None:  # packed sequences: the seed's mask, and every other sequence's keys
            future = self._last_rows(num_tokens, num_tokens) | apart  # (B, 1, T, T)

        if self.impl == "sdpa":
            context = self._attend_sdpa(queries, keys, values, future)
        else:
            context = self._attend_explicit(queries, keys, values, future)  # (B, n_heads, T, head_dim)
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
        """(B, T, d_in) -> queries, keys, values, each (B, n_heads, T, head_dim).

        The fast path (sdpa) makes them with one matmul against the three weights stacked, as
        nanoGPT's single `c_attn` does: one pass over `x` instead of three, one larger matmul, and
        in backward one for x's gradient. Stacking copies the weights at every call, which pays
        where `x` has more rows than the stack (training, evaluation), not where a few tokens are
        decoded at a time and reading the weights is the whole cost. The explicit path keeps the
        chapter's three projections, and so does a projection that is not a plain nn.Linear (a LoRA
        adapter, `gpt.lora`), whose own forward stacking its weight would bypass.
        """
        shape = (*x.shape[:2], self.num_heads, self.head_dim)  # (B, T, n_heads, head_dim)
        plain = all(type(w) is nn.Linear for w in (self.W_query, self.W_key, self.W_value))
        if self.impl == "sdpa" and plain and x.shape[0] * x.shape[1] > 3 * self.d_out:
            weight = torch.cat([self.W_query.weight, self.W_key.weight, self.W_value.weight])  # (3 d_out, d_in)
            bias = (None if self.W_query.bias is None else
                    torch.cat([self.W_query.bias, self.W_key.bias, self.W_value.bias]))
            projected = F.linear(x, weight, bias).split(self.d_out, dim=-1)
        else:
            projected = self.W_query(x), self.W_key(x), self.W_value(x)
        queries, keys, values = (p.view(shape).transpose(1, 2) for p in projected)
        return queries, keys, values

    def _last_rows(self, num_queries: int, num_keys: int) -> torch.Tensor:
        """(T, keys): the mask's rows for queries at the last T of the keys' positions."""
        return self.mask[num_keys - num_queries:num_keys, :num_keys]

    def _masked_softmax(self, queries: torch.Tensor, keys: torch.Tensor,
                        future: torch.Tensor | None = None) -> torch.Tensor:
        """softmax(QK^T / sqrt(head_dim)) with the causal mask: (B, H, T, D) -> (B, H, T, keys).

        `future` (T, keys), or (B, 1, T, keys) for packed sequences: True where a query may not look
        (the mask's rows at the queries' positions, and other sequences); None: the queries are the
        last T of the keys' positions, rows keys-T..keys-1 of the mask (its (T, T) corner without a cache)."""
        if future is None:
            future = self._last_rows(queries.shape[-2], keys.shape[-2])
        attn_scores = queries @ keys.transpose(-2, -1)  # (B, H, T, keys)
        # The future's scores become -inf, so softmax gives it weight exactly 0 (in place: no copy).
        attn_scores.masked_fill_(future, -torch.inf)
        return torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)

    def _attend_explicit(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                         future: torch.Tensor | None = None) -> torch.Tensor:
        """Explicit scaled dot-product attention with the causal mask; shapes (B, H, T, D)."""
        attn_weights = self.dropout(self._masked_softmax(queries, keys, future))  # (B, H, T, keys)
        return attn_weights @ values

    def _attend_sdpa(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     future: torch.Tensor | None = None) -> torch.Tensor:
        """The same computation through PyTorch's fused kernel; shapes (B, H, T, D)."""
        # nn.Dropout follows train()/eval() by itself; SDPA's dropout_p does not.
        dropout_p = self.dropout.p if self.training else 0.0
        num_queries, num_keys = queries.shape[-2], keys.shape[-2]
        if future is None and num_queries == num_keys:  # no cache: the plain causal case, the fastest kernels
            return F.scaled_dot_product_attention(queries, keys, values, dropout_p=dropout_p, is_causal=True)
        if future is None and num_queries == 1:  # one new token after the filled slots sees them all
            return F.scaled_dot_product_attention(queries, keys, values, dropout_p=dropout_p)
        if future is None:  # several new tokens after a cache; SDPA's is_causal would align the mask top-left
            future = self._last_rows(num_queries, num_keys)
        return F.scaled_dot_product_attention(queries, keys, values, attn_mask=~future, dropout_p=dropout_p)
