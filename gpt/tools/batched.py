"""Many sequences of different lengths as one batch, for the evaluations: a KV cache of one sequence a row
(`RowCache`), and greedy or sampled continuations of many prompts at once (`generate_rows`).

The chat evaluation's greedy replies (`gpt.chat.scoring.ask`) decode through `generate_rows`, and the
multiple-choice scorer runs each shared context once into a `RowCache` that every ending's row
continues (`gpt.tools.multiple_choice`). The model reads a `RowCache` as it reads its own
`gpt.model.KVCache`, so nothing here changes the core; a row gets exactly the tokens and losses it
gets alone (tested on both attention paths). Both run the head over the real vocabulary only
(`vocab_logits`).
"""

from collections.abc import Collection

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import sdpa_kernel

from gpt.sampling import DECODING_KERNELS, SampleConfig, draw


def vocab_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """(..., emb_dim) hidden states -> (..., vocab_size) logits: `model.logits` over the real vocabulary only.

    The padding ids' logits are -inf, which a softmax gives nothing and an argmax never picks:
    leaving their rows out of the head gives the same softmax and the same argmax without the copy
    of their bias into every row that `F.linear` makes before its matmul (a sixth of the time of a
    batch's decoding step on small.yaml's model, measured)."""
    return F.linear(model.final_norm(hidden), model.out_head.weight[:model.cfg.vocab_size])


class RowCache:
    """A KV cache of one sequence a row, each row at its own length: prompts of different lengths as one batch.

    `GPTModel.hidden_states` reads it as it reads `gpt.model.KVCache` (`pos`, `layers`), and
    `CausalAttention` each of its layers as it reads a `gpt.attention.LayerCache` on the compiled
    path (`write`): row r's T new tokens take positions pos[r]..pos[r]+T-1, their keys and values go
    into those slots, and attention runs over every slot, the causal mask's rows at the new
    positions hiding the slots after them. So prompts right-padded to one length run as one batch:
    a row's padding lies after its own tokens, where its mask hides it, and its next tokens
    overwrite it; each row attends to exactly its own tokens, as it would alone (tested on both
    attention paths). A cache holds only the slots its batch fills, not the whole context (the
    mask's rows are cut to them): a short batch attends over, and copies, that much less.
    """

    def __init__(self, pos: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.pos = pos  # (B, 1): each row's next position
        self.layers = [RowLayer(k, v, self) for k, v in zip(keys, values)]  # each (B, H, slots, D)

    @staticmethod
    def empty(model: nn.Module, batch: int, slots: int | None = None) -> "RowCache":
        """A cache for `batch` sequences of `model`, in its weights' dtype and on their device, every row at 0,
        each of `slots` positions (None: the model's context_length; no more than it)."""
        cfg, weight = model.cfg, model.tok_emb.weight
        shape = (batch, cfg.n_heads, slots or cfg.context_length, cfg.emb_dim // cfg.n_heads)
        def zeros() -> list[torch.Tensor]:
            return [torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in range(cfg.n_layers)]
        return RowCache(torch.zeros(batch, 1, dtype=torch.long, device=weight.device), zeros(), zeros())

    def advance(self, counts: torch.Tensor | int) -> None:
        """Count `counts` more positions as filled in each row ((B,) or one number for all)."""
        self.pos += torch.as_tensor(counts, device=self.pos.device).reshape(-1, 1)

    def select(self, rows: torch.Tensor) -> "RowCache":
        """A cache of the rows `rows` picks, in that order: the rows that go on, or a row picked several times
        (a context continued several ways). A copy: this cache is left as it is."""
        return RowCache(self.pos[rows], [layer.keys[rows] for layer in self.layers],
                        [layer.values[rows] for layer in self.layers])


class RowLayer:
    """One attention layer's keys and values in a `RowCache`."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, cache: RowCache):
        self.keys, self.values, self.cache = keys, values, cache

    def write(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store (B, H, T, D) new keys and values at each row's positions -> every slot's keys and values, and
        the new positions (B, 1, T), whose rows of the causal mask hide each row's later slots."""
        positions = self.cache.pos + torch.arange(keys.shape[-2], device=keys.device)  # (B, T)
        slots = positions[:, None, :, None].expand_as(keys)  # (B, H, T, D)
        self.keys.scatter_(2, slots, keys.to(self.keys.dtype))
        self.values.scatter_(2, slots, values.to(self.values.dtype))
        return self.keys, self.values, positions[:, None, :]


@torch.no_grad()
def generate_rows(model: nn.Module, prompts: list[list[int]], limits: list[int], cfg: SampleConfig,
                  stop: Collection[int] = (), generator: torch.Generator | None = None) -> list[list[int]]:
    """Each prompt's continuation, every prompt in one batch (`RowCache`): up to its limit of new tokens, or
    up to and with the first token in `stop`. A row that ends leaves the batch.

    Greedy (temperature 0), each row gets the tokens `generate_stream` gives it alone. A prompt and
    its limit must fit the context (no cropping here). The caller puts the model in eval mode."""
    context = model.cfg.context_length
    for prompt, limit in zip(prompts, limits):
        if not prompt or limit < 1 or len(prompt) + limit - 1 > context:
            raise ValueError(f"a prompt of {len(prompt)} tokens and {limit} new ones do not fit a context of "
                             f"{context}; crop the prompt first")
    device = model.tok_emb.weight.device
    lengths = torch.tensor([len(prompt) for prompt in prompts], device=device)
    idx = torch.zeros(len(prompts), max(map(len, prompts), default=0), dtype=torch.long)  # right-padded
    for row, prompt in enumerate(prompts):
        idx[row, :len(prompt)] = torch.tensor(prompt)
    out: list[list[int]] = [[] for _ in prompts]
    live = list(range(len(prompts)))  # the rows still in the batch, in the cache's order
    if not live:
        return out
    fed = max(len(prompt) + limit - 1 for prompt, limit in zip(prompts, limits))  # the slots the rows fill
    cache = RowCache.empty(model, len(prompts), fed)
    with sdpa_kernel(DECODING_KERNELS):
        hidden = model.hidden_states(idx.to(device), cache)  # (B, width, emb_dim)
        logits = vocab_logits(model, hidden[torch.arange(len(prompts), device=device), lengths - 1])  # (B, V)
    cache.advance(lengths)
    while True:
        next_ids = draw(logits, cfg, generator)  # (live,)
        going = []  # places in `live` of the rows that go on
        for place, (row, token) in enumerate(zip(live, next_ids.tolist())):
            out[row].append(token)
            if token not in stop and len(out[row]) < limits[row]:
                going.append(place)
        if not going:
            return out
        if len(going) < len(live):
            kept = torch.tensor(going, device=device)
            cache, next_ids, live = cache.select(kept), next_ids[kept], [live[place] for place in going]
        with sdpa_kernel(DECODING_KERNELS):
            logits = vocab_logits(model, model.hidden_states(next_ids[:, None], cache)[:, -1])  # (live, V)
        cache.advance(1)
