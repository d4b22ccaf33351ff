"""Numeric precision: what `train.dtype: auto` picks, autocast with its GradScaler, and the precision
runs are compared in.

`auto` takes the fastest precision the hardware runs natively: bf16 on a GPU that has it (else fp16
with a GradScaler), bf16 on a CPU with native bf16 instructions, float32 elsewhere (emulated bf16
is far slower than float32). `GPT_CPU_BF16=1` or `0` overrides the CPU's detection, so the tests
can run both choices on any machine. The whole-val figure is computed in float32 on every CPU
(`comparable_dtype`): bf16 rounding moves a loss by more than many real improvements.
"""

import os

import torch

from gpt.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_BF16_VARIABLE = "GPT_CPU_BF16"


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN has native bf16 kernels on this CPU (AVX512-BF16 or AMX): the hardware alone."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_bf16() -> bool:
    """Whether `auto` trains in bf16 on this CPU: where it has native bf16, unless GPT_CPU_BF16 says."""
    forced = os.environ.get(CPU_BF16_VARIABLE, "")
    if forced == "":
        return cpu_has_native_bf16()
    if forced not in ("0", "1"):
        raise UserError(f"{CPU_BF16_VARIABLE} must be 1 (train in bf16 on a CPU), 0 (float32) or unset "
                        f"(bf16 where the CPU has native bf16), got {forced!r}")
    return forced == "1"


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively on `device` (on a CPU: as `cpu_bf16` decides)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and cpu_bf16()


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype for `train.dtype` (auto, float32, bfloat16 or float16) on `device`."""
    if name != "auto":
        dtype = DTYPES[name]
        if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError("train.dtype is bfloat16 but this GPU does not support it; use float16 or auto")
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_bf16():
        return torch.bfloat16
    return torch.float32


def comparable_dtype(training_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The precision of the figure to compare runs by: float32 on any CPU, the training's elsewhere."""
    return torch.float32 if device.type == "cpu" else training_dtype


def scoring_dtype(choice: str, run_dtype: str, device: torch.device) -> torch.dtype:
    """What to score a run in: `comparable` (its `comparable_dtype`) or a named dtype."""
    if choice == "comparable":
        return comparable_dtype(pick_dtype(run_dtype, device), device)
    return pick_dtype(choice, device)


def dtype_name(dtype: torch.dtype) -> str:
    """'float32', 'bfloat16' or 'float16': how the config and the printed figures name it."""
    return str(dtype).removeprefix("torch.")


def precision_line(setting: str, device: torch.device) -> str:
    """What `train.dtype` `setting` computes in on `device`, and why: e.g. `bfloat16 autocast (train.dtype
    auto: the CPU has native bf16)`."""
    dtype = pick_dtype(setting, device)
    what = "float32" if dtype == torch.float32 else f"{dtype_name(dtype)} autocast"
    if setting != "auto":
        return f"{what} (train.dtype {setting})"
    if device.type == "cpu":
        why = "the CPU has native bf16" if dtype == torch.bfloat16 else "bf16 would be emulated on this CPU"
        if os.environ.get(CPU_BF16_VARIABLE):
            why = f"{CPU_BF16_VARIABLE}={os.environ[CPU_BF16_VARIABLE]}"
        return f"{what} (train.dtype auto: {why})"
    return f"{what} (train.dtype auto on {device.type})"


class Precision:
    """Autocast to `dtype` for forward passes, and a GradScaler that is active only for fp16.

    fp16 has a narrow range, so small gradients would underflow to zero: the scaler multiplies
    the loss before backward and divides the gradients after (`unscale`, before clipping, so the
    clip threshold applies to the true gradient), skipping steps whose gradients overflowed.
    Weights and optimizer state stay fp32 throughout.
    """

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype, self.device = dtype, device
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def autocast(self) -> torch.autocast:
        """Forward passes inside run in `dtype` (nothing changes for float32)."""
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def backward(self, loss: torch.Tensor) -> None:
        """`loss.backward()`, the loss scaled first for fp16."""
        self.scaler.scale(loss).backward()
