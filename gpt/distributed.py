"""Data-parallel training across GPUs and machines: torchrun + DistributedDataParallel.

`torchrun --nproc_per_node=N train.py --config X` starts N copies of train.py and gives each
its place in the environment (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR,
MASTER_PORT). `start` reads them, joins the process group (NCCL between GPUs, gloo between CPU
processes) and picks this process's device (`cuda:LOCAL_RANK`). A plain `python train.py` has
none of these variables: it gets `SINGLE`, whose methods all do nothing, and no process group.

How the work is split, so that N processes train exactly as one process would:

- Every process holds the whole model; `wrap` puts it in PyTorch's DistributedDataParallel,
  which averages the gradients across processes during backward.
- The global batch is `data.batch_size x train.grad_accum_steps` windows, whatever N is: each
  process runs `grad_accum_steps / N` micro-batches per step (`local_accum_steps`), and DDP's
  `no_sync` skips the gradient exchange on all but the last of them.
- The micro-batches come from the one shuffled stream a single process would read: micro-batch
  i of the stream goes to process i mod N (`TrainBatches(rank=, world_size=)`), so a step sees
  the same windows for any N and a checkpoint's data position means the same thing for any N.
- Evaluation batches are dealt out the same way and the loss sums are added up across processes
  (`sum`), so every process gets the mean over all of them.
- Only rank 0 prints, shows progress bars, writes metrics and writes checkpoints; a stop asked
  of any process (Ctrl-C, SIGTERM) is agreed on by all (`any`) so they stop at the same step.
"""

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gpt.errors import UserError

T = TypeVar("T")
# Rank 0 may prepare a large corpus while the others wait for it: give collectives that long.
TIMEOUT = timedelta(hours=1)
ENV_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
SYNC_BUFFERS_OPTION = ("forward_sync_buffers"
                       if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                       else "broadcast_buffers")


@dataclass(frozen=True)
class Distributed:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    local_rank: int = 0  # rank among the processes on this machine: picks the GPU
    world_size: int = 1
    local_world_size: int = 1
    launched: bool = False  # started by torchrun, with a process group

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that prints, logs and saves."""
        return self.rank == 0

    def local_accum_steps(self, grad_accum_steps: int) -> int:
        """Micro-batches per step for this process: the global count split evenly (checked by `check_batch`)."""
        return grad_accum_steps // self.world_size

    def check_batch(self, grad_accum_steps: int) -> None:
        """A clear error when the global batch cannot be split evenly over the processes."""
        if grad_accum_steps % self.world_size:
            multiple = self.world_size * max(1, round(grad_accum_steps / self.world_size))
            raise UserError(
                f"train.grad_accum_steps is {grad_accum_steps}, which {self.world_size} processes cannot "
                f"share evenly (the global batch is data.batch_size x grad_accum_steps, kept the same for "
                f"any number of processes); set --train.grad_accum_steps={multiple} (with a smaller "
                "data.batch_size to keep the global batch) or start a number of processes that divides it")

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
            model, device_ids=[device.index] if device.type == "cuda" else None,
            gradient_as_bucket_view=True,  # gradients live in DDP's buffers: one copy less per step
            **no_buffer_sync,
        )

    def close(self) -> None:
        if self.launched and dist.is_initialized():
            dist.destroy_process_group()


SINGLE = Distributed()


def launched_by_torchrun() -> bool:
    return all(key in os.environ for key in ENV_KEYS)


def environment_rank() -> int:
    """This process's rank from the environment (0 when not started by torchrun); needs no process group."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def start(device: torch.device) -> tuple[Distributed, torch.device]:
    """Join the process group when started by torchrun -> (this process's place, its device).

    `device` is the one `train.device` picked; under torchrun a CUDA device becomes
    `cuda:LOCAL_RANK`. Without torchrun: (`SINGLE`, `device`), and nothing is set up.
    """
    if not launched_by_torchrun():
        return SINGLE, device
    try:
        place = Distributed(*(int(os.environ[key]) for key in ENV_KEYS), launched=True)
    except ValueError:
        raise UserError(f"the torchrun variables {', '.join(ENV_KEYS)} must be whole numbers; "
                        "start train.py with torchrun, or with python for one process") from None
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
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                            device_id=device if backend == "nccl" else None)
    return Distributed(launched=True)
