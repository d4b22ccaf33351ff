"""Optimizers and the learning-rate schedule.

`build_optimizer` gives what `train.optimizer` names:

- `adamw`: AdamW over every parameter, weight decay on matrices and embeddings only (fused:
  one kernel for the whole update wherever torch has one).
- `muon`: Muon (`torch.optim.Muon`) for the 2-D weight matrices inside the transformer blocks
  (query, key, value, attention output, both MLP matrices) and AdamW for the rest: the token
  embedding (and so the tied head), the position embedding, the biases and the LayerNorms.
  Muon replaces each matrix's momentum by the nearest semi-orthogonal matrix (a Newton-Schulz
  iteration), so every direction of the update moves at the same rate; the GPT-2 speedrun
  (modded-nanogpt) and nanochat train their blocks this way. It is meant for hidden-layer
  matrices only: embeddings and the output layer stay on AdamW. The two run as one optimizer
  (`MuonWithAdamW`), so the loop, the GradScaler and checkpoints see a single object.

torch's Muon runs the Newton-Schulz iteration in bfloat16. The iteration here follows the
training precision (`train.dtype`, as `gpt.precision.pick_dtype` resolves it): torch's own Muon
where training autocasts and bf16 is native (a GPU, a CPU with native bf16 instructions), and
`Muon` below (a `torch.optim.Muon` whose iteration runs in float32) where training runs in
float32 or bf16 would be emulated. Emulated, bf16 matmuls are ~100x slower than fp32: one Muon
step over small.yaml's 24 matrices took twice as long as the whole rest of a training step. And
a run asked to be float32 is float32 throughout: Newton-Schulz scales a matrix's small singular
directions up to 1, bf16's rounding included (docs/precision.md measures what that does).
`Muon` is the same algorithm and state, tested against torch's on the same inputs.

`learning_rate` is the schedule (linear warmup, then cosine decay to `min_lr`);
`set_learning_rate` applies it to every group, Muon's scaled by `muon_lr / learning_rate` so
both follow the same curve.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from gpt.precision import bf16_is_fast, pick_dtype

if TYPE_CHECKING:
    from gpt.training import TrainConfig

OPTIMIZERS = ("adamw", "muon")


# --------------------------------------------------------------------------- Muon

def orthogonalise(matrix: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """~The nearest semi-orthogonal matrix to `matrix` (U V^T of its SVD), computed in `dtype`.

    torch.optim.Muon's quintic Newton-Schulz iteration, step for step: scaled to spectral
    norm <= 1, then `steps` times X <- a X + (b A + c A^2) X with A = X X^T. It drives every
    singular value towards 1 (to roughly 0.7-1.2, which is all Muon needs).
    """
    a, b, c = coefficients
    x = matrix.to(dtype)
    tall = matrix.size(0) > matrix.size(1)
    if tall:  # work on the wide side: X X^T is then the smaller Gram matrix
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def muon_lr_ratio(shape: torch.Size, adjust_lr_fn: str | None) -> float:
    """torch.optim.Muon's per-matrix learning-rate factor (`adjust_lr_fn`)."""
    rows, cols = shape[:2]
    if adjust_lr_fn in (None, "original"):
        return math.sqrt(max(1.0, rows / cols))  # the update's RMS then does not depend on the shape
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return 1.0


class Muon(torch.optim.Muon):
    """`torch.optim.Muon` with its Newton-Schulz iteration in `ns_dtype` (torch's is bfloat16).

    Same settings, same state (`momentum_buffer` per matrix), same update: with
    `ns_dtype=torch.bfloat16` it gives torch's results bit for bit (tests/test_optim.py).
    """

    def __init__(self, params, ns_dtype: torch.dtype = torch.float32, **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(grad)
                buf = state["momentum_buffer"]
                buf.lerp_(grad, 1 - momentum)
                update = grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = orthogonalise(update, group["ns_coefficients"], group["ns_steps"], group["eps"],
                                       self.ns_dtype)
                param.mul_(1 - lr * group["weight_decay"])  # decoupled weight decay
                param.add_(update, alpha=-lr * muon_lr_ratio(param.shape, group["adjust_lr_fn"]))
        return loss


class MuonWithAdamW:
    """Muon for some parameters and AdamW for the others, used as one optimizer.

    It has what the training loop, `torch.amp.GradScaler` and checkpoints use of an optimizer:
    `param_groups` (Muon's, then AdamW's), `step`, `zero_grad`, `state_dict`, `load_state_dict`.
    """

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.muon = muon
        self.adamw = adamw

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    @property
    def state(self) -> dict:
        return {**self.muon.state, **self.adamw.state}

    def step(self, closure=None) -> None:
        if closure is not None:
            raise ValueError("MuonWithAdamW.step takes no closure")
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def muon_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The 2-D weight matrices inside the transformer blocks (`trf_blocks`): Muon's share."""
    blocks = getattr(model, "trf_blocks", None)
    if blocks is None:
        raise ValueError("train.optimizer: muon needs a GPTModel (its transformer blocks are trf_blocks)")
    return [p for p in blocks.parameters() if p.requires_grad and p.dim() == 2]


# --------------------------------------------------------------------------- building

def adamw(params: list[nn.Parameter], cfg: TrainConfig, fused: bool) -> torch.optim.AdamW:
    """AdamW over `params`: weight decay on matrices and embeddings, none on biases and LayerNorms."""
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    groups = [group for group in groups if group["params"]]
    options = {"lr": cfg.learning_rate, "betas": (cfg.beta1, cfg.beta2)}
    if fused:
        try:
            return torch.optim.AdamW(groups, fused=True, **options)
        except RuntimeError:  # no fused kernel for this device or dtype
            pass
    return torch.optim.AdamW(groups, **options)


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device,
                    fused: bool = True) -> torch.optim.AdamW | MuonWithAdamW:
    """The optimizer `cfg.optimizer` names, over every trainable parameter of `model` (once each).

    Fused AdamW (one kernel for the whole update, on CUDA, CPU and MPS) unless `fused` is False
    or the device has none; the result is the same as the per-tensor version.
    """
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    if cfg.optimizer == "adamw":
        return adamw(params, cfg, fused)
    matrices = muon_parameters(model)
    in_muon = {id(p) for p in matrices}
    options = {"lr": cfg.muon_lr, "momentum": cfg.muon_momentum, "weight_decay": cfg.muon_weight_decay}
    if pick_dtype(cfg.dtype, device) != torch.float32 and bf16_is_fast(device):
        muon = torch.optim.Muon(matrices, **options)  # Newton-Schulz in bf16
    else:  # training in float32, or bf16 would be emulated: the iteration in float32 too
        muon = Muon(matrices, ns_dtype=torch.float32, **options)
    return MuonWithAdamW(muon, adamw([p for p in params if id(p) not in in_muon], cfg, fused))


# --------------------------------------------------------------------------- schedule

def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup (non-zero at step 0) to the peak, then cosine decay to `min_lr`."""
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
    decay_steps = max(1, cfg.max_iters - cfg.warmup_iters)
    progress = min(1.0, (step - cfg.warmup_iters) / decay_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def set_learning_rate(optimizer: torch.optim.Optimizer | MuonWithAdamW, step: int, cfg: TrainConfig) -> float:
    """Set every group's lr for `step` (AdamW's `learning_rate`, Muon's in proportion); return AdamW's."""
    lr = learning_rate(step, cfg)
    adamw_part = optimizer
    if isinstance(optimizer, MuonWithAdamW):
        for group in optimizer.muon.param_groups:
            group["lr"] = lr * cfg.muon_lr / cfg.learning_rate
        adamw_part = optimizer.adamw
    for group in adamw_part.param_groups:
        group["lr"] = lr
    return lr
