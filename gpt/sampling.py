"""Autoregressive sampling: one token at a time, each forward pass seeing at most the context.

Every forward pass is given only the last `context_length` tokens (the mask and the position table
are that long), so a prompt longer than the context, or a generation past it, works: the oldest
tokens fall out of view. The KV cache (the default) runs the prompt once, then feeds one token a
step; once it is full, sampling crops and recomputes the window. The one-token step can be compiled
(`sample.compile`; `auto` only where the compile is won back), and the next step is queued before the
host reads the token just drawn, which it waits for alone (`read_later`). Uncompiled, attention runs
in `DECODING_KERNELS`, which leave out cuDNN's. `(B, T)` prompts give `B` continuations, each row on
its own. (Prompts of different lengths as one batch, for the evaluations: `gpt.tools.batched`.)
"""

import functools
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from gpt.errors import UserError
from gpt.tokenizer import EOT_ID, TextStream, get_tokenizer

# One-token steps a process must have ahead of it before compiling the step pays, under `auto`
# (on CUDA; on a CPU compiling gains a few percent at most): docs/generating.md has the figures.
COMPILE_PAYS_AFTER = 4096
# The attention kernels uncompiled decoding may use: every one but cuDNN's. cuDNN builds (and caches) a
# graph for each new shape, and one-token decoding meets a new key length at every token: where torch
# picks cuDNN (bf16 on an H200 with torch 2.11), 60-66 ms a token (docs/performance.md). Flash,
# memory-efficient and math attention take any length as it comes. The compiled step has one shape
# (every slot, masked): torch's choice, one cuDNN graph, is its fastest. Training keeps torch's too.
DECODING_KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


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
    compile: bool | str = "auto"  # the one-token step compiled (CUDA graphs on CUDA): true, false, auto (where it pays)

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


def check_prompt(prompt: str | None, name: str, give: str) -> None:
    """A UserError if a prompt given on the command line holds no text: `<name> is empty; give <give>`."""
    if prompt is not None and not prompt.strip():
        raise UserError(f"{name} is empty; give {give}")


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


def draw(logits: torch.Tensor, cfg: SampleConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) next ids, on their device: the argmax at temperature 0, else a draw."""
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(filter_logits(logits.float() / cfg.temperature, cfg.top_k, cfg.top_p), dim=-1)
    # torch.multinomial's own way to draw one sample (the largest p / Exp(1) wins; tested equal to it),
    # without the checks of its input that wait for the device.
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax(dim=-1)


def decoding_dtype(device: torch.device) -> torch.dtype:
    """The precision generate.py and chat.py keep the weights in: bf16 on a CUDA GPU that has it.

    Decoding a token reads every weight once, so half of float32's bytes is about twice the speed
    (and under torch.compile, autocast would cast the float32 weights again at every step). Float32
    elsewhere, where every figure of docs/ is measured.
    """
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.bfloat16 if bf16 else torch.float32


def for_decoding(model: nn.Module, device: torch.device) -> nn.Module:
    """A model loaded to sample from, in eval mode and in `decoding_dtype` (converted in place)."""
    return model.to(decoding_dtype(device)).eval()


def decode_step(model: nn.Module, new: torch.Tensor, cache) -> torch.Tensor:
    """(B, V) logits of the token after `new` (B, T), which continues what `cache` holds (None: `new` alone)."""
    return (model(new) if cache is None else model(new, cache))[:, -1, :]


def uncompiled_step(model: nn.Module, new: torch.Tensor, cache) -> torch.Tensor:
    """`decode_step` as it runs uncompiled: a new key length at each call, so attention in `DECODING_KERNELS`."""
    with sdpa_kernel(DECODING_KERNELS):
        return decode_step(model, new, cache)


def compile_pays(setting: bool | str, device: torch.device, steps: float) -> bool:
    """Whether to compile the one-token step: `setting` true or false, or for auto, on CUDA with at
    least COMPILE_PAYS_AFTER one-token steps ahead (`steps`: math.inf for a process that stays)."""
    if setting != "auto":
        return bool(setting)
    return device.type == "cuda" and steps >= COMPILE_PAYS_AFTER


@functools.cache
def compiled_decode_step(device_type: str) -> Callable:
    """`decode_step` compiled, once per process (a second generation reuses the compiled code).

    On CUDA in "reduce-overhead" mode: the whole one-token forward pass is captured in a CUDA
    graph and replayed with one launch. fullgraph: a graph break would fall back silently. If
    compiling fails, one warning and the plain step (`CompiledOrEager`).
    """
    from gpt.compiled import CompiledOrEager  # torch.compile's machinery: only where decoding compiles
    mode = "reduce-overhead" if device_type == "cuda" else "default"
    compiled = CompiledOrEager(decode_step, "sample.compile", mode=mode, fullgraph=True)

    def step(model: nn.Module, new: torch.Tensor, cache) -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()  # the last step's logits are used up: its graph may reuse them
        return compiled(model, new, cache)
    return step


@torch.no_grad()
def generate_stream(model: nn.Module, idx: torch.Tensor, cfg: SampleConfig, eos_id: int | None = None,
                    generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,) on the CPU, step by step, up to `cfg.max_new_tokens`.

    With `eos_id`, a row that has produced it keeps producing `eos_id` (padding), and the stream
    ends once every row has. `generator` is one of the model's device (draws happen there). The
    caller puts the model in eval mode.
    """
    context = model.cfg.context_length
    prompt = idx[:, -context:]
    cache = model.kv_cache(idx.shape[0]) if cfg.kv_cache else None
    ahead = min(cfg.max_new_tokens - 1, context - prompt.shape[1])  # one-token steps the cache takes
    step = uncompiled_step
    if cache is not None and compile_pays(cfg.compile, idx.device, ahead):
        step = compiled_decode_step(idx.device.type)
        for tensor in cache.tensors():  # written in place inside the graph, at the same address each call
            torch._dynamo.mark_static_address(tensor)
    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    logits = next_logits(model, prompt, cache, uncompiled_step)  # the prompt runs uncompiled: one shape to capture
    for made in range(1, cfg.max_new_tokens + 1):
        next_id = draw(logits, cfg, generator)
        if eos_id is not None:
            next_id = torch.where(finished, eos_id, next_id)
            finished |= next_id == eos_id
        idx = torch.cat([idx, next_id[:, None]], dim=1)
        # The one wait per token: the new ids and whether every row has finished, read together, their
        # copy queued before the next step, so that the device runs that step while the host waits.
        read = read_later(torch.cat([next_id, finished.all()[None]]))
        if made < cfg.max_new_tokens:
            if cache is not None and cache.length == context:
                cache = None  # full: from here on, crop and recompute
            logits = next_logits(model, idx[:, -context:] if cache is None else next_id[:, None], cache, step)
        read = read()
        yield read[:-1]
        if eos_id is not None and read[-1]:
            return


def read_later(tensor: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Start copying `tensor` to the host -> a call that waits for that copy alone and returns it.

    On CUDA the copy goes into pinned memory and an event marks its end: whatever is queued after it
    (the next token's forward pass) keeps the GPU busy while the host waits, where `.cpu()` would
    wait for that too. Elsewhere the copy is made at once.
    """
    if tensor.device.type != "cuda":
        host = tensor.cpu()
        return lambda: host
    host = tensor.to("cpu", non_blocking=True)  # into pinned memory
    copied = torch.cuda.Event()
    copied.record()

    def wait() -> torch.Tensor:
        copied.synchronize()
        return host
    return wait


def next_logits(model: nn.Module, new: torch.Tensor, cache, step: Callable) -> torch.Tensor:
    """(B, V) logits of the next token: `new` after what `cache` holds (then counted), or, with no
    cache, `new` as the whole window (never more than the mask covers), uncompiled."""
    if cache is None:
        return uncompiled_step(model, new, None)
    logits = step(model, new, cache)
    cache.advance(new.shape[1])
    return logits


def generate(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, eos_id: int | None = None,
             generator: torch.Generator | None = None, **settings) -> torch.Tensor:
    """(B, T) prompt -> (B, T + n) prompt and continuation; `settings` are `SampleConfig`'s."""
    cfg = SampleConfig(max_new_tokens=max_new_tokens, **settings)
    new = list(generate_stream(model, idx, cfg, eos_id, generator))
    return torch.cat([idx, torch.stack(new, dim=1).to(idx.device)], dim=1)


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
    check_prompt(prompt, "the prompt", 'some text to continue, e.g. "Your journey"')
    enc = get_tokenizer()
    ids = enc.encode(prompt, allowed_special={"<|endoftext|>"})
    idx = torch.tensor([ids] * cfg.num_samples, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    streams = [TextStream() for _ in range(cfg.num_samples)]
    texts = [""] * cfg.num_samples
    done = [False] * cfg.num_samples
    model.eval()
    eos_id = EOT_ID if cfg.stop_at_eot else None
    for next_ids in generate_stream(model, idx, cfg, eos_id, generator):
        for row, token in enumerate(next_ids.tolist()):
            if done[row] or (cfg.stop_at_eot and token == EOT_ID):
                done[row] = True
                continue
            piece = streams[row].piece(token)
            texts[row] += piece
            if write is not None and cfg.num_samples == 1 and piece:
                write(piece)
    for row, stream in enumerate(streams):
        tail = stream.end()
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


