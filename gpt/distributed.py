"""Data-parallel training across GPUs and machines: torchrun + DistributedDataParallel.

`start` reads torchrun's environment, joins the process group and picks this process's device; a
plain `python train.py` gets `SINGLE`, whose methods do nothing. N processes train exactly as one:
the global batch (data.batch_size x train.grad_accum_steps windows) comes from the one shuffled
stream whatever N is, split into equal shares (`batch_share`), so a step sees the same windows and a
checkpoint's data position means the same for any N. DDP averages the gradients; evaluation sums
the processes' losses; only rank 0 prints and writes.
"""

import inspect
import math
import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gpt.device import indexed
from gpt.errors import UserError

T = TypeVar("T")
# Rank 0 may prepare a large corpus while the others wait for it: give collectives that long.
TIMEOUT = timedelta(hours=1)
ENV_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
SYNC_BUFFERS_OPTION = ("forward_sync_buffers"
                       if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                       else "broadcast_buffers")


@dataclass(frozen=True)
class BatchShare:
    """Which part of the one batch stream a process reads (`gpt.data.TrainBatches`): `rank` of `world_size`,
    with `shares` consecutive ranks taking each batch together (1: whole batches)."""

    rank: int = 0
    world_size: int = 1
    shares: int = 1


@dataclass(frozen=True)
class Distributed:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    local_rank: int = 0  # rank among the processes on this machine: picks the GPU
    world_size: int = 1
    local_world_size: int = 1
    launched: bool = False  # started by torchrun (`start` joins its process group)

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that prints, logs and saves."""
        return self.rank == 0

    def accum_groups(self, grad_accum_steps: int) -> int:
        """How many groups of processes take the step's micro-batches in turn: gcd(grad_accum_steps, N)."""
        return math.gcd(grad_accum_steps, self.world_size)

    def batch_shares(self, grad_accum_steps: int) -> int:
        """How many processes share each micro-batch (1: each takes whole micro-batches)."""
        return self.world_size // self.accum_groups(grad_accum_steps)

    def batch_share(self, grad_accum_steps: int) -> BatchShare:
        """This process's part of the batch stream at `grad_accum_steps` micro-batches a step."""
        return BatchShare(self.rank, self.world_size, self.batch_shares(grad_accum_steps))

    def local_accum_steps(self, grad_accum_steps: int) -> int:
        """Micro-steps per optimizer step for this process (its group's share of the micro-batches)."""
        return grad_accum_steps // self.accum_groups(grad_accum_steps)

    def local_batch_size(self, batch_size: int, grad_accum_steps: int) -> int:
        """Windows per micro-step for this process: its slice of a micro-batch (checked by `check_batch`)."""
        return batch_size // self.batch_shares(grad_accum_steps)

    def check_batch(self, batch_size: int, grad_accum_steps: int) -> None:
        """A clear error, with values that work, when the global batch cannot be shared evenly."""
        windows, n = batch_size * grad_accum_steps, self.world_size
        if windows % n == 0:
            return
        # The smallest batch_size (or grad_accum_steps) at least as large whose global batch n divides.
        batch_step = n // math.gcd(grad_accum_steps, n)
        accum_step = n // math.gcd(batch_size, n)
        counts = [str(d) for d in range(1, windows + 1) if windows % d == 0][:8]
        counts = counts[0] if len(counts) == 1 else f"{', '.join(counts[:-1])} or {counts[-1]}"
        raise UserError(
            f"the global batch, data.batch_size x train.grad_accum_steps = {batch_size} x {grad_accum_steps} = "
            f"{windows} windows, cannot be shared evenly by {n} processes; start {counts} processes "
            f"(--nproc_per_node), or make the global batch a multiple of {n}: "
            f"--data.batch_size={-(-batch_size // batch_step) * batch_step} or "
            f"--train.grad_accum_steps={-(-grad_accum_steps // accum_step) * accum_step}")

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over every process, in place (itself when there is one process)."""
        if self.launched:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every process when `flag` is true on any of them."""
        if not self.launched:
            return flag
        return bool(self.sum(torch.tensor(float(flag), device=device)).item())

    def gather(self, obj: T) -> list[T]:
        """Every process's `obj`, in rank order, on every process."""
        if not self.launched:
            return [obj]
        objects = [None] * self.world_size
        dist.all_gather_object(objects, obj)
        return objects

    def in_turn(self, action: Callable[[], T]) -> T:
        """Run `action` on rank 0 first, then on the first process of each machine, then on the rest.

        For work that writes shared files once (preparing the corpus): rank 0 does it, the others
        find it done; a machine that does not share rank 0's disk does it once for itself.
        """
        if not self.launched:
            return action()
        result = None
        for turn in (self.rank == 0, self.rank != 0 and self.local_rank == 0, self.local_rank != 0):
            if turn:
                result = action()
            dist.barrier()
        return result

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """`model` in DistributedDataParallel (which copies rank 0's weights to all); itself alone."""
        if not self.launched:
            return model
        # The model's buffers (the causal masks, the padding bias) never change: DDP need not
        # resend them before every forward (torch 2.13 renamed the option).
        no_buffer_sync = {SYNC_BUFFERS_OPTION: False}
        return DistributedDataParallel(
            model, device_ids=[indexed(device).index] if device.type == "cuda" else None,
            gradient_as_bucket_view=True,  # gradients live in DDP's buffers: one copy less per step
            **no_buffer_sync,
        )

    def close(self) -> None:
        if self.launched and dist.is_initialized():
            dist.destroy_process_group()


SINGLE = Distributed()


def plural(count: int, word: str, words: str) -> str:
    """`1 process`, `4 processes`."""
    return f"{count} {word if count == 1 else words}"


def batch_line(batch_size: int, accum: int, context: int, dist: Distributed) -> str:
    """The global batch, and with several processes what each of them runs of it."""
    line = (f"global batch: {plural(batch_size, 'window', 'windows')} x {plural(accum, 'micro-step', 'micro-steps')}"
            f" = {batch_size * accum * context:,} tokens per step")
    if not dist.launched:
        return line
    local_steps = plural(dist.local_accum_steps(accum), "micro-step", "micro-steps")
    local_batch = plural(dist.local_batch_size(batch_size, accum), "window", "windows")
    return f"{line}; each of {dist.world_size} processes runs {local_steps} of {local_batch}"


def launched_by_torchrun() -> bool:
    return all(key in os.environ for key in ENV_KEYS)


def environment_rank() -> int:
    """This process's rank from the environment (0 when not started by torchrun); needs no process group."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def environment_place() -> Distributed:
    """This process's place as torchrun's variables give it (`SINGLE` without them); joins no group."""
    if not launched_by_torchrun():
        return SINGLE
    try:
        return Distributed(*(int(os.environ[key]) for key in ENV_KEYS), launched=True)
    except ValueError:
        raise UserError(f"the torchrun variables {', '.join(ENV_KEYS)} must be whole numbers; "
                        "start train.py with torchrun, or with python for one process") from None


def start(device: torch.device) -> tuple[Distributed, torch.device]:
    """Join the process group when started by torchrun -> (this process's place, its device).

    `device` is the one `train.device` picked; under torchrun a CUDA device becomes
    `cuda:LOCAL_RANK`. Without torchrun: (`SINGLE`, `device`), and nothing is set up.
    """
    place = environment_place()
    if not place.launched:
        return SINGLE, device
    if device.type == "cuda":
        if device.index is not None:
            raise UserError(f"train.device is {device}, but under torchrun each process uses the GPU of its "
                            "LOCAL_RANK; set train.device to auto or cuda (choose GPUs with CUDA_VISIBLE_DEVICES)")
        available = torch.cuda.device_count()
        if place.local_world_size > available:
            raise UserError(f"torchrun started {place.local_world_size} processes on this machine but it has "
                            f"{available} GPU(s); use --nproc_per_node={available} or fewer")
        device = torch.device("cuda", place.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise UserError(f"train.device {device.type} cannot train with several processes (PyTorch's DDP "
                        "supports cuda and cpu); run python train.py for one process, or set train.device: cpu")
    dist.init_process_group(backend, timeout=TIMEOUT, device_id=device if backend == "nccl" else None)
    return place, device


def single_process_group(device: torch.device) -> Distributed:
    """A process group of this process alone, for timing what DDP itself costs (`gpt.bench --ddp`)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    # init_process_group refuses a `device_id` without an index: `cuda` is named `cuda:N`
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                            device_id=indexed(device) if backend == "nccl" else None)
    return Distributed(launched=True)


def resume_command(script: Path, argv: list[str]) -> str:
    """The command that continues a run of `script` (train.py): the same arguments, with --resume for
    --overwrite. Under torchrun: torchrun with as many processes on this machine (another count works too).
    """
    try:  # as the user would type it from where they are
        script = Path(os.path.relpath(script))
    except ValueError:  # another drive (Windows): keep the full path
        pass
    args = [arg for arg in argv if arg != "--overwrite"]
    if "--resume" not in args:
        args.append("--resume")
    if not launched_by_torchrun():
        return shlex.join(["python", str(script), *args])
    if os.environ["WORLD_SIZE"] != os.environ["LOCAL_WORLD_SIZE"]:  # several machines
        return "torchrun [this run's torchrun options] " + shlex.join([str(script), *args])
    return shlex.join(["torchrun", f"--nproc_per_node={os.environ['LOCAL_WORLD_SIZE']}", str(script), *args])
