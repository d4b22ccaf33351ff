"""Optimizers and the learning-rate schedule.

`build_optimizer` gives what `train.optimizer` names: fused AdamW over every parameter (weight decay
on matrices and embeddings only), or Muon for the 2-D matrices inside the transformer blocks with
AdamW for the rest, used as one optimizer (`MuonWithAdamW`). `Muon` is `torch.optim.Muon` with its
Newton-Schulz iteration batched over same-shaped matrices and run in the training's precision, and
able to skip its update on the device (`steps_unless`), which is how the training step's NaN guard
avoids a host sync. `learning_rate` is the schedule: linear warmup, then cosine decay to `min_lr`.
"""

import math

import torch
from torch import nn

from gpt.config import TrainConfig
from gpt.precision import bf16_is_fast, pick_dtype


# --------------------------------------------------------------------------- Muon

def orthogonalise(matrix: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """~The nearest semi-orthogonal matrix to `matrix` (U V^T of its SVD), computed in `dtype`.

    torch.optim.Muon's quintic Newton-Schulz iteration, step for step: scaled to spectral
    norm <= 1, then `steps` times X <- a X + (b A + c A^2) X with A = X X^T. It drives every
    singular value towards 1 (to roughly 0.7-1.2, which is all Muon needs). A (N, rows, cols)
    stack is N matrices at once, each scaled by its own norm: batched matmuls, one launch each.
    """
    a, b, c = coefficients
    x = matrix.to(dtype)
    tall = matrix.size(-2) > matrix.size(-1)
    if tall:  # work on the wide side: X X^T is then the smaller Gram matrix
        x = x.mT
    if x.dim() == 2:  # torch's ops exactly (addmm), so that in bf16 it is torch's Muon bit for bit
        x = x / x.norm().clamp(min=eps)
        for _ in range(steps):
            gram = x @ x.T
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    else:
        x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
        for _ in range(steps):
            gram = x @ x.mT  # (N, rows, rows)
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def muon_lr_ratio(shape: torch.Size) -> float:
    """torch.optim.Muon's per-matrix learning-rate factor (its `adjust_lr_fn` "original"): the update's
    RMS then does not depend on the matrix's shape."""
    rows, cols = shape[:2]
    return math.sqrt(max(1.0, rows / cols))


class Muon(torch.optim.Muon):
    """`torch.optim.Muon` with its Newton-Schulz iteration in `ns_dtype`, over same-shaped matrices at once.

    Same settings, same state (`momentum_buffer` per matrix), same update: run one matrix at a time in
    bf16, it gives torch's results bit for bit (tests/test_optim.py). torch's step orthogonalises one
    matrix at a time, ~15 small kernels each; here the matrices of one shape (a tall one counted as its
    transpose) go through the iteration as one (N, rows, cols) stack, as modded-nanogpt and nanochat do:
    GPT-2 small's 72 matrices are then two batches, not 72 launches of everything.

    Where `found_inf` is set on it (a 1-element float tensor on the device, as GradScaler sets it
    for fused optimizers; 1 = skip), a step with it at 1 changes neither a weight nor a momentum
    buffer, decided on the device with no host sync (`where_each`: a few ops per shape, not per matrix).
    """

    def __init__(self, params, ns_dtype: torch.dtype = torch.float32, **kwargs):
        super().__init__(params, **kwargs)
        if self.defaults["adjust_lr_fn"] not in (None, "original"):
            raise ValueError(f"Muon: adjust_lr_fn {self.defaults['adjust_lr_fn']!r} is not supported here; "
                             "the learning rate is scaled by torch's original rule")
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)
        skip = None if found_inf is None else found_inf.reshape(()).bool()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            lr = group["lr"]
            decay = 1 - lr * group["weight_decay"]  # decoupled weight decay
            if skip is not None:  # x 1 when skipping, one tensor on the device for the whole group
                decay = torch.where(skip, 1.0, decay)
            for indices in self._same_shapes(params):  # one shape's updates alive at a time
                members = [params[i] for i in indices]
                updates = self._momentum_updates(members, group["momentum"], group["nesterov"], skip)
                if len(updates) == 1:
                    done = orthogonalise(updates[0], group["ns_coefficients"], group["ns_steps"], group["eps"],
                                         self.ns_dtype)
                    ortho = [done]
                else:  # (N, rows, cols), every tall matrix transposed to the group's wide shape
                    stack = torch.stack([u.mT if u.size(0) > u.size(1) else u for u in updates])
                    del updates
                    done = orthogonalise(stack, group["ns_coefficients"], group["ns_steps"], group["eps"],
                                         self.ns_dtype)
                    ortho = [o.mT if p.size(0) > p.size(1) else o for o, p in zip(done.unbind(0), members)]
                if skip is not None:  # +0.0 when skipping: x + (-lr) * (+0.0) is x bit for bit, -0.0 included
                    done.masked_fill_(skip, 0.0)
                # torch's param.mul_(decay); param.add_(update, alpha=-lr * ratio), a list at a time
                torch._foreach_mul_(members, decay)
                for same in indices_by([p.shape for p in members]):  # the tall ones have their own ratio
                    ratio = muon_lr_ratio(members[same[0]].shape)
                    torch._foreach_add_([members[i] for i in same], [ortho[i] for i in same], alpha=-lr * ratio)
        return loss

    def _momentum_updates(self, params: list[torch.Tensor], momentum: float, nesterov: bool,
                          skip: torch.Tensor | None) -> list[torch.Tensor]:
        """Advance each matrix's momentum buffer by its gradient -> the updates to orthogonalise (torch's math)."""
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad)
            bufs.append(state["momentum_buffer"])
        grads = [p.grad for p in params]
        # When skipping, each buffer steps towards itself: buf + w * (+0.0) is buf (a NaN gradient cannot
        # be masked by a weight: NaN * 0 is NaN). Bit for bit: a buffer is never -0.0 (it starts at +0.0
        # and a lerp gives -0.0 only from -0.0), except at momentum 0, where it is a copy of the gradient.
        if skip is not None:
            grads = where_each(skip, bufs, grads)
        torch._foreach_lerp_(bufs, grads, 1 - momentum)
        return torch._foreach_lerp(grads, bufs, momentum) if nesterov else bufs

    def _same_shapes(self, params: list[torch.Tensor]) -> list[list[int]]:
        """Indices of `params` grouped by shape, a tall matrix with the wide ones of its transpose's shape."""
        return indices_by([(min(p.shape), max(p.shape)) for p in params])


def indices_by(keys: list) -> list[list[int]]:
    """The indices of equal keys, grouped, in the order each key first appears."""
    groups: dict = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def where_each(condition: torch.Tensor, inputs: list[torch.Tensor], others: list[torch.Tensor]) -> list[torch.Tensor]:
    """`[torch.where(condition, x, y) for x, y in zip(inputs, others)]`, one stacked `where` per shape.

    torch has no foreach `where`: the tensors of each shape are stacked and chosen from in one op,
    a few ops per shape, not one per tensor. The results are views into that stack, laid out as
    the inputs.
    """
    chosen: dict[int, torch.Tensor] = {}
    for same in indices_by([(x.shape, x.dtype) for x in inputs]):
        if len(same) == 1:
            chosen[same[0]] = torch.where(condition, inputs[same[0]], others[same[0]])
        else:
            stacked = torch.stack([others[i] for i in same])  # (N, *shape)
            torch.where(condition, torch.stack([inputs[i] for i in same]), stacked, out=stacked)  # no third fresh copy
            chosen.update(zip(same, stacked.unbind(0)))
    return [chosen[i] for i in range(len(inputs))]


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


def steps_unless(optimizer: torch.optim.Optimizer | MuonWithAdamW, skip: torch.Tensor) -> bool:
    """Step `optimizer` with the update skipped on the device where `skip` (a bool tensor) is true -> True;
    False, doing nothing, where some part cannot skip on the device (the caller then syncs and steps).

    Fused AdamW takes `found_inf` as GradScaler hands it over (its step counter is taken back too);
    our `Muon` takes it the same way. No host sync: the GPU keeps running.
    """
    parts = [optimizer.muon, optimizer.adamw] if isinstance(optimizer, MuonWithAdamW) else [optimizer]
    if not all(isinstance(part, Muon) or (isinstance(part, torch.optim.AdamW) and part.defaults.get("fused"))
               for part in parts):
        return False
    found_inf = skip.float().reshape(())  # 1.0 = skip, as GradScaler sets it
    for part in parts:
        part.found_inf = found_inf
        try:
            part.step()
        finally:
            del part.found_inf
    return True


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
    # Newton-Schulz in bf16 (torch's choice) where training autocasts and bf16 is native; in float32
    # where training runs in float32 or bf16 would be emulated
    bf16 = pick_dtype(cfg.dtype, device) != torch.float32 and bf16_is_fast(device)
    muon = Muon(matrices, ns_dtype=torch.bfloat16 if bf16 else torch.float32, **options)
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
