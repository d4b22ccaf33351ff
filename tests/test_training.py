import math

import numpy as np
import pytest
import torch

from gpt import training
from gpt.data import TokenWindows, TrainBatches, eval_loader
from gpt.model import GPTModel
from gpt.training import (
    NonFiniteLoss, TrainConfig, build_optimizer, calc_loss_batch, evaluate, learning_rate, train,
)


def test_learning_rate_schedule():
    cfg = TrainConfig(max_iters=100, warmup_iters=10, learning_rate=1e-3, min_lr=1e-4)
    lrs = [learning_rate(s, cfg) for s in range(100)]
    assert lrs[0] > 0  # no wasted first step
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # warming up
    assert lrs[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # decaying
    assert lrs[55] == pytest.approx(5.5e-4)  # halfway through the cosine
    assert learning_rate(100, cfg) == pytest.approx(1e-4)
    assert learning_rate(0, TrainConfig(warmup_iters=0, learning_rate=1e-3, min_lr=0)) == pytest.approx(1e-3)


def test_weight_decay_only_on_matrices(tiny_model):
    opt = build_optimizer(tiny_model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(tiny_model.parameters()))  # tied weight once


def test_evaluate_uses_eval_mode_and_restores_it(tiny_cfg):
    from gpt.model import GPTModel, ModelConfig
    torch.manual_seed(0)
    model = GPTModel(ModelConfig(**{**tiny_cfg.__dict__, "drop_rate": 0.5}))
    ds = TokenWindows(np.arange(400, dtype=np.uint16) % 101, 8, 8)
    loader = eval_loader(ds, 4, 3)
    model.train()
    a, b = evaluate(model, loader, torch.device("cpu")), evaluate(model, loader, torch.device("cpu"))
    assert a == b  # no dropout noise
    assert model.training
    x, y = next(iter(loader))
    model.eval()
    assert a == pytest.approx(sum(calc_loss_batch(model, xx, yy).item() * len(xx) for xx, yy in loader) / 12)


def test_gradient_accumulation_matches_one_big_batch(tiny_model, tiny_cfg):
    torch.manual_seed(0)
    x = torch.randint(0, tiny_cfg.vocab_size, (8, 12))
    y = torch.randint(0, tiny_cfg.vocab_size, (8, 12))
    calc_loss_batch(tiny_model, x, y).backward()
    full = [p.grad.clone() for p in tiny_model.parameters()]
    tiny_model.zero_grad()
    for part in (slice(0, 4), slice(4, 8)):
        (calc_loss_batch(tiny_model, x[part], y[part]) / 2).backward()
    for g, p in zip(full, tiny_model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)


def test_train_loop_lowers_loss_saves_and_repeats_exactly(tiny_cfg):
    from gpt.model import GPTModel
    tokens = (np.arange(3000) * 7 % 101).astype(np.uint16)  # a learnable repeating pattern
    ds = TokenWindows(tokens, 12, 12)

    def run():
        torch.manual_seed(0)
        model = GPTModel(tiny_cfg)
        cfg = TrainConfig(max_iters=30, eval_interval=10, eval_iters=2, warmup_iters=3,
                          learning_rate=3e-3, min_lr=3e-4, grad_accum_steps=2)
        saves = []
        state = train(model, cfg, TrainBatches(ds, 4, seed=1),
                      {"train": eval_loader(ds, 4, 2), "val": eval_loader(ds, 4, 2)},
                      torch.device("cpu"), lambda s, opt, scaler: saves.append((s.step, s.val_loss)))
        return model, state, saves

    model_a, state_a, saves_a = run()
    model_b, _, saves_b = run()
    assert [s for s, _ in saves_a] == [10, 20, 30]
    assert saves_a[-1][1] < saves_a[0][1] < math.log(101)
    assert state_a.best_val_loss == min(v for _, v in saves_a)
    assert saves_a == saves_b
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)



def tiny_run(tiny_cfg):
    """A tiny model and a function that trains it; `saves` records the steps it saved at."""
    torch.manual_seed(0)
    model = GPTModel(tiny_cfg)
    ds = TokenWindows((np.arange(600) * 7 % 101).astype(np.uint16), 12, 12)
    saves = []

    def run(max_iters, eval_interval, should_stop=None):
        cfg = TrainConfig(max_iters=max_iters, eval_interval=eval_interval, eval_iters=1, warmup_iters=0)
        return train(model, cfg, TrainBatches(ds, 4, seed=1),
                     {"train": eval_loader(ds, 4, 1), "val": eval_loader(ds, 4, 1)}, torch.device("cpu"),
                     lambda state, optimizer, scaler: saves.append(state.step), should_stop=should_stop)
    return model, saves, run


@pytest.mark.parametrize("asks,step,saves", [
    ([False, False, False, True], 4, [2, 4]),  # asked at an evaluation: saved once
    ([False, False, True], 3, [2, 3]),  # between evaluations: saved too
])
def test_stop_request_saves_after_the_step_and_returns(tiny_cfg, asks, step, saves):
    _, saved, run = tiny_run(tiny_cfg)
    asked = iter(asks)
    assert run(10, 2, should_stop=lambda: next(asked)).step == step
    assert saved == saves


@pytest.mark.parametrize("eval_interval,message,saves", [
    (3, "^loss is nan at step 5$", [3]),  # the step after the bad update
    (2, "^train loss is nan at step 4$", [2]),  # the evaluation right after it
])
def test_non_finite_loss_stops_before_anything_is_saved(tiny_cfg, monkeypatch, eval_interval, message, saves):
    schedule = training.learning_rate
    monkeypatch.setattr(training, "learning_rate", lambda step, cfg: math.nan if step == 3 else schedule(step, cfg))
    model, saved, run = tiny_run(tiny_cfg)
    with pytest.raises(NonFiniteLoss, match=message):
        run(10, eval_interval)  # the 4th update makes every weight NaN
    assert saved == saves


def test_non_finite_weights_are_never_saved(tiny_cfg):
    model, saved, run = tiny_run(tiny_cfg)

    def poison_then_stop():  # a NaN weight that no loss has seen yet
        with torch.no_grad():
            model.trf_blocks[0].ff.fc.bias[0] = math.nan
        return True

    with pytest.raises(NonFiniteLoss, match="a weight is nan at step 1"):
        run(10, 5, should_stop=poison_then_stop)
    assert saved == []
