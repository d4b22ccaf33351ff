"""What `train.dtype: auto` picks on a CPU, and how GPT_CPU_BF16 forces either choice.

These run on any machine: each test sets GPT_CPU_BF16 itself. The training paths under each
choice are tested in tests/test_cpu_bf16.py (bf16) and by the rest of the suite (whatever `auto`
picks here); `.ci/run` runs the tests marked `precision` again under the other choice.
"""

import pytest
import torch

from gpt import precision
from gpt.errors import UserError
from gpt.optim import Muon, build_optimizer
from gpt.precision import (
    CPU_BF16_VARIABLE, bf16_is_fast, comparable_dtype, cpu_bf16, cpu_has_native_bf16, dtype_name, pick_dtype,
)
from gpt.config import TrainConfig

CPU = torch.device("cpu")


@pytest.mark.parametrize("forced, dtype", [("1", torch.bfloat16), ("0", torch.float32)])
def test_gpt_cpu_bf16_forces_what_auto_picks_on_a_cpu(monkeypatch, forced, dtype):
    monkeypatch.setenv(CPU_BF16_VARIABLE, forced)
    assert pick_dtype("auto", CPU) == dtype
    assert bf16_is_fast(CPU) == (forced == "1")
    assert pick_dtype("float32", CPU) == torch.float32  # a named dtype is taken as it is
    assert pick_dtype("bfloat16", CPU) == torch.bfloat16
    assert pick_dtype("auto", torch.device("mps")) == torch.float32  # the CPU's setting only


def test_unset_auto_follows_the_hardware(monkeypatch):
    monkeypatch.delenv(CPU_BF16_VARIABLE, raising=False)
    assert cpu_bf16() == cpu_has_native_bf16()
    assert pick_dtype("auto", CPU) == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert pick_dtype("auto", CPU) == torch.bfloat16
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert pick_dtype("auto", CPU) == torch.float32


def test_a_bad_gpt_cpu_bf16_is_one_clear_error(monkeypatch):
    monkeypatch.setenv(CPU_BF16_VARIABLE, "yes")
    with pytest.raises(UserError, match=r"^GPT_CPU_BF16 must be 1 \(train in bf16 on a CPU\), 0 \(float32\) or "
                                        r"unset \(bf16 where the CPU has native bf16\), got 'yes'$"):
        pick_dtype("auto", CPU)


@pytest.mark.parametrize("forced, dtype, bf16_iteration", [
    ("1", "auto", True),  # auto is bf16: Newton-Schulz in bf16, as torch's Muon runs it
    ("1", "bfloat16", True),
    ("1", "float32", False),  # a float32 run is float32 throughout, Muon's iteration included
    ("0", "auto", False),  # auto is float32
    ("0", "bfloat16", False),  # bf16 asked for, but emulated here: the iteration stays float32
])
def test_muon_s_iteration_follows_the_training_precision(monkeypatch, tiny_model, forced, dtype, bf16_iteration):
    monkeypatch.setenv(CPU_BF16_VARIABLE, forced)
    muon = build_optimizer(tiny_model, TrainConfig(optimizer="muon", dtype=dtype), CPU).muon
    assert isinstance(muon, Muon) and muon.ns_dtype == (torch.bfloat16 if bf16_iteration else torch.float32)


def test_the_comparable_figure_is_float32_on_any_cpu_and_the_training_s_on_a_gpu():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert comparable_dtype(dtype, CPU) == torch.float32
        assert comparable_dtype(dtype, torch.device("cuda")) == dtype
    assert [dtype_name(d) for d in (torch.float32, torch.bfloat16)] == ["float32", "bfloat16"]
