"""Autoregressive sampling: one token at a time, each forward seeing at most the context.

The model's mask buffer is `context_length` square and its position table has
`context_length` rows, so every forward pass is given only the last `context_length` tokens.
That is what lets a prompt longer than the context, or a generation that runs past it, work:
the oldest tokens simply fall out of view.

With the KV cache (the default), the prompt is run once and then each step feeds only the
newest token, reusing the cached keys and values of the others: each step costs one position
instead of the whole window. The cache has `context_length` slots; once the sequence fills
them, sampling falls back to cropping and recomputing the window, so positions never go past
the context and the mask slice always applies. Greedy generation gives the same tokens either
way (tested).

On CUDA (`sample.compile`: auto) the cache is a static one (fixed shapes, the position a tensor)
and each one-token step is compiled and captured in a CUDA graph (`compiled_decode_step`), as
gpt-fast does: eager decoding is bound by launching hundreds of small kernels per token. The
static cache gives the same greedy tokens (tested), compiled or not.

Everything here works on batches: `(B, T)` prompts give `B` independent continuations, and
temperature, top-k, top-p and end-of-text handling are applied per row.
"""

import argparse
import codecs
import dataclasses
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from gpt.errors import UserError
from gpt.tokenizer import EOT_ID, get_tokenizer


@dataclass
class SampleConfig:
    """How to continue a prompt; generate.py's options default to these."""

    prompt: str = "Your journey"  # used for the sample printed at the end of training
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 means greedy (always the most likely token)
    top_k: int | None = 50  # keep the k most likely tokens; null keeps all
    top_p: float | None = None  # keep the smallest set with this much probability; null keeps all
    seed: int = 1337
    num_samples: int = 1
    stop_at_eot: bool = True  # end a sample when the model emits <|endoftext|>
    kv_cache: bool = True  # reuse earlier tokens' keys/values; false recomputes the window each step
    compile: bool | str = "auto"  # one-token steps compiled into CUDA graphs, static cache: true, false, auto (CUDA)

    def __post_init__(self):
        if not self.prompt:
            raise ValueError("sample.prompt is empty; give some text to continue")
        if self.max_new_tokens < 1:
            raise ValueError(f"sample.max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"sample.temperature must be 0 or more, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"sample.top_k must be at least 1 (or null), got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"sample.top_p must be in (0, 1] (or null), got {self.top_p}")
        if self.num_samples < 1:
            raise ValueError(f"sample.num_samples must be at least 1, got {self.num_samples}")
        if self.compile not in (True, False, "auto"):
            raise ValueError(f"sample.compile must be true, false or auto, got {self.compile!r}")


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """(B, V) logits with everything outside top-k / top-p set to -inf, row by row."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass;
        # the most likely token is therefore always kept.
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -torch.inf)
    return logits


def decode_step(model: nn.Module, new: torch.Tensor, cache: list) -> torch.Tensor:
    """(B, V) logits of the token after `new` (B, T), which continues what `cache` holds."""
    return model(new, cache)[:, -1, :]


def compiled_decode_step(setting: bool | str, device: torch.device) -> Callable | None:
    """`decode_step` under torch.compile if `setting` asks for it (auto: on CUDA), else None.

    On CUDA in "reduce-overhead" mode: the whole one-token forward pass is captured in a CUDA
    graph and replayed with one launch, where eager decoding is bound by launching its hundreds
    of small kernels (gpt-fast's recipe). fullgraph: a graph break would fall back silently.
    """
    if setting is False or (setting == "auto" and device.type != "cuda"):
        return None
    return torch.compile(decode_step, mode="reduce-overhead" if device.type == "cuda" else "default",
                         fullgraph=True)


@torch.no_grad()
def generate_stream(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    kv_cache: bool = True,
    static_cache: bool = False,
    step: Callable | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,), step by step.

    With `eos_id`, a row that has produced it keeps producing `eos_id` (padding), and the
    stream ends once every row has. `generator` is a CPU generator (draws happen on the CPU).
    `kv_cache` uses the model's `new_kv_cache` while the sequence fits the context; `static_cache`
    makes it a static one, and `step` (from `compiled_decode_step`; it needs the static cache) then
    computes each one-token step after the prompt. Should `step` fail to compile, a warning says so
    and the plain step carries on. The caller puts the model in eval mode.
    """
    context_length = model.cfg.context_length
    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    if step is not None and not (kv_cache and static_cache):
        raise ValueError("a compiled decoding step needs the static KV cache (kv_cache and static_cache)")
    cache = model.new_kv_cache(idx.shape[0], static=True) if kv_cache and static_cache else (
        model.new_kv_cache(idx.shape[0]) if kv_cache else None)
    filled = 0  # positions the cache holds
    new = idx[:, -context_length:]  # what the cache has not seen yet: first the (cropped) prompt
    for _ in range(max_new_tokens):
        if cache is not None and filled + new.shape[1] > context_length:
            cache = None  # full: from here on, crop and recompute
        if cache is not None:
            if step is not None and new.shape[1] == 1:  # the prompt itself runs uncompiled: one shape to capture
                try:
                    torch.compiler.cudagraph_mark_step_begin()  # the last step's logits are used up
                    logits = step(model, new, cache)
                except Exception as e:  # a failure to compile; writing the same slots again is harmless
                    warnings.warn(f"the compiled decoding step failed ({(str(e).strip().splitlines() or [''])[0][:200]}); "
                                  "sampling continues uncompiled (sample.compile: false skips it)", stacklevel=2)
                    step = None
                    logits = decode_step(model, new, cache)
            else:
                logits = decode_step(model, new, cache)  # (B, V): only the last position predicts the next
            filled += new.shape[1]
            if static_cache:
                cache[0].pos.fill_(filled)  # shared by every layer; in place, so the captured graph sees it
        else:
            logits = model(idx[:, -context_length:])[:, -1, :]  # never more than the mask covers
        if temperature == 0:
            next_id = logits.argmax(dim=-1)  # (B,)
        else:
            logits = filter_logits(logits / temperature, top_k, top_p)
            probs = torch.softmax(logits, dim=-1)
            # Drawn on the CPU: the same seed then gives the same tokens on every device.
            next_id = torch.multinomial(probs.float().cpu(), 1, generator=generator)
            next_id = next_id.squeeze(-1).to(idx.device)
        if eos_id is not None:
            next_id = torch.where(finished, torch.full_like(next_id, eos_id), next_id)
            finished |= next_id == eos_id
        idx = torch.cat([idx, next_id[:, None]], dim=1)
        new = next_id[:, None]
        yield next_id
        if eos_id is not None and bool(finished.all()):
            return


def generate(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """(B, T) prompt -> (B, T + n) prompt and continuation (see `generate_stream`)."""
    new = list(generate_stream(model, idx, max_new_tokens, **kwargs))
    if not new:
        return idx
    return torch.cat([idx, torch.stack(new, dim=1)], dim=1)


def continue_prompt(
    model: nn.Module,
    prompt: str,
    cfg: SampleConfig,
    device: torch.device,
    write: Callable[[str], None] | None = None,
) -> list[str]:
    """Continue `prompt` `cfg.num_samples` times in one batch; return the continuations.

    With `write` and a single sample, text is passed to `write` as soon as each token is
    produced (bytes are held back until they form whole UTF-8 characters).
    """
    if not prompt:
        raise UserError('the prompt is empty; give some text to continue, e.g. "Your journey"')
    enc = get_tokenizer()
    ids = enc.encode(prompt, allowed_special={"<|endoftext|>"})
    idx = torch.tensor([ids] * cfg.num_samples, dtype=torch.long, device=device)
    generator = torch.Generator().manual_seed(cfg.seed)
    decoders = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in range(cfg.num_samples)]
    texts = [""] * cfg.num_samples
    done = [False] * cfg.num_samples
    model.eval()
    step = compiled_decode_step(cfg.compile, device) if cfg.kv_cache else None
    for next_ids in generate_stream(
        model, idx, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
        top_p=cfg.top_p, eos_id=EOT_ID if cfg.stop_at_eot else None, generator=generator,
        kv_cache=cfg.kv_cache, static_cache=step is not None, step=step,
    ):
        for row, token in enumerate(next_ids.tolist()):
            if done[row] or (cfg.stop_at_eot and token == EOT_ID):
                done[row] = True
                continue
            # Ids past the BPE's (a chat model's template markers) are not text: nothing to print
            piece = decoders[row].decode(enc.decode_single_token_bytes(token) if token < enc.n_vocab else b"")
            texts[row] += piece
            if write is not None and cfg.num_samples == 1 and piece:
                write(piece)
    for row, decoder in enumerate(decoders):
        tail = decoder.decode(b"", final=True)
        texts[row] += tail
        if write is not None and cfg.num_samples == 1 and tail:
            write(tail)
    return texts


def print_samples(model: nn.Module, prompt: str, cfg: SampleConfig, device: torch.device) -> None:
    """Print continuations of `prompt`: one streams as it is made; several come under headers."""
    if cfg.num_samples == 1:
        _write_now(prompt)
        continue_prompt(model, prompt, cfg, device, write=_write_now)
        print()
    else:  # sampled together as one batch, printed when done
        for i, text in enumerate(continue_prompt(model, prompt, cfg, device), start=1):
            print(f"--- sample {i} ---\n{prompt}{text}\n")


def _write_now(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def add_sample_options(parser: argparse.ArgumentParser, chat: bool = False) -> None:
    """The sampling options of generate.py (and chat.py, which has no --num-samples, --stop-at-eot or
    --compile: a reply is one, ends at its end-of-turn token, and is decoded eagerly). Defaults: the
    run's `sample` section."""
    parser.add_argument("--max-new-tokens", type=int, help="tokens to generate per sample")
    parser.add_argument("--temperature", type=float, help="0 is greedy; higher is more random")
    parser.add_argument("--top-k", type=int, help="sample among the k most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, help="sample among the most likely tokens holding "
                        "this probability (1: all)")
    parser.add_argument("--seed", type=int, help="random seed; the same seed gives the same text")
    if not chat:
        parser.add_argument("--num-samples", type=int, help="independent continuations, sampled as a batch")
        parser.add_argument("--stop-at-eot", action=argparse.BooleanOptionalAction,
                            help="end a sample at <|endoftext|>")
    parser.add_argument("--kv-cache", action=argparse.BooleanOptionalAction,
                        help="reuse earlier tokens' keys and values (faster; same tokens)")
    if not chat:
        parser.add_argument("--compile", action=argparse.BooleanOptionalAction,
                            help="decode with a static KV cache and a compiled step in CUDA graphs "
                            "(default: on CUDA; the first token waits for the compile)")


def sample_config(base: SampleConfig, args: argparse.Namespace) -> SampleConfig:
    """The run's sample settings with the options given on the command line applied."""
    given = {
        "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
        "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed,
        "num_samples": getattr(args, "num_samples", None), "stop_at_eot": getattr(args, "stop_at_eot", None),
        "kv_cache": args.kv_cache, "compile": getattr(args, "compile", None),
    }
    changes = {k: v for k, v in given.items() if v is not None}
    if changes.get("top_k") == 0:
        changes["top_k"] = None  # 0 means no top-k filter
    try:
        return dataclasses.replace(base, **changes)
    except ValueError as e:
        option = str(e).split()[0].replace("sample.", "--").replace("_", "-")
        raise UserError(f"{option}: {e}") from None
