"""Which device a run uses, and the process-wide settings that make it fast there.

`pick_device` turns `train.device` (or `--device`) into a torch device, `auto` picking CUDA, then
Apple's GPU, then the CPU. `setup_device` turns on TF32 matmuls on CUDA and, on a Linux CPU, keeps
freed memory in the process: both are settings of the process, made once when a script starts.
`indexed` names the GPU that a plain `cuda` means, for the torch calls that need its number.
"""

import ctypes

import torch

from gpt.errors import UserError


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


def indexed(device: torch.device) -> torch.device:
    """`device` with its index: `cuda` -> `cuda:N`, N the current GPU; any other device as it is.

    `pick_device("auto")` gives a plain `cuda`, which most of torch reads as the current GPU; a
    process group's `device_id` and DDP's `device_ids` are refused or guessed without the number.
    """
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def setup_device(device: torch.device) -> None:
    """Process-wide speed settings for `device`: TF32 matmuls on CUDA, malloc tuning on CPU."""
    if device.type == "cuda":
        # TF32 keeps fp32's range with a 10-bit mantissa in matmuls: Ampere and later run
        # them on tensor cores, several times faster, and training is unaffected.
        allow_tf32_matmuls()
    elif device.type == "cpu":
        keep_freed_memory()


def allow_tf32_matmuls(enabled: bool = True) -> None:
    """float32 matmuls on CUDA in TF32 (or, `enabled` False, in full float32).

    Through `torch.set_float32_matmul_precision`, which sets the new per-backend API
    (`fp32_precision`, torch 2.9 and later) and the state it replaces together and warns on no
    version. Setting `fp32_precision` alone leaves the old state unreadable: inductor's
    max-autotune (and on torch 2.9 and 2.10 every compile) asks for it, and the compile fails.
    """
    torch.set_float32_matmul_precision("high" if enabled else "highest")


def keep_freed_memory() -> bool:
    """On glibc (Linux), keep freed memory in the process instead of handing it back to the OS.

    PyTorch's CPU allocator mallocs and frees every activation on every step. glibc serves
    blocks over 32 MiB (the logits of a batch over a 50,257-token vocabulary are ~200 MiB) with
    a fresh mmap, which the kernel zero-fills page by page on first touch and unmaps on free, on
    every step. Served from the heap, and never trimmed, they are reused. Returns False where this
    does not apply.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))
