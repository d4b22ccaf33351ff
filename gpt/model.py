"""A GPT-2 style decoder-only transformer built on `CausalAttention`.

token ids -> token + position embeddings -> dropout -> N pre-LayerNorm blocks (attention and a GELU
MLP, each added back to the residual stream) -> final LayerNorm -> LM head tied to the token
embedding -> logits. With `targets` the model returns the next-token cross-entropy instead, so a
compiled model fuses the loss into its graph; generation lives in `gpt.sampling`. Initialisation
follows GPT-2. The vocabulary is padded to a multiple of 64 rows for the GPU's matrix units; the
padding ids get -inf logits, so they are never predicted and the loss is the real vocabulary's.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from gpt.attention import ATTENTION_IMPLS, CausalAttention, LayerCache, check_fits

IGNORE_INDEX = -100  # a target the loss skips: F.cross_entropy's default ignore_index, written out
# Where dropout acts, as "LLMs from Scratch" names them (exercise 4.3): the embeddings, the attention
# weights, the shortcut (residual) connections
DROPOUT_PLACES = ("emb", "attn", "shortcut")
# The fields weights fix (GPT-2's or a run's, `gpt.checkpoint.resolve_model_config`); the others are free.
ARCHITECTURE_FIELDS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "qkv_bias")


@dataclass
class ModelConfig:
    """Architecture of the model; the names follow "LLMs from scratch"."""

    vocab_size: int = 50257  # GPT-2 BPE
    context_length: int = 256  # longest sequence the model reads
    emb_dim: int = 384
    n_heads: int = 6
    n_layers: int = 6
    drop_rate: float = 0.1  # dropout in each of the three places below that does not set its own
    drop_rate_emb: float | None = None  # on the embeddings' sum (null: drop_rate)
    drop_rate_attn: float | None = None  # on the attention weights, the seed's dropout (null: drop_rate)
    drop_rate_shortcut: float | None = None  # on each sublayer's output, before it joins the residual (null: drop_rate)
    qkv_bias: bool = False
    vocab_pad_multiple: int = 64  # embedding rows rounded up to a multiple of this; 1 = none

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.vocab_pad_multiple) * self.vocab_pad_multiple

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "vocab_pad_multiple"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be at least 1, got {getattr(self, name)}")
        if self.emb_dim % self.n_heads != 0:
            raise ValueError(
                f"model.emb_dim ({self.emb_dim}) must be divisible by model.n_heads ({self.n_heads})"
            )
        for name in ("drop_rate", *(f"drop_rate_{place}" for place in DROPOUT_PLACES)):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"model.{name} must be in [0, 1){'' if name == 'drop_rate' else ' or null'}, got {value}")

    def dropout(self, place: str) -> float:
        """The dropout rate at `place` (emb, attn or shortcut): its own, else `drop_rate`."""
        rate = getattr(self, f"drop_rate_{place}")
        return self.drop_rate if rate is None else rate

    def dropout_settings(self) -> dict[str, float]:
        """The keys that set the dropout as it is: `{drop_rate: p}` where the three places agree, else each place's."""
        rates = {f"drop_rate_{place}": self.dropout(place) for place in DROPOUT_PLACES}
        return {"drop_rate": self.drop_rate} if set(rates.values()) == {self.drop_rate} else rates

    def dropout_text(self) -> str:
        """The dropout as printed: `0.1`, or each place's where they differ (`emb 0.0, attn 0.1, shortcut 0.0`)."""
        settings = self.dropout_settings()
        if "drop_rate" in settings:
            return str(self.drop_rate)
        return ", ".join(f"{key.removeprefix('drop_rate_')} {rate}" for key, rate in settings.items())


class FeedForward(nn.Module):
    """Position-wise MLP: widen 4x, GELU (tanh approximation, as GPT-2), project back."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim)
        self.gelu = nn.GELU(approximate="tanh")
        self.proj = nn.Linear(4 * cfg.emb_dim, cfg.emb_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.gelu(self.fc(x)))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + drop(attn(ln(x))), then x + drop(mlp(ln(x)))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.emb_dim)
        self.att = CausalAttention(
            d_in=cfg.emb_dim,
            d_out=cfg.emb_dim,
            context_length=cfg.context_length,
            dropout=cfg.dropout("attn"),
            qkv_bias=cfg.qkv_bias,
            num_heads=cfg.n_heads,
            out_proj=True,  # as GPT-2, whatever n_heads is
        )
        self.norm2 = nn.LayerNorm(cfg.emb_dim)
        self.ff = FeedForward(cfg)
        self.drop_resid = nn.Dropout(cfg.dropout("shortcut"))

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None,
                apart: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_resid(self.att(self.norm1(x), cache, apart))
        x = x + self.drop_resid(self.ff(self.norm2(x)))
        return x


class KVCache:
    """What sampling keeps between forward passes: every layer's `LayerCache`, and how full they are.

    `length` (on the host) and `pos` (the same number, a tensor on the device) count the positions
    filled. A compiled forward pass reads only `pos`, so it sees no Python number change from one
    token to the next; the sampler reads `length` to know when the cache is full, without waiting
    for the device.
    """

    def __init__(self, cfg: ModelConfig, batch: int, device: torch.device, dtype: torch.dtype):
        shape = (batch, cfg.n_heads, cfg.context_length, cfg.emb_dim // cfg.n_heads)
        self.context_length, self.length = cfg.context_length, 0
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        self.layers = [LayerCache(torch.zeros(shape, device=device, dtype=dtype),
                                  torch.zeros(shape, device=device, dtype=dtype), self)
                       for _ in range(cfg.n_layers)]

    def tensors(self) -> list[torch.Tensor]:
        """`pos` and every layer's keys and values: the memory a compiled step reads and writes in place."""
        return [self.pos, *(t for layer in self.layers for t in (layer.keys, layer.values))]

    def advance(self, num_tokens: int) -> None:
        """Count `num_tokens` more positions as filled (after the forward pass that wrote them)."""
        if self.length + num_tokens > self.context_length:
            raise ValueError(f"the KV cache holds {self.context_length} positions; {self.length + num_tokens} "
                             "needed: crop the input and recompute instead")
        self.length += num_tokens
        self.pos.fill_(self.length)

    def reset(self) -> "KVCache":
        """Empty again (the old keys and values lie in the future of every new position: masked)."""
        self.length = 0
        self.pos.zero_()
        return self


def conversations_apart(positions: torch.Tensor) -> torch.Tensor:
    """(B, T) positions of packed sequences, each starting at 0 -> (B, 1, T, T), True where a query's
    token (row) and a key's (column) lie in different sequences: what attention must not see."""
    sequence = (positions == 0).cumsum(dim=-1)  # (B, T): which sequence of its row each token is in
    return (sequence[:, :, None] != sequence[:, None, :]).unsqueeze(1)


class GPTModel(nn.Module):
    """GPT-2 style language model: `forward(idx) -> logits`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.padded_vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.dropout("emb"))
        self.trf_blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.emb_dim)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.padded_vocab_size, bias=False)
        # Weight tying (GPT-2): the head reuses the token embedding matrix, which saves
        # vocab_size * emb_dim parameters, most of a small model.
        self.out_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        residual_std = 0.02 / math.sqrt(2 * cfg.n_layers)
        for block in self.trf_blocks:
            nn.init.normal_(block.att.out_proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.ff.proj.weight, mean=0.0, std=residual_std)
        # -inf for the padding ids, 0 for real tokens; derived from the config, so not saved.
        padding = torch.zeros(cfg.padded_vocab_size)
        padding[cfg.vocab_size:] = -torch.inf
        self.register_buffer("logit_bias", padding, persistent=False)
        with torch.no_grad():
            self.tok_emb.weight[cfg.vocab_size:] = 0.0  # never looked up, never trained
        self.kv_caches: dict[int, KVCache] = {}  # by batch size: see kv_cache

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        """Number of trainable parameters, the tied embedding (padding rows included) counted once."""
        return sum(p.numel() for p in self.parameters())

    def use_attention(self, impl: str) -> "GPTModel":
        """Compute attention with `impl` from now on: sdpa (the fused kernel) or explicit (the reference
        math); the same weights and the same results (`train.attn_impl`)."""
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention impl must be one of {', '.join(ATTENTION_IMPLS)}, got {impl!r}")
        for block in self.trf_blocks:
            block.att.impl = impl
        return self

    def kv_cache(self, batch: int) -> KVCache:
        """An empty KV cache for `batch` sequences of up to `context_length` tokens.

        Made once per batch size (and device and dtype) and kept, reset, for the next call: a
        compiled step then replays its CUDA graph on the same memory instead of recording anew.
        One generation at a time uses a model's cache of a given batch size.
        """
        weight = self.tok_emb.weight
        cache = self.kv_caches.get(batch)
        if cache is None or cache.pos.device != weight.device or cache.layers[0].keys.dtype != weight.dtype:
            cache = self.kv_caches[batch] = KVCache(self.cfg, batch, weight.device, weight.dtype)
        return cache.reset()

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None,
                targets: torch.Tensor | None = None, reduction: str = "mean",
                checkpoint_activations: bool = False, positions: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) token ids -> (B, T, padded_vocab_size) logits for the next token at each position.

        With `cache` (from `kv_cache`), `idx` continues the sequences already cached; the caller
        keeps them within the context and advances the cache after the call.
        Logits of the padding ids (>= vocab_size) are -inf.
        With `targets` (B, T), the next-token cross-entropy instead (`reduction` as
        `F.cross_entropy` takes it: mean, sum, or none for (B * T,) losses): a compiled model then
        computes the loss inside its graph, and the (B, T, V) logits never leave it.
        `checkpoint_activations`: recompute each block in backward instead of keeping its activations.
        `positions` (B, T): several sequences packed in each row (a chat window's conversations):
        each token's position in its own, which a 0 starts; each sequence sees only itself.
        """
        if targets is not None and cache is not None:
            raise ValueError("targets and a KV cache do not go together: the loss is for training")
        logits = self.logits(self.hidden_states(idx, cache, checkpoint_activations, positions))  # (B, T, V_padded)
        if targets is None:
            return logits
        # In float32 (as autocast would): inside torch.compile the upcast fuses into the loss kernels.
        # A target of IGNORE_INDEX (a chat window's prompt and padding: gpt.chat.template) counts nowhere
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction=reduction,
                               ignore_index=IGNORE_INDEX)

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None,
                      checkpoint_activations: bool = False, positions: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) token ids -> (B, T, emb_dim): the last block's output, before the final LayerNorm.

        `positions` as `forward` takes them (packed sequences); None: 0..T-1 (after the cache's)."""
        _, num_tokens = idx.shape
        if cache is None:  # before the position table is indexed past its end
            check_fits(num_tokens, self.cfg.context_length)
        apart = None
        if positions is None:
            positions = torch.arange(num_tokens, device=idx.device)
        elif cache is None:
            apart = conversations_apart(positions)
        else:
            raise ValueError("packed positions and a KV cache do not go together: sampling runs one sequence a row")
        if cache is not None:  # the position as a tensor: a compiled step does not recompile
            positions = positions + cache.pos
        x = self.tok_emb(idx) + self.pos_emb(positions)  # (B, T, emb_dim)
        x = self.drop_emb(x)
        for i, block in enumerate(self.trf_blocks):
            if checkpoint_activations and cache is None and torch.is_grad_enabled():
                # Only x (B, T, emb_dim) is kept for backward; the RNG state is saved with it and
                # replayed, so the recomputation draws the same dropout masks.
                x = checkpoint(block, x, None, apart, use_reentrant=False)
            else:
                x = block(x, None if cache is None else cache.layers[i], apart)
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(..., emb_dim) hidden states -> (..., padded_vocab_size) logits: the final LayerNorm and the tied head.

        Apart from `forward` for a caller that needs the logits of a few positions only (multiple-choice
        scoring, `gpt.tools.multiple_choice`): the head is most of a small model's compute."""
        return F.linear(self.final_norm(x), self.out_head.weight, self.logit_bias)
