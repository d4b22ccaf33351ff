"""Optimizers and schedule (gpt/optim.py): Muon against torch's own, the parameter split, the
schedule driving both optimizers, and Muon through every part of a training step."""

import copy
import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import MuonOneByOne, SavesOnly
from gpt import optim
from gpt.config import TrainConfig
from gpt.data import TokenWindows, TrainBatches, eval_loader
from gpt.model import GPTModel
from gpt.optim import (Muon, MuonWithAdamW, build_optimizer, learning_rate, orthogonalise, set_learning_rate,
                       steps_unless)
from gpt.precision import Precision
from gpt.training import TrainData, train, train_step, new_run

CPU = torch.device("cpu")
SHAPES = [(64, 32), (32, 64), (48, 48)]  # tall, wide, square: the iteration transposes the tall one


def matrices(seed: int = 0) -> list[torch.nn.Parameter]:
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape)) for shape in SHAPES]


def step_with_gradients(optimizer, params: list[torch.nn.Parameter], steps: int, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)
        optimizer.step()


@pytest.mark.parametrize("options", [
    {},
    {"lr": 0.05, "weight_decay": 0.1, "momentum": 0.9},
    {"nesterov": False, "adjust_lr_fn": "original"},
])
def test_muon_in_bfloat16_is_torch_muon_bit_for_bit(options):
    """Our update, run in torch's dtype one matrix at a time, is torch's update: the same algorithm, step for step."""
    ours, theirs = matrices(), matrices()
    step_with_gradients(MuonOneByOne(ours, ns_dtype=torch.bfloat16, **options), ours, steps=4)
    step_with_gradients(torch.optim.Muon(theirs, **options), theirs, steps=4)
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)
    assert not torch.equal(ours[0], matrices()[0])  # they did move


def test_muon_refuses_a_learning_rate_rule_it_does_not_apply():
    """torch's Muon takes adjust_lr_fn "match_rms_adamw"; ours scales by the original rule only, so it says so."""
    with pytest.raises(ValueError, match="adjust_lr_fn 'match_rms_adamw' is not supported"):
        Muon(matrices(), adjust_lr_fn="match_rms_adamw")


def test_muon_in_float32_is_torch_muon_without_the_bfloat16_rounding():
    """float32 lands within bf16's rounding of torch's result, and much nearer the exact one."""
    ours, theirs, exact = matrices(), matrices(), [p.double() for p in matrices()]
    exact = [torch.nn.Parameter(p.detach()) for p in exact]
    step_with_gradients(Muon(ours, ns_dtype=torch.float32), ours, steps=3)
    step_with_gradients(torch.optim.Muon(theirs), theirs, steps=3)
    step_with_gradients(Muon(exact, ns_dtype=torch.float64), exact, steps=3)
    start = matrices()
    for p, q, e, s in zip(ours, theirs, exact, start):
        moved = (e - s).abs().max().item()
        ours_error = (p.double() - e).abs().max().item()
        theirs_error = (q.double() - e).abs().max().item()
        assert theirs_error < 0.05 * moved  # bf16: within a few percent of the step
        assert ours_error < 1e-3 * moved  # float32: far closer
        assert ours_error < theirs_error / 10


def test_batched_muon_is_the_per_matrix_update():
    """Same-shaped matrices (tall ones as their transposes) in one batched iteration, as GPT-2's 72 go
    in two batches. Compared in float32 (pinned: this CPU's native bf16 would round either way):
    the batched matmuls sum the same products in another order, so the weights agree to float32's
    rounding (~1e-7 here), a thousandth of what each step moves them (~1e-2), not always bit for bit."""
    shapes = [(48, 48)] * 4 + [(192, 48)] * 3 + [(48, 192)] * 3  # like q/k/v/out, fc and proj
    torch.manual_seed(0)
    start = [torch.randn(shape) for shape in shapes]
    batched = [torch.nn.Parameter(p.clone()) for p in start]
    one_by_one = [torch.nn.Parameter(p.clone()) for p in start]
    optimizer = Muon(batched, ns_dtype=torch.float32, weight_decay=0.1)
    assert sorted(len(g) for g in optimizer._same_shapes(batched)) == [4, 6]  # two batches
    step_with_gradients(optimizer, batched, steps=3)
    step_with_gradients(MuonOneByOne(one_by_one, ns_dtype=torch.float32, weight_decay=0.1), one_by_one, steps=3)
    for p, q, s in zip(batched, one_by_one, start):
        assert (p - s).abs().max() > 1e-3  # they moved
        assert torch.allclose(p, q, rtol=0, atol=1e-6)


GROUPED = [(48, 48)] * 3 + [(64, 32), (32, 64)] * 2  # two shape groups of several, a tall matrix with its wide twins


def bits(tensors) -> list[torch.Tensor]:
    """float32 tensors as their bit patterns: -0.0 is not 0.0 and NaN is itself."""
    return [t.detach().view(torch.int32).clone() for t in tensors]


def grouped_muon(batched: bool, nesterov: bool) -> tuple[list[torch.nn.Parameter], Muon]:
    """Matrices in shape groups of several, after two real steps (the buffers hold something), one weight -0.0."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in GROUPED]
    optimizer = (Muon if batched else MuonOneByOne)(params, ns_dtype=torch.float32, nesterov=nesterov, weight_decay=0.1,
                                                    lr=0.05)
    step_with_gradients(optimizer, params, steps=2)
    with torch.no_grad():
        params[4][3, 5] = -0.0  # x * 1 + (-0.0) keeps it; a skip that adds +0.0 (x * 0 for a negative x) does not
    return params, optimizer


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("poison", [
    "nan in one matrix of a group", "inf in one matrix of a group", "-inf and nan everywhere"])
def test_a_skipped_muon_step_changes_no_bit_of_a_weight_or_a_buffer(batched, nesterov, poison):
    """The NaN guard's promise, with weight decay on: whatever the gradients hold, a skipped step is no step."""
    params, optimizer = grouped_muon(batched, nesterov)
    weights, buffers = bits(params), bits(optimizer.state[p]["momentum_buffer"] for p in params)
    generator = torch.Generator().manual_seed(2)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)
    if poison == "nan in one matrix of a group":
        params[1].grad[0, 0] = math.nan
    elif poison == "inf in one matrix of a group":
        params[5].grad[7] = math.inf  # a row of a tall one
    else:
        for p in params:
            p.grad[::2] = -math.inf
            p.grad[1::2] = math.nan
    assert steps_unless(optimizer, torch.tensor(True))
    assert all(torch.equal(a, b) for a, b in zip(bits(params), weights))
    assert all(torch.equal(a, b) for a, b in zip(bits(optimizer.state[p]["momentum_buffer"] for p in params), buffers))


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("nesterov", [True, False])
def test_a_muon_step_taken_on_the_skip_path_is_the_plain_step_bit_for_bit(batched, nesterov):
    """What train_step runs (steps_unless, nothing to skip) is what step() does, in shape groups of several."""
    (ours, skip_path), (theirs, plain) = grouped_muon(batched, nesterov), grouped_muon(batched, nesterov)
    start = bits(ours)
    generator = torch.Generator().manual_seed(2)
    for p, q in zip(ours, theirs):
        p.grad = torch.randn(p.shape, generator=generator)
        q.grad = p.grad.clone()
    assert steps_unless(skip_path, torch.tensor(False))
    plain.step()
    assert all(torch.equal(a, b) for a, b in zip(bits(ours), bits(theirs)))
    assert all(torch.equal(a, b) for a, b in zip(bits(skip_path.state[p]["momentum_buffer"] for p in ours),
                                                 bits(plain.state[q]["momentum_buffer"] for q in theirs)))
    assert all(not torch.equal(a, b) for a, b in zip(bits(ours), start))  # every matrix moved


class OpCounter(TorchDispatchMode):
    """Counts the aten ops called below autograd (a foreach op once, however long its lists)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def test_the_skip_costs_a_few_ops_per_shape_not_per_matrix():
    """What steps_unless adds to a step does not grow with the matrices of each shape (it was ~5 ops per matrix)."""
    def added_ops(copies: int) -> int:
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(shape)) for shape in SHAPES * copies]
        optimizer = Muon(params, ns_dtype=torch.float32, weight_decay=0.1)
        step_with_gradients(optimizer, params, steps=1)  # the state
        counts = []
        for step in (optimizer.step, lambda: steps_unless(optimizer, torch.tensor(False))):
            with OpCounter() as counter:
                step()
            counts.append(counter.count)
        return counts[1] - counts[0]

    assert 0 < added_ops(2) == added_ops(8)


def test_orthogonalise_brings_every_singular_value_near_one():
    torch.manual_seed(0)
    for shape in SHAPES:
        rank = min(shape)
        u, _ = torch.linalg.qr(torch.randn(shape[0], rank))
        v, _ = torch.linalg.qr(torch.randn(shape[1], rank))
        g = u @ torch.diag(torch.logspace(-1, 1, rank)) @ v.T  # singular values 0.1 to 10
        singular = torch.linalg.svdvals(orthogonalise(g, (3.4445, -4.7750, 2.0315), 5, 1e-7, torch.float32))
        assert singular.min() > 0.5 and singular.max() < 1.3, singular


def test_muon_takes_the_block_matrices_and_adamw_everything_else(tiny_model):
    opt = build_optimizer(tiny_model, TrainConfig(optimizer="muon"), CPU)
    assert isinstance(opt, MuonWithAdamW)
    muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    adamw = {id(p) for g in opt.adamw.param_groups for p in g["params"]}
    names = {id(p): n for n, p in tiny_model.named_parameters()}
    assert not muon & adamw
    assert muon | adamw == set(names)  # every parameter, the tied head/embedding once
    expected = {n for n, p in tiny_model.named_parameters() if n.startswith("trf_blocks.") and p.dim() == 2}
    assert {names[i] for i in muon} == expected
    assert len(expected) == 6 * tiny_model.cfg.n_layers  # query, key, value, out, fc, proj
    assert {"tok_emb.weight", "pos_emb.weight", "final_norm.weight"} <= {names[i] for i in adamw}
    assert len(opt.param_groups) == len(opt.muon.param_groups) + len(opt.adamw.param_groups)


def test_muon_orthogonalises_in_float32_where_bf16_is_emulated(tiny_model, monkeypatch):
    cfg = TrainConfig(optimizer="muon", muon_lr=0.03, muon_momentum=0.9, muon_weight_decay=0.01, dtype="bfloat16")
    monkeypatch.setattr(optim, "bf16_is_fast", lambda device: False)
    slow_bf16 = build_optimizer(tiny_model, cfg, CPU).muon
    assert isinstance(slow_bf16, Muon) and slow_bf16.ns_dtype == torch.float32
    monkeypatch.setattr(optim, "bf16_is_fast", lambda device: True)
    fast_bf16 = build_optimizer(tiny_model, cfg, CPU).muon
    assert isinstance(fast_bf16, Muon) and fast_bf16.ns_dtype == torch.bfloat16  # torch's dtype: its update bit for bit
    for muon in (slow_bf16, fast_bf16):
        group = muon.param_groups[0]
        assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.03, 0.9, 0.01)


def test_the_schedule_drives_both_optimizers(tiny_model):
    cfg = TrainConfig(optimizer="muon", max_iters=100, warmup_iters=10, learning_rate=1e-3, min_lr=1e-4,
                      muon_lr=0.02)
    opt = build_optimizer(tiny_model, cfg, CPU)
    for step in (0, 5, 10, 55, 100):
        lr = set_learning_rate(opt, step, cfg)
        assert lr == learning_rate(step, cfg)
        assert all(g["lr"] == lr for g in opt.adamw.param_groups)
        assert all(g["lr"] == pytest.approx(lr * 20) for g in opt.muon.param_groups)  # 0.02 / 1e-3
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(2e-3)  # min_lr's share at the end


def test_unknown_optimizer_and_bad_muon_settings_are_refused():
    with pytest.raises(ValueError, match="train.optimizer must be adamw or muon, got 'sgd'"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="train.muon_lr"):
        TrainConfig(muon_momentum=1.0)


def by_hand(model, opt, x, y, clip):
    """One step the plain way: mean loss over the whole batch, clip, step."""
    model(x.long(), targets=y.long()).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norm


def test_muon_step_accumulates_and_clips_like_one_big_batch(tiny_model, tiny_cfg):
    """Two micro-batches of 4 with clipping = one batch of 8, clipped, stepped by hand.

    In float32, Muon's iteration included: the two add the same numbers in another order, which
    bf16's Newton-Schulz would amplify past this bound (tests/test_cpu_bf16.py has that case)."""
    reference = copy.deepcopy(tiny_model)
    initial = tiny_model.trf_blocks[0].ff.fc.weight.detach().clone()
    cfg = TrainConfig(optimizer="muon", grad_accum_steps=2, grad_clip=0.05, dtype="float32")
    torch.manual_seed(1)
    x, y = torch.randint(0, tiny_cfg.vocab_size, (2, 8, 12)).to(torch.uint16)
    precision = Precision(torch.float32, CPU)
    opt, ref_opt = build_optimizer(tiny_model, cfg, CPU), build_optimizer(reference, cfg, CPU)
    for _ in range(3):
        train_step(tiny_model, iter([(x[:4], y[:4]), (x[4:], y[4:])]), opt, precision, cfg)
        norm = by_hand(reference, ref_opt, x, y, cfg.grad_clip)
    assert norm > cfg.grad_clip  # the clip acted
    for p, q in zip(tiny_model.parameters(), reference.parameters()):
        assert torch.allclose(p, q, atol=1e-5)
    assert not torch.allclose(tiny_model.trf_blocks[0].ff.fc.weight, initial, atol=1e-3)  # the steps moved it


def test_fp16_scaler_skips_both_optimizers_on_overflow_and_steps_them_otherwise(tiny_model, tiny_cfg):
    cfg = TrainConfig(optimizer="muon", grad_clip=1.0)
    precision = Precision(torch.float16, CPU)
    opt = build_optimizer(tiny_model, cfg, CPU)
    x, y = torch.randint(0, tiny_cfg.vocab_size, (2, 4, 12)).to(torch.uint16)
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**60)  # the fp16 gradients overflow
    train_step(tiny_model, iter([(x, y)]), opt, precision, cfg)
    assert all(torch.equal(before[n], p) for n, p in tiny_model.named_parameters())  # skipped
    assert precision.scaler.get_scale() < 2.0**60  # and the scale came down
    precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    train_step(tiny_model, iter([(x, y)]), opt, precision, cfg)
    moved = {n for n, p in tiny_model.named_parameters() if not torch.equal(before[n], p)}
    assert "trf_blocks.0.att.W_query.weight" in moved and "tok_emb.weight" in moved  # both stepped


def test_state_dict_holds_both_optimizers_and_continues_exactly(tiny_model, tiny_cfg):
    cfg = TrainConfig(optimizer="muon")
    x, y = torch.randint(0, tiny_cfg.vocab_size, (2, 4, 12))
    opt = build_optimizer(tiny_model, cfg, CPU)
    for _ in range(2):
        by_hand(tiny_model, opt, x, y, 1.0)
    saved_model, saved_opt = copy.deepcopy(tiny_model.state_dict()), copy.deepcopy(opt.state_dict())
    assert set(saved_opt) == {"muon", "adamw"}
    muon_state = saved_opt["muon"]["state"]
    assert len(muon_state) == 6 * tiny_cfg.n_layers and all("momentum_buffer" in s for s in muon_state.values())
    assert all("exp_avg_sq" in s for s in saved_opt["adamw"]["state"].values())
    by_hand(tiny_model, opt, x, y, 1.0)

    restored = GPTModel(tiny_cfg)
    restored.load_state_dict(saved_model)
    restored_opt = build_optimizer(restored, cfg, CPU)
    restored_opt.load_state_dict(saved_opt)
    by_hand(restored, restored_opt, x, y, 1.0)
    for p, q in zip(tiny_model.parameters(), restored.parameters()):
        assert torch.equal(p, q)


def trained(tiny_cfg, optimizer="muon", steps=30, **train_overrides):
    """Train a fresh tiny model on a repeating pattern; return it and its saved (step, val loss)."""
    tokens = (np.arange(3000) * 7 % 101).astype(np.uint16)
    ds = TokenWindows(tokens, 12, 12)
    torch.manual_seed(0)
    model = GPTModel(tiny_cfg)
    cfg = TrainConfig(max_iters=steps, eval_interval=10, eval_iters=2, warmup_iters=3, learning_rate=3e-3,
                      min_lr=3e-4, optimizer=optimizer, **train_overrides)
    saves = []
    loaders = {"train": eval_loader(ds, 4, 2), "val": eval_loader(ds, 4, 2)}
    train(new_run(model, cfg, CPU), cfg, TrainData(TrainBatches(ds, 4, seed=1), loaders),
          SavesOnly(lambda s: saves.append((s.step, s.val_loss))))
    return model, saves


@pytest.mark.precision  # learns in either of auto's precisions
def test_muon_trains_and_beats_adamw_on_a_pattern(tiny_cfg):
    _, muon = trained(tiny_cfg)
    _, adamw = trained(tiny_cfg, optimizer="adamw")
    assert muon[-1][1] < muon[0][1] < math.log(101)
    assert muon[-1][1] < adamw[-1][1]
