"""The training loop and the pieces it is made of.

Each piece is a small function taking what it needs: `build_optimizer` (AdamW, weight decay on
2-D weights only), `learning_rate` (linear warmup, then cosine decay to `min_lr`),
`calc_loss_batch` (next-token cross-entropy), `evaluate` (mean loss in eval mode, no grad) and
`train`, which ties them together with gradient accumulation, clipping, periodic evaluation,
a progress bar and checkpoints. Everything a resumed run would need (model, optimizer, step,
best val loss, data position) is held in named objects rather than loop-local variables.
"""

import ctypes
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from gpt.errors import UserError


@dataclass
class TrainConfig:
    """Optimisation, evaluation and where the run is written."""

    out_dir: str = "runs/default"  # checkpoint goes to <out_dir>/ckpt.pt
    max_iters: int = 2000  # optimizer steps
    eval_interval: int = 200  # evaluate (and save) every this many steps, and at the end
    eval_iters: int = 20  # batches per loss estimate
    learning_rate: float = 6e-4  # peak, reached after warmup
    min_lr: float = 6e-5  # end of the cosine decay
    warmup_iters: int = 100
    weight_decay: float = 0.1  # on 2-D weights only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    seed: int = 1337
    device: str = "auto"  # auto picks cuda, then mps, then cpu
    tensorboard: bool = False  # also log each evaluation to <out_dir>/tensorboard (gpt/metrics.py)

    def __post_init__(self):
        for name in ("max_iters", "eval_interval", "eval_iters", "grad_accum_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup_iters < 0:
            raise ValueError(f"train.warmup_iters must be 0 or more, got {self.warmup_iters}")
        if self.learning_rate <= 0 or self.min_lr < 0 or self.min_lr > self.learning_rate:
            raise ValueError("train.learning_rate must be > 0 and train.min_lr in [0, learning_rate]")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("train.grad_clip and train.weight_decay must be 0 or more")


def pick_device(name: str, option: str = "train.device") -> torch.device:
    """`auto` -> cuda if available, then mps, then cpu; otherwise the named device, if present."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise UserError(f"{option} must be auto, cpu, mps or cuda[:N], got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"{option} is {name!r} but CUDA is not available; use auto or cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{option} is 'mps' but MPS is not available; use auto or cpu")
    return torch.device(name)


def keep_freed_memory() -> bool:
    """On glibc (Linux), keep freed memory in the process instead of handing it back to the OS.

    PyTorch's CPU allocator mallocs and frees every activation on every step. glibc serves
    blocks over 32 MiB (the logits of a batch over a 50,257-token vocabulary are ~200 MiB) with
    a fresh mmap, which the kernel zero-fills page by page on first touch and unmaps on free:
    half of a small model's CPU step went to that. Serving everything from the heap, and never
    trimming it, roughly doubles CPU training speed. Returns False where this does not apply.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings, none on biases and LayerNorms."""
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             fused=device.type == "cuda")


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup (non-zero at step 0) to the peak, then cosine decay to `min_lr`."""
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
    decay_steps = max(1, cfg.max_iters - cfg.warmup_iters)
    progress = min(1.0, (step - cfg.warmup_iters) / decay_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def calc_loss_batch(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of one (B, T) batch."""
    logits = model(inputs)  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> float:
    """Mean loss over `loader` in eval mode (dropout off); restores the previous mode."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for inputs, targets in loader:
        loss = calc_loss_batch(model, inputs.to(device), targets.to(device))
        total += loss.item() * len(inputs)
        count += len(inputs)
    model.train(was_training)
    return total / count


@dataclass
class TrainState:
    """What changes as training runs (and what a checkpoint records)."""

    step: int = 0
    best_val_loss: float = math.inf
    train_loss: float = math.nan
    val_loss: float = math.nan


def train(
    model: nn.Module,
    cfg: TrainConfig,
    train_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    eval_loaders: dict[str, DataLoader],
    device: torch.device,
    save: Callable[[TrainState, torch.optim.Optimizer], None],
    log: Callable[[dict], None] | None = None,
) -> TrainState:
    """Run `cfg.max_iters` optimizer steps; evaluate and call `save(state, optimizer)` on schedule.

    `train_batches` yields (inputs, targets) forever; `eval_loaders` maps "train"/"val" to
    fixed evaluation loaders. `log`, if given, gets each evaluation's metrics as a dict.
    """
    optimizer = build_optimizer(model, cfg, device)
    state = TrainState()
    batches = iter(train_batches)
    non_blocking = device.type == "cuda"
    model.train()  # dropout active for the steps
    rate = None  # tokens/s, smoothed
    progress = tqdm(total=cfg.max_iters, desc="training", unit="step", disable=None, dynamic_ncols=True)
    while state.step < cfg.max_iters:
        started = time.perf_counter()
        lr = learning_rate(state.step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for _ in range(cfg.grad_accum_steps):
            inputs, targets = next(batches)
            inputs = inputs.to(device, non_blocking=non_blocking)
            targets = targets.to(device, non_blocking=non_blocking)
            # Divide so the accumulated gradient is the mean over all micro-batches.
            loss = calc_loss_batch(model, inputs, targets) / cfg.grad_accum_steps
            loss.backward()
            loss_sum += loss.item()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1

        step_rate = inputs.numel() * cfg.grad_accum_steps / (time.perf_counter() - started)
        rate = step_rate if rate is None else 0.9 * rate + 0.1 * step_rate
        progress.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}")
        progress.update(1)

        if state.step % cfg.eval_interval == 0 or state.step == cfg.max_iters:
            state.train_loss = evaluate(model, eval_loaders["train"], device)
            state.val_loss = evaluate(model, eval_loaders["val"], device)
            state.best_val_loss = min(state.best_val_loss, state.val_loss)
            progress.write(
                f"step {state.step}: train loss {state.train_loss:.4f} "
                f"(ppl {math.exp(min(state.train_loss, 50)):.1f}), val loss {state.val_loss:.4f} "
                f"(ppl {math.exp(min(state.val_loss, 50)):.1f}), {rate:,.0f} tokens/s"
            )
            if log is not None:
                log({"step": state.step, "train_loss": state.train_loss, "val_loss": state.val_loss,
                     "lr": lr, "tokens_per_s": rate})
            save(state, optimizer)
    progress.close()
    return state
