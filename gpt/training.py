"""The training loop and the pieces it is made of.

`train` reads top to bottom: learning rate, `train_step`, progress, evaluation and save when due,
stop when asked. `train_step` is the micro-step loop; the optimizer step behind it (`optimizer_step`)
clips and skips a non-finite update on the device, so the step's one host sync comes after the
update. A `Run` holds what a checkpoint records (model, optimizer, precision, loop state): train.py
builds it and `gpt.resume.restore_run` fills it before `train` starts. A NaN, or running out of
memory, stops the run before anything is saved (`NonFiniteLoss`, `OutOfMemory`).
"""

import contextlib
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from gpt.compiled import CompiledOrEager, compile_model
from gpt.config import DataConfig, TrainConfig
from gpt.data import TrainBatches, eval_loader
from gpt.device import indexed
from gpt.distributed import Distributed, SINGLE
from gpt.metrics import Figures
from gpt.model import IGNORE_INDEX
from gpt.optim import build_optimizer, set_learning_rate, steps_unless
from gpt.precision import Precision, dtype_name, pick_dtype, scoring_dtype
from gpt.tokenizer import token_byte_lengths


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A (B, T) batch of token ids (uint16 from the token files) as int64 on `device`."""
    # Copied as uint16 (a quarter of the bytes), widened on the device; from pinned memory the
    # copy is asynchronous.
    return batch.to(device, non_blocking=device.type == "cuda").long()


def batch_to_device(batch: tuple[torch.Tensor, ...], device: torch.device
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A loader's (inputs, targets) or packed chat windows' (inputs, targets, positions) -> int64
    tensors on `device`, positions None where each row holds one sequence."""
    inputs, targets, *positions = (to_device(tensor, device) for tensor in batch)
    return inputs, targets, positions[0] if positions else None


def token_losses(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                 positions: torch.Tensor | None = None) -> torch.Tensor:
    """(B*T,) next-token losses of one (B, T) batch, 0 where a target is IGNORE_INDEX, computed by the model.

    The one call every evaluation makes (`loss_sums`: `evaluate`, `score`), so that through a
    compiled model they run one graph, with the loss inside it (no (B, T, V) logits leave it)."""
    return model(inputs, targets=targets, reduction="none", positions=positions)


@dataclass
class LossSums:
    """Sums over the targets the loss counts in some batches, added up over every process."""

    tokens: int = 0  # the counted targets: a text window's, a chat window's replies; no padding row's
    nats: float = 0.0  # their summed next-token loss
    text_nats: float = 0.0  # with byte lengths (else 0): the loss of the targets that are text
    text_tokens: int = 0
    text_bytes: int = 0  # the UTF-8 bytes of those


@torch.no_grad()
def loss_sums(model: nn.Module, batches: Iterable[tuple[torch.Tensor, ...]], device: torch.device,
              precision: Precision | None = None, dist: Distributed = SINGLE,
              byte_lengths: torch.Tensor | None = None) -> LossSums:
    """The loss summed over the counted targets of a loader's `batches`, in eval mode; restores the mode.

    `byte_lengths`, (ids,) on `device`: each id's UTF-8 bytes, 0 where it is not text; with it, the
    text's sums too (bits per byte). With several processes, each runs its share and the sums are over all.
    """
    was_training = model.training
    model.eval()
    per_batch = []  # each batch's sums, left on the device: one sync at the end
    for batch in batches:
        inputs, targets, positions = batch_to_device(batch, device)
        with precision.autocast() if precision else contextlib.nullcontext():
            # IGNORE_INDEX targets (a chat window's prompt and padding, a padding row) give 0: they count nowhere
            nats = token_losses(model, inputs, targets, positions).float()  # (B*T,), the loss inside the model
        targets = targets.flatten()
        counted = targets != IGNORE_INDEX
        sums = [counted.sum(), nats.sum()]
        if byte_lengths is not None:
            text_bytes = byte_lengths[targets.clamp(min=0)] * counted  # (B*T,), 0 for <|endoftext|> and ignored ones
            is_text = text_bytes > 0
            sums += [(nats * is_text).sum(), is_text.sum(), text_bytes.sum()]
        per_batch.append(torch.stack(sums))
    model.train(was_training)
    # Summed in float64 (on the CPU: MPS has none) over any number of batches; each batch's counts
    # are far below float32's 2**24, so they are exact.
    width = 2 if byte_lengths is None else 5
    total = torch.stack(per_batch).cpu().double().sum(0) if per_batch else torch.zeros(width, dtype=torch.float64)
    if dist.launched:
        total = dist.sum(total.to(device)).cpu()
    tokens, nats, *text = total.tolist()
    text_nats, text_tokens, text_bytes = text or (0.0, 0, 0)
    return LossSums(int(tokens), nats, text_nats, int(text_tokens), int(text_bytes))


def evaluate(model: nn.Module, loader: DataLoader, device: torch.device,
             precision: Precision | None = None, dist: Distributed = SINGLE) -> float:
    """Mean loss over `loader`'s counted targets in eval mode (dropout off); restores the previous mode.

    With several processes, each evaluates its share of the batches and the mean is over all.
    """
    sums = loss_sums(model, loader, device, precision, dist)
    return sums.nats / sums.tokens


@dataclass
class Score:
    """Sums over the scored tokens of every window; the figures are properties."""

    windows: int = 0
    tokens: int = 0  # target tokens scored
    nats: float = 0.0  # their summed next-token loss
    text_tokens: int = 0  # those that are text (all but <|endoftext|>)
    text_nats: float = 0.0
    text_bytes: int = 0  # the UTF-8 bytes of those

    @property
    def loss(self) -> float:
        """Mean nats per scored token."""
        return self.nats / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50))

    @property
    def bits_per_byte(self) -> float:
        """Nats of the text tokens / (their UTF-8 bytes x ln 2)."""
        return self.text_nats / (self.text_bytes * math.log(2)) if self.text_bytes else math.nan


def score(model: nn.Module, loader: DataLoader, device: torch.device, precision: Precision | None = None,
          dist: Distributed = SINGLE) -> Score:
    """Loss and bits per byte over every batch of `loader`, in eval mode; restores the mode.

    `model` runs as given: compiled (`compile_model`), the loss is computed inside its graph. With
    several processes, each scores its share of the batches and the sums are over all.
    """
    # 0 bytes for <|endoftext|> and for ids past GPT-2's (a chat template's markers): not text
    lengths = token_byte_lengths()
    byte_lengths = torch.zeros(max(len(lengths), 1 << 16), dtype=torch.long)  # every uint16 id
    byte_lengths[:len(lengths)] = torch.tensor(lengths)
    byte_lengths = byte_lengths.to(device)
    windows = sum(len(batch) for batch in loader.batch_sampler)  # this process's; padding rows are none
    if dist.launched:
        windows = int(dist.sum(torch.tensor(windows, device=device)).item())
    batches = tqdm(loader, desc="evaluating", unit="batch", leave=False, disable=None if dist.is_main else True)
    return Score(windows, **asdict(loss_sums(model, batches, device, precision, dist, byte_lengths)))


def describe(result: Score, label: str, what: str, dtype: torch.dtype) -> str:
    """One line: `<label> over all N windows of <what>: loss (ppl), bits per byte (..., in <dtype>)`."""
    return (f"{label} over all {result.windows:,} windows of {what}: {result.loss:.4f} "
            f"(ppl {result.perplexity:.1f}), {result.bits_per_byte:.4f} bits per byte "
            f"({result.tokens:,} tokens, {result.text_bytes:,} bytes of text, in {dtype_name(dtype)})")


def final_val_line(model: nn.Module, loader: DataLoader, run: TrainConfig, device: torch.device, dist: Distributed,
                   what: tuple[str, str], step: int) -> str:
    """Training's final figure, after `step`: the val loss over every window, named by `what` (the data
    format's `whole_val`: a chat run's is over the replies only), in the precision runs are compared in
    (float32 on any CPU), compiled where `run` compiled training."""
    precision = Precision(scoring_dtype("comparable", run.dtype, device), device)
    # Compiled again, not passed from `train`: Dynamo finds the graph the periodic evaluation
    # compiled for this module and shape (the same `token_losses` call) and compiles nothing more
    # (measured in one process and through DDP: docs/performance.md).
    scored_model = compile_model(model, run.compile, device)
    with out_of_memory_named("the evaluation over the whole val split after step", step, device):
        scored = score(scored_model, loader, device, precision, dist)
    return describe(scored, *what, precision.dtype)


@dataclass
class TrainState:
    """What changes as training runs (and what a checkpoint records)."""

    step: int = 0
    best_val_loss: float = math.inf
    best_step: int = 0  # the step best_val_loss was measured at (0: none yet)
    train_loss: float = math.nan
    val_loss: float = math.nan


class NonFiniteLoss(Exception):
    """The loss or the weights stopped being finite at `step`; nothing from then on is saved.

    Raised without a step by what does not know it (`train_step`); `out_of_memory_named` names it.
    """

    def __init__(self, what: str, value: float, step: int | None = None):
        super().__init__(what, value, step)
        self.what, self.value, self.step = what, value, step

    def __str__(self) -> str:
        return f"{self.what} is {self.value} at step {self.step}"


class OutOfMemory(Exception):
    """The device ran out of memory during `phase` (a training step or an evaluation) at `step`.

    Raised from `torch.OutOfMemoryError` (CUDA's), which leaves nothing saved half way: the last
    checkpoint is the one before. `gpt.resume.out_of_memory_error` turns it into one line saying what to lower.
    """

    def __init__(self, phase: str, step: int, device: torch.device, error: torch.OutOfMemoryError):
        tried = re.search(r"[Tt]ried to allocate ([\d.]+ [KMGT]?i?B)", str(error))
        if torch.cuda.is_available():  # `cuda` is the current GPU: the line names it (cuda:0), as CUDA's does
            device = indexed(device)
        self.phase, self.step, self.device = phase, step, device
        self.tried = tried.group(1) if tried else None
        super().__init__(f"out of memory on {device} during {phase} {step}"
                         + (f" (tried to allocate {self.tried})" if self.tried else ""))


@contextlib.contextmanager
def out_of_memory_named(phase: str, step: int, device: torch.device) -> Iterator[None]:
    """Inside, `torch.OutOfMemoryError` becomes `OutOfMemory(phase, step, ...)`, and a `NonFiniteLoss`
    raised without a step is given `step`."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        raise OutOfMemory(phase, step, device, e) from None  # from None: the failed step's tensors can go
    except NonFiniteLoss as e:
        e.step = step if e.step is None else e.step
        raise


def weights_are_finite(model: nn.Module) -> bool:
    """True when no parameter holds a NaN or an infinity (one device sync for all of them)."""
    return bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())


def gradient_sync(model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """Nothing, or with `enabled` False under DDP its `no_sync()`: gradients accumulate locally, not exchanged."""
    ddp = model.eager if isinstance(model, CompiledOrEager) else model
    if enabled or not isinstance(ddp, DistributedDataParallel):
        return contextlib.nullcontext()
    return ddp.no_sync()


def counted_targets(batches: list[tuple[torch.Tensor, ...]], device: torch.device) -> torch.Tensor:
    """The targets the loss counts in `batches` (not IGNORE_INDEX), counted on the host, where they are.

    Sent to a GPU from pinned memory, asynchronously: a copy from pageable memory waits for the GPU."""
    count = torch.tensor(float(sum(int((batch[1] != IGNORE_INDEX).sum()) for batch in batches)))
    if device.type == "cuda":
        count = count.pin_memory()
    return count.to(device, non_blocking=True)


def train_step(model: nn.Module, batches: Iterator[tuple[torch.Tensor, ...]], optimizer: torch.optim.Optimizer,
               precision: Precision, cfg: TrainConfig, dist: Distributed = SINGLE) -> tuple[float, int]:
    """One optimizer step over `cfg.grad_accum_steps` micro-batches -> (loss, tokens seen by every process).

    The loss and its gradient are the mean over every target the step counts, in all its micro-batches
    and on every process (as nanochat's): a micro-batch of short replies weighs by its tokens. With several
    processes, each runs its share of the micro-batches (`model` is in DDP). Raises `NonFiniteLoss` before
    updating anything if the loss or the gradient norm is NaN or infinite.
    """
    device = precision.device
    micro_batches = [next(batches) for _ in range(dist.local_accum_steps(cfg.grad_accum_steps))]
    # 1 / the step's count, times world_size to undo DDP's mean over the processes' gradients
    scale = dist.world_size / dist.sum(counted_targets(micro_batches, device)).clamp(min=1)
    step_loss = torch.zeros((), device=device)  # the mean over the step's targets, a micro-batch at a time
    for i, batch in enumerate(micro_batches):
        inputs, targets, positions = batch_to_device(batch, device)
        with gradient_sync(model, enabled=i == len(micro_batches) - 1):  # exchanged once, in the last backward
            with precision.autocast():
                loss = model(inputs, targets=targets, reduction="sum", positions=positions,
                             checkpoint_activations=cfg.activation_checkpointing) * scale
            precision.backward(loss)
        step_loss += loss.detach()  # on the device: no sync per micro-batch
    loss = optimizer_step(model, optimizer, dist.sum(step_loss) / dist.world_size, precision, cfg.grad_clip)
    return loss, sum(batch[0].numel() for batch in micro_batches) * dist.world_size


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor, precision: Precision,
                   grad_clip: float) -> float:
    """Clip the gradients to `grad_clip` (0: no clipping) and step, unless the loss or the gradient norm is not
    finite (then `NonFiniteLoss`) -> the loss. The gradients are zeroed either way.

    The update is queued before the host reads the loss: whether to skip it is decided on the device
    (`step_unless_on_device`), so the step's one sync comes after, while the GPU works through it.
    """
    if precision.scaler.is_enabled():  # fp16: the scaler skips steps whose gradients overflowed
        return _scaled_step(model, optimizer, loss, precision.scaler, grad_clip)
    norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip) if grad_clip > 0
            else torch.zeros((), device=loss.device))
    step_unless_on_device(optimizer, ~(torch.isfinite(loss) & torch.isfinite(norm)))
    optimizer.zero_grad(set_to_none=True)
    loss_value, norm_value = torch.stack([loss, norm.float()]).tolist()
    for what, value in (("loss", loss_value), ("the gradient norm", norm_value)):
        if not math.isfinite(value):
            raise NonFiniteLoss(what, value)
    return loss_value


def step_unless_on_device(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """Step `optimizer` unless `skip` (a bool tensor): decided on the device by fused AdamW and our Muon
    (`steps_unless`); any other optimizer waits for the device to say."""
    if not steps_unless(optimizer, skip) and not skip.item():
        optimizer.step()


def _scaled_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor,
                 scaler: torch.amp.GradScaler, grad_clip: float) -> float:
    """fp16's step: stop on a non-finite loss, unscale, clip, and let the scaler step (or skip) -> the loss."""
    loss_value = loss.item()
    if not math.isfinite(loss_value):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLoss("loss", loss_value)
    if grad_clip > 0:
        scaler.unscale_(optimizer)  # clip the true gradient, not the scaled one
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)  # skipped if fp16 gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_value


@dataclass
class Run:
    """What training changes and a checkpoint records: the model (as built, not wrapped or compiled),
    its optimizer, the precision (with fp16's GradScaler) and the loop's state; `dist` is this process's
    place among the run's."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    precision: Precision
    state: TrainState = field(default_factory=TrainState)
    dist: Distributed = SINGLE


def new_run(model: nn.Module, cfg: TrainConfig, device: torch.device, dist: Distributed = SINGLE) -> Run:
    """A run of `model` at step 0: the optimizer `cfg.optimizer` names, the precision `cfg.dtype` picks on `device`."""
    return Run(model, build_optimizer(model, cfg, device), Precision(pick_dtype(cfg.dtype, device), device), dist=dist)


class Evaluation(Protocol):
    """Run at each evaluation, after the loss: (model, precision) -> Figures; `columns` names its metrics."""

    columns: list[str]
    references: dict[str, tuple[float, str]]  # lines a plot of its metrics draws beside them (gpt.metrics)

    def __call__(self, model: nn.Module, precision: Precision) -> Figures: ...


@dataclass
class TrainData:
    """What a run reads: endless shuffled train batches and the fixed loaders it evaluates with."""

    batches: TrainBatches  # (inputs, targets) forever, resumable
    eval_loaders: dict[str, DataLoader]  # "train" and "val": evenly spread batches, for the periodic estimate
    whole_val: DataLoader | None = None  # every val window: the figure to compare runs by
    evaluations: list[Evaluation] = field(default_factory=list)  # beyond the loss (train.eval_tasks' tasks)


def evaluations(cfg: TrainConfig, chat: bool, context: int, batch_size: int, device: torch.device,
                dist: Distributed) -> list[Evaluation]:
    """What a run evaluates beyond the loss: `cfg.eval_tasks`' multiple-choice tasks, framed as a chat run's
    prompts where `chat` (`gpt.tools.multiple_choice`, imported only for them)."""
    if not cfg.eval_tasks:
        return []
    from gpt.tools.multiple_choice import task_evaluation
    return [task_evaluation(cfg, chat, context, batch_size, device, dist)]


def train_data(train_set: Dataset, val_set: Dataset, data: DataConfig, cfg: TrainConfig, dist: Distributed,
               device: torch.device) -> TrainData:
    """The batches and loaders of a run over `train_set` and `val_set`: this process's share of each."""
    batches = TrainBatches(train_set, data.batch_size, cfg.seed, data.num_workers, pin_memory=device.type == "cuda",
                           share=dist.batch_share(cfg.grad_accum_steps))
    eval_loaders = {split: eval_loader(windows, data.batch_size, cfg.eval_iters, dist.rank, dist.world_size)
                    for split, windows in (("train", train_set), ("val", val_set))}
    whole_val = eval_loader(val_set, data.batch_size, None, dist.rank, dist.world_size)
    return TrainData(batches, eval_loaders, whole_val)


class Progress:
    """The progress bar, the smoothed tokens/s and each evaluation's line and log; only the main process
    shows and prints them. `log`, if given, gets each evaluation's metrics as a dict."""

    def __init__(self, cfg: TrainConfig, step: int, dist: Distributed, log: Callable[[dict], None] | None = None):
        self.show = dist.is_main
        self.bar = tqdm(total=cfg.max_iters, initial=step, desc="training", unit="step",
                        disable=None if self.show else True, dynamic_ncols=True)
        self.rate: float | None = None  # tokens/s, smoothed
        self.lr = math.nan  # the last step's
        self.log = log

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc_info) -> None:
        self.bar.close()  # before any error's message

    def update(self, loss: float, lr: float, tokens_per_s: float) -> None:
        """Count one more step, which ran at `tokens_per_s`."""
        self.rate = tokens_per_s if self.rate is None else 0.9 * self.rate + 0.1 * tokens_per_s
        self.lr = lr
        self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{self.rate:,.0f}")
        self.bar.update(1)

    def report(self, state: TrainState, figures: list[Figures]) -> None:
        """An evaluation's line (both losses, their perplexities, the speed and what each other evaluation
        adds) and its metrics to the log."""
        if self.show:
            scores = "".join(f.line for f in figures)
            self.bar.write(
                f"step {state.step}: train loss {state.train_loss:.4f} "
                f"(ppl {math.exp(min(state.train_loss, 50)):.1f}), val loss {state.val_loss:.4f} "
                f"(ppl {math.exp(min(state.val_loss, 50)):.1f}), {self.rate:,.0f} tokens/s{scores}"
            )
        if self.log is not None:
            self.log({"step": state.step, "train_loss": state.train_loss, "val_loss": state.val_loss,
                      "lr": self.lr, "tokens_per_s": self.rate,
                      **{name: value for f in figures for name, value in f.metrics.items()}})


def measure(net: nn.Module, data: TrainData, run: Run) -> list[Figures]:
    """Evaluate the train and val loss into `run.state` (and the best val loss) through `net`, then run
    `data`'s other evaluations -> their figures; NonFiniteLoss if a loss is not finite."""
    state, device = run.state, run.precision.device
    with out_of_memory_named("the evaluation at step", state.step, device):
        state.train_loss = evaluate(net, data.eval_loaders["train"], device, run.precision, run.dist)
        state.val_loss = evaluate(net, data.eval_loaders["val"], device, run.precision, run.dist)
    for what, value in (("train loss", state.train_loss), ("val loss", state.val_loss)):
        if not math.isfinite(value):
            raise NonFiniteLoss(what, value, state.step)
    if state.val_loss < state.best_val_loss:
        state.best_val_loss, state.best_step = state.val_loss, state.step
    with out_of_memory_named("the tasks' evaluation at step", state.step, device):
        return [evaluate_more(run.model, run.precision) for evaluate_more in data.evaluations]


def save_if_finite(run: Run, save: Callable[[Run], None]) -> None:
    """`save(run)`, unless a weight is not finite: a NaN model never replaces a good checkpoint."""
    if not weights_are_finite(run.model):
        raise NonFiniteLoss("a weight", math.nan, run.state.step)
    save(run)


def train(run: Run, cfg: TrainConfig, data: TrainData, save: Callable[[Run], None],
          stop: Callable[[], bool] | None = None, log: Callable[[dict], None] | None = None) -> TrainState:
    """Train `run` up to step `cfg.max_iters`, evaluating and calling `save(run)` every `cfg.eval_interval` steps.

    `save` is a run folder's `gpt.resume.RunCheckpoints.save`; every process calls it. `stop()` is asked
    after every step: when true, the run saves and returns early (`state.step < cfg.max_iters`). The
    model trains in place, through DistributedDataParallel when `run.dist` has several processes and
    compiled if `cfg.compile` says so.
    """
    state, device = run.state, run.precision.device
    batches = iter(data.batches)  # from its position: a restored run's continues
    net = compile_model(run.dist.wrap(run.model, device), cfg.compile, device)  # DDP first, then compile (PyTorch's advice)
    run.model.train()  # dropout active for the steps
    with Progress(cfg, state.step, run.dist, log) as progress:
        while state.step < cfg.max_iters:
            started = time.perf_counter()
            lr = set_learning_rate(run.optimizer, state.step, cfg)
            with out_of_memory_named("training step", state.step + 1, device):
                loss, tokens = train_step(net, batches, run.optimizer, run.precision, cfg, run.dist)
            state.step += 1
            progress.update(loss, lr, tokens / (time.perf_counter() - started))

            evaluated = state.step % cfg.eval_interval == 0 or state.step == cfg.max_iters
            if evaluated:
                progress.report(state, measure(net, data, run))
            stopping = stop is not None and run.dist.any(stop(), device)  # every process stops at the same step
            if evaluated or stopping:
                save_if_finite(run, save)
            if stopping:
                break
    return state
