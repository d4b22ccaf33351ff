"""torch.compile with a way back: `CompiledOrEager` runs the plain module or function if compiling fails.

Training compiles its model (`compile_model`) and sampling its one-token step
(`gpt.sampling.compiled_decode_step`); both go through this one fallback.
"""

import warnings
from collections.abc import Callable

import torch
from torch import nn

from gpt.errors import first_line

# Calls of a "reduce-overhead" compile that may still fail to compile or to record: cudagraph trees
# run the compiled code once to warm up, record the graph at the next call, then replay it.
GUARDED_CALLS_WITH_CUDA_GRAPHS = 3
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile's modes that record CUDA graphs


class CompiledOrEager(nn.Module):
    """`torch.compile(eager, **options)`, which falls back to `eager` itself if its first calls fail.

    torch.compile compiles lazily, at the first call, so that is where a missing compiler or an
    unsupported platform shows; in a mode with CUDA graphs (`reduce-overhead`) the graph is recorded
    at a later call (torch warms the compiled code up first), and a graph that cannot be recorded
    fails there. Those first calls are guarded: a failure is followed by one warning naming
    `setting` (the option that turns compiling off), and that call and every later one run
    uncompiled. A failure after them is a real error, and so is running out of memory. `eager` is a
    module (training's model) or a function (sampling's one-token step).
    """

    def __init__(self, eager: Callable, setting: str = "train.compile", **options):
        super().__init__()
        self.eager = eager
        self.compiled = torch.compile(eager, **options)
        self.setting = setting
        # the compile, and with CUDA graphs the warm-up, the recording and the first replay
        graphs = options.get("mode") in CUDA_GRAPH_MODES
        self.guarded_calls = GUARDED_CALLS_WITH_CUDA_GRAPHS if graphs else 1

    def forward(self, *args, **kwargs) -> torch.Tensor:
        """The compiled module's output; during the guarded calls, the plain module's if the compiled one fails."""
        if self.guarded_calls == 0:
            return self.compiled(*args, **kwargs)
        self.guarded_calls -= 1
        try:
            return self.compiled(*args, **kwargs)
        except torch.OutOfMemoryError:  # not a failure to compile: too large for the device
            raise
        except Exception as e:
            warn_compile_failed(e, self.setting)
            self.compiled, self.guarded_calls = self.eager, 0
            return self.eager(*args, **kwargs)


def warn_compile_failed(error: Exception, setting: str = "train.compile") -> None:
    """One warning that torch.compile failed and the work goes on without it (`setting`: false skips it)."""
    warnings.warn(f"torch.compile failed ({first_line(error)}); continuing uncompiled "
                  f"(set {setting}: false to skip it)", stacklevel=2)


def compile_model(model: nn.Module | Callable, setting: bool | str, device: torch.device,
                  **options) -> nn.Module | Callable:
    """`torch.compile(model, **options)` (a module or a function) if `setting` asks for it (auto: on CUDA),
    else `model` itself.

    Compiled, it is a `CompiledOrEager`: if compiling fails, it warns once and runs `model` as it is."""
    if setting is False or (setting == "auto" and device.type != "cuda"):
        return model
    try:
        return CompiledOrEager(model, **options)
    except Exception as e:  # e.g. an unsupported platform or Python version
        warn_compile_failed(e)
        return model
