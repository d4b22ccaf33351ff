"""The bf16 path on a CPU: what `train.dtype: auto` runs where the CPU has native bf16.

Skipped where `auto` picks float32 (a CPU without native bf16, or GPT_CPU_BF16=0), as
tests/test_cuda.py is without a GPU. `GPT_CPU_BF16=1 python -m pytest -m precision` runs them on
any CPU (bf16 is emulated there: the models are tiny), and `.ci/run` does.

Runs that add the same numbers in another order are not equal in bf16: autocast rounds each
matmul's output to 8 bits of mantissa, and Muon's Newton-Schulz iteration, in bf16 too, scales a
matrix's small singular directions up to 1, rounding included. So where the float32 tests assert
1e-5, these measure the noise floor in the same test (the same run with only its reduction order
changed) and bound the difference by a few times that. The floors measured on a CPU with native
bf16, and the differences real bugs make, are in docs/precision.md (scripts/noise_floor.py).
"""

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SavesOnly
from test_distributed import STEPS, largest_difference, losses, train_run

from gpt.config import TrainConfig
from gpt.data import TokenWindows, TrainBatches, eval_loader
from gpt.model import GPTModel
from gpt.optim import Muon, build_optimizer
from gpt.precision import Precision, cpu_bf16, pick_dtype
from gpt.tools import evaluate
from gpt.training import TrainData, train, train_step, new_run

pytestmark = [pytest.mark.precision,
              pytest.mark.skipif(not cpu_bf16(), reason="train.dtype auto is float32 on this CPU (no native "
                                                        "bf16); GPT_CPU_BF16=1 runs these anyway")]
ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
FLOORS = 3  # a difference within 3 noise floors is rounding; the bugs in docs/precision.md make 10 or more


def test_auto_trains_in_bf16_and_the_loss_falls(tiny_cfg):
    assert pick_dtype("auto", CPU) == torch.bfloat16
    tokens = (np.arange(3000) * 7 % 101).astype(np.uint16)
    ds = TokenWindows(tokens, 12, 12)
    torch.manual_seed(0)
    model = GPTModel(tiny_cfg)
    output_dtypes = set()
    model.trf_blocks[0].ff.fc.register_forward_hook(lambda module, args, out: output_dtypes.add(out.dtype))
    saves = []
    cfg = TrainConfig(max_iters=20, eval_interval=10, eval_iters=2, warmup_iters=3, learning_rate=3e-3, min_lr=3e-4)
    loaders = {"train": eval_loader(ds, 4, 2), "val": eval_loader(ds, 4, 2)}
    train(new_run(model, cfg, CPU), cfg, TrainData(TrainBatches(ds, 4, seed=1), loaders),
          SavesOnly(lambda s: saves.append(s.val_loss)))
    assert output_dtypes == {torch.bfloat16}  # the matmuls ran in bf16
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the weights stay float32
    assert saves[-1] < saves[0] < math.log(101)


def test_muon_runs_its_bf16_iteration(tiny_model):
    """auto builds Muon with its Newton-Schulz in bf16, as torch's runs it: the same step as our Muon
    told to iterate in bf16, bit for bit, and not the float32 iteration's."""
    cfg = TrainConfig(optimizer="muon")
    models = [copy.deepcopy(tiny_model) for _ in range(3)]
    built = build_optimizer(models[0], cfg, CPU).muon
    assert isinstance(built, Muon) and built.ns_dtype == torch.bfloat16
    options = {"lr": cfg.muon_lr, "momentum": cfg.muon_momentum, "weight_decay": cfg.muon_weight_decay}
    ours_bf16, ours_fp32 = (Muon([p for n, p in m.named_parameters() if n.startswith("trf_blocks.") and p.dim() == 2],
                                 ns_dtype=dtype, **options)
                            for m, dtype in ((models[1], torch.bfloat16), (models[2], torch.float32)))
    torch.manual_seed(1)
    grads = {n: torch.randn_like(p) for n, p in tiny_model.named_parameters()}
    for model, opt in zip(models, (built, ours_bf16, ours_fp32)):
        for _ in range(2):
            for n, p in model.named_parameters():
                p.grad = grads[n].clone()
            opt.step()
    name = "trf_blocks.0.att.W_query.weight"
    weights = [dict(m.named_parameters())[name] for m in models]
    assert torch.equal(weights[0], weights[1])
    assert not torch.equal(weights[0], weights[2])
    assert (weights[0] - weights[2]).abs().max() < 0.1 * (weights[2] - dict(tiny_model.named_parameters())[name]).abs().max()


def accumulated(model, cfg_overrides: dict, x, y, micro_batches: int):
    """`model` after 3 Muon steps of the 8 windows in x, y taken in `micro_batches` micro-batches."""
    cfg = TrainConfig(optimizer="muon", grad_accum_steps=micro_batches, grad_clip=0.05, **cfg_overrides)
    model = copy.deepcopy(model)
    opt = build_optimizer(model, cfg, CPU)
    size = len(x) // micro_batches
    for _ in range(3):
        batches = [(x[i * size:(i + 1) * size], y[i * size:(i + 1) * size]) for i in range(micro_batches)]
        train_step(model, iter(batches), opt, Precision(torch.bfloat16, CPU), cfg)
    return model


def largest_weight_difference(a, b) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def test_muon_step_accumulates_and_clips_like_one_big_batch_within_bf16_s_noise(tiny_model, tiny_cfg):
    """tests/test_optim.py's float32 test, in bf16: 2 micro-batches of 4 against one batch of 8, bounded
    by the same comparison with 4 micro-batches of 2 (the order of the additions changed again)."""
    torch.manual_seed(1)
    x, y = torch.randint(0, tiny_cfg.vocab_size, (2, 8, 12)).to(torch.uint16)
    whole = accumulated(tiny_model, {}, x, y, 1)
    floor = largest_weight_difference(accumulated(tiny_model, {}, x, y, 4), whole)
    difference = largest_weight_difference(accumulated(tiny_model, {}, x, y, 2), whole)
    assert 0 < floor < 0.01  # bf16 rounding, and no more (1.5e-3 to 2.3e-3 measured)
    assert difference < FLOORS * floor
    # A real bug is far outside: a micro-batch taken twice, the other lost, moves the weights ~10x more.
    lost = torch.cat([x[:4], x[:4]]), torch.cat([y[:4], y[:4]])
    assert largest_weight_difference(accumulated(tiny_model, {}, *lost, 2), whole) > 3 * FLOORS * floor


@pytest.fixture(scope="module")
def bf16_args(tmp_path_factory) -> list[str]:
    """tests/test_distributed.py's tiny run, with `auto` (bf16 here) instead of float32."""
    folder = tmp_path_factory.mktemp("corpus")
    corpus = folder / "lines.txt"
    corpus.write_text("\n".join(f"Line {i}: the quick brown fox, number {i * 7 % 13}, jumps over the dog."
                                for i in range(60)), encoding="utf-8")
    return ["--config", "tiny.yaml", f"--data.corpus={corpus}", f"--data.prepared_dir={folder / 'prepared'}",
            "--model.context_length=16", "--model.drop_rate=0", "--train.eval_interval=1", "--train.warmup_iters=0",
            "--train.learning_rate=1e-3", "--train.min_lr=1e-3", "--sample.max_new_tokens=1", "--train.dtype=auto",
            f"--train.max_iters={STEPS}"]


def layout(processes: int, batch: int, accum: int) -> list[str]:
    """8 windows a step, 4 evaluated."""
    return [f"--data.batch_size={batch}", f"--train.grad_accum_steps={accum}", f"--train.eval_iters={4 // batch}"]


@pytest.mark.slow
def test_two_processes_train_like_one_within_bf16_s_noise(bf16_args, tmp_path):
    """2 processes against 1 (4 micro-batches of 2 windows a step), bounded by 1 process taking the
    same windows in 2 micro-batches of 4: the same run with only its reduction order changed."""
    runs = {}
    for name, processes, batch, accum in (("one", 1, 2, 4), ("floor", 1, 4, 2), ("two", 2, 2, 4)):
        runs[name] = tmp_path / name
        printed = train_run(processes, [*bf16_args, *layout(processes, batch, accum), f"--train.out_dir={runs[name]}"],
                            tmp_path)
        assert "precision: bfloat16 autocast (train.dtype auto" in printed
    one, floor, two = (losses(runs[name]) for name in ("one", "floor", "two"))
    assert one[-1, 0] < one[0, 0] - 0.1  # it did learn
    weight_floor = largest_difference(runs["floor"], runs["one"], same_batches=False)
    assert 0 < weight_floor < 0.01
    assert largest_difference(runs["two"], runs["one"]) < FLOORS * weight_floor
    loss_floor = np.abs(floor - one).max()
    assert np.abs(two - one).max() < FLOORS * max(loss_floor, 1e-3)  # the losses are printed rounded to bf16's


@pytest.mark.slow
def test_a_checkpoint_resumes_exactly_and_the_whole_val_figure_is_float32(bf16_args, tmp_path, capsys):
    """Stopped at step 3 and resumed, a bf16 run ends with the very weights of one that never stopped;
    its final whole-val figure is computed in float32, and gpt.tools.evaluate gives the same figure, or
    bf16's when asked."""
    args = [*bf16_args, *layout(1, 2, 4), "--train.whole_val_at_end=true"]
    unbroken, broken = tmp_path / "unbroken", tmp_path / "broken"
    printed = train_run(1, [*args, f"--train.out_dir={unbroken}"], tmp_path)
    train_run(1, [*args, f"--train.out_dir={broken}", f"--train.max_iters={STEPS // 2}"], tmp_path)
    train_run(1, [*args, f"--train.out_dir={broken}", "--resume"], tmp_path)
    assert largest_difference(unbroken, broken) == 0.0

    final = [line for line in printed.splitlines() if line.startswith("val loss over all")]
    assert len(final) == 1 and final[0].endswith("bytes of text, in float32)"), printed
    figures = {}
    for dtype in ("comparable", "bfloat16"):
        assert evaluate.main(["--checkpoint", str(unbroken), "--json", f"--dtype={dtype}"]) == 0
        figures[dtype] = json.loads(capsys.readouterr().out)
    assert figures["comparable"]["dtype"] == "float32" and figures["bfloat16"]["dtype"] == "bfloat16"
    assert f"{figures['comparable']['loss']:.4f}" in final[0]  # one code path, one figure
    assert figures["bfloat16"]["loss"] == pytest.approx(figures["comparable"]["loss"], abs=0.02)
    assert figures["bfloat16"]["loss"] != figures["comparable"]["loss"]  # bf16 really ran
    sample = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--checkpoint", str(broken),
                             "--max-new-tokens", "3", "Line 3"], capture_output=True, text=True, timeout=120)
    assert sample.returncode == 0 and sample.stdout.startswith("Line 3"), sample.stderr
