"""The device and its process-wide settings (gpt/device.py), and the compile fallback (gpt/compiled.py),
checked on the CPU: the settings a GPU run makes can be made and read here too."""

import warnings

import pytest
import torch

from gpt.compiled import GUARDED_CALLS_WITH_CUDA_GRAPHS, CompiledOrEager
from gpt.device import allow_tf32_matmuls, indexed, setup_device

CUDA = torch.device("cuda")


@pytest.fixture
def full_fp32_after():
    """TF32 settings changed inside are set back to torch's default (full float32) after."""
    yield
    allow_tf32_matmuls(False)


def test_a_cuda_device_gets_the_index_of_the_current_gpu(monkeypatch):
    """What a process group's device_id needs: `cuda` named as `cuda:N`, N the current GPU."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)  # this machine has no GPU to ask
    assert indexed(CUDA) == torch.device("cuda", 3)
    assert indexed(torch.device("cuda", 1)) == torch.device("cuda", 1)  # an index given is kept
    assert indexed(torch.device("cpu")) == torch.device("cpu")


def test_setting_up_cuda_turns_tf32_on_through_both_apis_without_a_warning(full_fp32_after):
    """Made on the CPU: the flags are the process's. The old API's state stays readable (inductor reads it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a deprecation warning, or any other, fails the test
        setup_device(CUDA)
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert torch.get_float32_matmul_precision() == "high"
        allow_tf32_matmuls(False)
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert torch.get_float32_matmul_precision() == "highest"


@pytest.mark.slow  # inductor's max-autotune on the CPU: ~10 s
def test_a_max_autotune_compile_after_setting_up_cuda_compiles(full_fp32_after):
    """Inductor's max-autotune asks for the old API's precision: after only the new API was set, it raised."""
    setup_device(CUDA)
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 16)
    x = torch.randn(4, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = CompiledOrEager(layer, mode="max-autotune")
        out = compiled(x)
    assert not [w for w in caught if "torch.compile failed" in str(w.message)], [str(w.message) for w in caught]
    assert compiled.compiled is not layer  # still the compiled module, not the fallback
    assert torch.allclose(out, layer(x), atol=1e-6)


class FailsAtCall:
    """A compiled function's stand-in that fails at call `n` (as a CUDA graph that cannot be recorded)."""

    def __init__(self, eager, n: int):
        self.eager, self.n, self.calls = eager, n, 0

    def __call__(self, *args):
        self.calls += 1
        if self.calls == self.n:
            raise RuntimeError("operation not permitted when stream is capturing")
        return self.eager(*args)


def test_a_cuda_graph_that_fails_to_record_at_the_second_call_falls_back_to_eager():
    calls = []

    def step(x):
        calls.append(x)
        return x * 2

    compiled = CompiledOrEager(step, "sample.compile", mode="reduce-overhead")
    compiled.compiled = FailsAtCall(step, n=2)
    assert compiled(torch.tensor(1.0)) == 2  # warm-up: compiled, no warning
    with pytest.warns(UserWarning, match="torch.compile failed .operation not permitted.*sample.compile: false"):
        assert compiled(torch.tensor(2.0)) == 4  # the recording fails: the same call, uncompiled
    assert compiled.compiled is step
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compiled(torch.tensor(3.0)) == 6  # and every later call, with no more warnings


def test_failures_after_the_guarded_calls_are_errors():
    """Past the compile (1 call; with CUDA graphs, the warm-up, recording and first replay) a failure is real."""
    for mode, guarded in ((None, 1), ("reduce-overhead", GUARDED_CALLS_WITH_CUDA_GRAPHS)):
        compiled = CompiledOrEager(torch.neg, **({"mode": mode} if mode else {}))
        compiled.compiled = FailsAtCall(torch.neg, n=guarded + 1)
        for _ in range(guarded):
            compiled(torch.ones(1))
        with pytest.raises(RuntimeError, match="stream is capturing"):
            compiled(torch.ones(1))


def test_running_out_of_memory_at_a_guarded_call_is_not_a_compile_failure():
    def out_of_memory(x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    compiled = CompiledOrEager(torch.neg, mode="reduce-overhead")
    compiled.compiled = out_of_memory
    with pytest.raises(torch.OutOfMemoryError):
        compiled(torch.ones(1))
