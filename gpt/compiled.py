"""torch.compile with a way back: `CompiledOrEager` runs the plain module or function if compiling fails.

Training compiles its model (`gpt.training.compile_model`) and sampling its one-token step
(`gpt.sampling.compiled_decode_step`); both go through this one fallback.
"""

import warnings
from collections.abc import Callable

import torch
from torch import nn

from gpt.errors import first_line


class CompiledOrEager(nn.Module):
    """`torch.compile(eager, **options)`, which falls back to `eager` itself if the first call fails.

    torch.compile compiles lazily, at the first call, so that is where a missing compiler or an
    unsupported platform shows: the call is then run uncompiled, after one warning naming
    `setting` (the option that turns compiling off), and so is every later one. A failure at a
    later call is a real error, and so is running out of memory. `eager` is a module (training's
    model) or a function (sampling's one-token step).
    """

    def __init__(self, eager: Callable, setting: str = "train.compile", **options):
        super().__init__()
        self.eager = eager
        self.compiled = torch.compile(eager, **options)
        self.setting = setting
        self.called = False

    def forward(self, *args, **kwargs) -> torch.Tensor:
        """The compiled module's output; at the first call, the plain module's if compiling fails."""
        if self.called:
            return self.compiled(*args, **kwargs)
        self.called = True
        try:
            return self.compiled(*args, **kwargs)
        except torch.OutOfMemoryError:  # not a failure to compile: too large for the device
            raise
        except Exception as e:
            warn_compile_failed(e, self.setting)
            self.compiled = self.eager
            return self.eager(*args, **kwargs)


def warn_compile_failed(error: Exception, setting: str = "train.compile") -> None:
    """One warning that torch.compile failed and the work goes on without it (`setting`: false skips it)."""
    warnings.warn(f"torch.compile failed ({first_line(error)}); continuing uncompiled "
                  f"(set {setting}: false to skip it)", stacklevel=2)
