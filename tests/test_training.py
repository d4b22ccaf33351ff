import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.utils.data import DataLoader

from conftest import SavesOnly
from gpt import optim
from gpt.compiled import compile_model
from gpt.config import TrainConfig
from gpt.data import TextFormat, TokenWindows, TrainBatches, eval_loader
from gpt.distributed import SINGLE
from gpt.model import GPTModel
from gpt.optim import build_optimizer, learning_rate
from gpt.precision import Precision, pick_dtype
from gpt.training import (NonFiniteLoss, TrainData, evaluate, final_val_line, new_run, out_of_memory_named, train,
                          train_step)

CPU = torch.device("cpu")


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
    opt = build_optimizer(tiny_model, TrainConfig(optimizer="adamw", weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(tiny_model.parameters()))  # tied weight once


def test_fused_adamw_on_cpu_matches_the_per_tensor_version(tiny_model, tiny_cfg):
    reference = type(tiny_model)(tiny_cfg)
    reference.load_state_dict(tiny_model.state_dict())
    initial = tiny_model.tok_emb.weight.detach().clone()
    cfg = TrainConfig(optimizer="adamw", learning_rate=1e-2)
    fused = build_optimizer(tiny_model, cfg, torch.device("cpu"))
    plain = build_optimizer(reference, cfg, torch.device("cpu"), fused=False)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    x = torch.randint(0, tiny_cfg.vocab_size, (2, 12))
    for _ in range(3):
        for model, opt in ((tiny_model, fused), (reference, plain)):
            model(x, targets=x.roll(1)).backward()
            opt.step()
            opt.zero_grad()
    for p, q in zip(tiny_model.parameters(), reference.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    assert not torch.allclose(tiny_model.tok_emb.weight, initial, atol=1e-3)  # the steps did move it


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
    assert a == pytest.approx(sum(model(xx.long(), targets=yy.long()).item() * len(xx) for xx, yy in loader) / 12)


def partial_split() -> TokenWindows:
    """18 windows of 16 (tiny_cfg's context): 4 batches of 4, then a batch of 2."""
    return TokenWindows((np.arange(300) * 7 % 101).astype(np.uint16), 16, 16)


def test_a_split_ending_in_a_partial_batch_has_the_mean_of_its_windows(tiny_model):
    ds = partial_split()
    padded = evaluate(tiny_model, eval_loader(ds, 4, None), CPU)  # the last batch: 2 windows, 2 padding rows
    x, y = (torch.stack(part).long() for part in zip(*(ds[i] for i in range(len(ds)))))
    with torch.no_grad():  # unpadded: every window at once, the sum over their targets
        nats = F.cross_entropy(tiny_model.eval()(x).flatten(0, 1), y.flatten(), reduction="sum")
    assert len(ds) % 4 == 2
    assert padded == pytest.approx(nats.item() / y.numel(), rel=1e-6)  # float32 on the CPU


def test_gradient_accumulation_matches_one_big_batch(tiny_model, tiny_cfg):
    torch.manual_seed(0)
    x = torch.randint(0, tiny_cfg.vocab_size, (8, 12))
    y = torch.randint(0, tiny_cfg.vocab_size, (8, 12))
    tiny_model(x, targets=y).backward()
    full = [p.grad.clone() for p in tiny_model.parameters()]
    tiny_model.zero_grad()
    for part in (slice(0, 4), slice(4, 8)):
        (tiny_model(x[part], targets=y[part]) / 2).backward()
    for g, p in zip(full, tiny_model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)


@pytest.mark.precision  # in either of auto's precisions
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
        state = train(new_run(model, cfg, torch.device("cpu")), cfg, TrainData(TrainBatches(ds, 4, seed=1),
                      {"train": eval_loader(ds, 4, 2), "val": eval_loader(ds, 4, 2)}), SavesOnly(lambda s: saves.append((s.step, s.val_loss))))
        return model, state, saves

    model_a, state_a, saves_a = run()
    model_b, _, saves_b = run()
    assert [s for s, _ in saves_a] == [10, 20, 30]
    assert saves_a[-1][1] < saves_a[0][1] < math.log(101)
    assert state_a.best_val_loss == min(v for _, v in saves_a)
    assert saves_a == saves_b
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)



def tiny_run(tiny_cfg, optimizer="muon"):
    """A tiny model and a function that trains it; `saves` records the steps it saved at."""
    torch.manual_seed(0)
    model = GPTModel(tiny_cfg)
    ds = TokenWindows((np.arange(600) * 7 % 101).astype(np.uint16), 12, 12)
    saves = []

    def run(max_iters, eval_interval, stop=None):
        cfg = TrainConfig(max_iters=max_iters, eval_interval=eval_interval, eval_iters=1, warmup_iters=0,
                          optimizer=optimizer)
        return train(new_run(model, cfg, torch.device("cpu")), cfg, TrainData(TrainBatches(ds, 4, seed=1),
                     {"train": eval_loader(ds, 4, 1), "val": eval_loader(ds, 4, 1)}), SavesOnly(lambda state: saves.append(state.step)), stop=stop)
    return model, saves, run


@pytest.mark.parametrize("asks,step,saves", [
    ([False, False, False, True], 4, [2, 4]),  # asked at an evaluation: saved once
    ([False, False, True], 3, [2, 3]),  # between evaluations: saved too
])
def test_stop_request_saves_after_the_step_and_returns(tiny_cfg, asks, step, saves):
    _, saved, run = tiny_run(tiny_cfg)
    asked = iter(asks)
    assert run(10, 2, stop=lambda: next(asked)).step == step
    assert saved == saves


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
@pytest.mark.parametrize("eval_interval,message,saves", [
    (3, "^loss is nan at step 5$", [3]),  # the step after the bad update
    (2, "^train loss is nan at step 4$", [2]),  # the evaluation right after it
])
def test_non_finite_loss_stops_before_anything_is_saved(tiny_cfg, monkeypatch, eval_interval, message, saves,
                                                        optimizer):
    schedule = optim.learning_rate
    monkeypatch.setattr(optim, "learning_rate", lambda step, cfg: math.nan if step == 3 else schedule(step, cfg))
    model, saved, run = tiny_run(tiny_cfg, optimizer)
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
        run(10, 5, stop=poison_then_stop)
    assert saved == []


def trained(tiny_cfg, steps=30, **train_overrides):
    """Train a fresh tiny model on a repeating pattern; return it and its saved (step, val loss)."""
    tokens = (np.arange(3000) * 7 % 101).astype(np.uint16)
    ds = TokenWindows(tokens, 12, 12)
    torch.manual_seed(0)
    model = GPTModel(tiny_cfg)
    cfg = TrainConfig(max_iters=steps, eval_interval=10, eval_iters=2, warmup_iters=3,
                      learning_rate=3e-3, min_lr=3e-4, **train_overrides)
    saves = []
    loaders = {"train": eval_loader(ds, 4, 2), "val": eval_loader(ds, 4, 2)}
    train(new_run(model, cfg, torch.device("cpu")), cfg, TrainData(TrainBatches(ds, 4, seed=1), loaders),
          SavesOnly(lambda s: saves.append((s.step, s.val_loss))))
    return model, saves


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_trains_and_keeps_fp32_weights(dtype, optimizer, tiny_cfg):
    model, saves = trained(tiny_cfg, dtype=dtype, optimizer=optimizer)
    fp32_model, fp32_saves = trained(tiny_cfg, dtype="float32", optimizer=optimizer)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert saves[-1][1] < saves[0][1] < math.log(101)
    assert saves[-1][1] == pytest.approx(fp32_saves[-1][1], abs=0.15)  # learns about as well
    assert saves != fp32_saves  # and really ran in lower precision


def test_pick_dtype():
    cpu = torch.device("cpu")
    assert pick_dtype("float16", cpu) == torch.float16
    assert pick_dtype("bfloat16", cpu) == torch.bfloat16
    assert pick_dtype("auto", cpu) in (torch.float32, torch.bfloat16)
    assert pick_dtype("auto", torch.device("mps")) == torch.float32
    with pytest.raises(ValueError, match="train.dtype"):
        TrainConfig(dtype="fp8")
    with pytest.raises(ValueError, match="train.compile"):
        TrainConfig(compile="yes")


def test_fp16_scaler_unscales_before_clipping(tiny_model, tiny_cfg):
    """The clip applies to the true gradient: a fp16 step equals the same step done by hand."""
    torch.manual_seed(0)
    x, y = torch.randint(0, tiny_cfg.vocab_size, (2, 4, 12)).to(torch.uint16)
    cfg = TrainConfig(grad_clip=0.01, weight_decay=0.0)
    precision = Precision(torch.float16, torch.device("cpu"))
    assert precision.scaler.is_enabled() and precision.scaler.get_scale() > 1
    reference = type(tiny_model)(tiny_cfg)
    reference.load_state_dict(tiny_model.state_dict())
    # Plain SGD, so the update is the clipped gradient itself (Adam's first step hides scale).
    opt = torch.optim.SGD(tiny_model.parameters(), lr=1.0)
    loss, tokens = train_step(tiny_model, iter([(x, y)]), opt, precision, cfg)
    assert tokens == 48
    # By hand: the same fp16 loss, unscaled gradients clipped to norm 0.01, one SGD step.
    ref_opt = torch.optim.SGD(reference.parameters(), lr=1.0)
    with precision.autocast():
        ref_loss = reference(x.long(), targets=y.long())
    ref_loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.01)
    assert norm > 0.01  # the clip really acts
    ref_opt.step()
    assert loss == pytest.approx(ref_loss.item(), rel=1e-3)
    for p, q in zip(tiny_model.parameters(), reference.parameters()):
        assert torch.allclose(p, q, atol=2e-5)


def test_compile_failure_warns_once_and_trains_uncompiled(tiny_cfg, monkeypatch):
    def broken(module, *args, **kwargs):
        def fail(*a, **k):
            raise RuntimeError("no compiler here")
        return fail
    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(UserWarning, match="torch.compile failed .no compiler here") as caught:
        model, saves = trained(tiny_cfg, steps=10, compile=True)
    assert len([w for w in caught if "torch.compile" in str(w.message)]) == 1
    assert [s for s, _ in saves] == [10] and saves[0][1] < math.log(101)


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_compiled_training_saves_the_plain_module(tiny_cfg, monkeypatch, optimizer):
    """Through a torch.compile wrapper (eager backend: fast), weights train and keep plain names."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m: real_compile(m, backend="eager"))
    model, saves = trained(tiny_cfg, steps=10, compile=True, optimizer=optimizer)
    plain, plain_saves = trained(tiny_cfg, steps=10, compile=False, optimizer=optimizer)
    assert compile_model(model, True, torch.device("cpu")) is not model
    assert compile_model(model, "auto", torch.device("cpu")) is model  # auto: CUDA only
    assert not any("_orig_mod" in k for k in model.state_dict())
    assert saves[0][1] == pytest.approx(plain_saves[0][1], abs=1e-4)
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.allclose(p, q, atol=1e-4)


def test_activation_checkpointing_compiles_and_trains_as_without_it(tiny_cfg, monkeypatch):
    """Through torch.compile (aot_eager: autograd traced ahead of time as inductor does, without
    generating code) the graph holds the checkpoint, nothing falls back, the weights are plain training's."""
    from torch._dynamo.backends.registry import lookup_backend
    aot_eager, graphs = lookup_backend("aot_eager"), []

    def recording(graph, example_inputs):
        graphs.append(graph)
        return aot_eager(graph, example_inputs)
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m: real_compile(m, backend=recording))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, saves = trained(tiny_cfg, steps=4, compile=True, activation_checkpointing=True)
    assert not [w for w in caught if "torch.compile failed" in str(w.message)]
    assert any(str(node.target) == "tag_activation_checkpoint" for graph in graphs for node in graph.graph.nodes)
    plain, plain_saves = trained(tiny_cfg, steps=4)
    assert saves[0][1] == pytest.approx(plain_saves[0][1], abs=1e-5)
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.allclose(p, q, atol=1e-5)


def test_auto_picks_nothing_apple_gpu_users_found_broken(tiny_model):
    """On MPS, `auto` means no torch.compile and float32 (so no fp16 GradScaler); checked on any machine,
    since choosing needs no Apple GPU."""
    mps = torch.device("mps")
    assert compile_model(tiny_model, "auto", mps) is tiny_model
    assert pick_dtype("auto", mps) == torch.float32
    assert not Precision(pick_dtype("auto", mps), mps).scaler.is_enabled()
    assert TrainConfig().compile == "auto" and TrainConfig().dtype == "auto"  # what a run gets unasked


def test_out_of_memory_on_the_current_gpu_names_its_index(monkeypatch):
    """`cuda` (train.device auto) is the current GPU: the line says cuda:0, as CUDA's own message does."""
    from gpt.training import OutOfMemory
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has ...")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert str(OutOfMemory("training step", 3, torch.device("cuda"), oom)) == (
        "out of memory on cuda:0 during training step 3 (tried to allocate 2.00 GiB)")
    assert str(OutOfMemory("training step", 3, torch.device("cuda", 1), oom)).startswith("out of memory on cuda:1 ")


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
@pytest.mark.parametrize("poison,message", [
    ("nan gradient", "^the gradient norm is nan at step 7$"),  # in one matrix of Muon's group of 4 x 2 layers
    ("inf gradient", "^the gradient norm is inf at step 7$"),
    ("nan loss", "^loss is nan at step 7$"),  # every gradient NaN
])
def test_a_non_finite_loss_or_gradient_changes_no_weight_and_no_optimizer_state(tiny_model, tiny_cfg, optimizer,
                                                                                  poison, message, monkeypatch):
    """Clipping's norm carries the check: decided on the device, where the optimizer skips its update.
    Weight decay on: a skipped step does not decay either. Compared bit for bit (-0.0 is not 0.0)."""
    cfg = TrainConfig(optimizer=optimizer, grad_clip=1.0, weight_decay=0.1, muon_weight_decay=0.1)
    opt = build_optimizer(tiny_model, cfg, torch.device("cpu"))
    x, y = torch.randint(0, tiny_cfg.vocab_size, (2, 4, 12)).to(torch.uint16)
    train_step(tiny_model, iter([(x, y)]), opt, Precision(torch.float32, torch.device("cpu")), cfg)
    # a real step first: the momentum buffers hold something to keep

    def bits(t: torch.Tensor) -> torch.Tensor:
        return t.detach().view(torch.int32).clone()

    weights = {n: bits(p) for n, p in tiny_model.named_parameters()}
    state = {id(p): {k: bits(v) for k, v in s.items()} for p, s in opt.state.items()}
    assert sum(len(s) for s in state.values()) >= len(weights)  # Muon's buffers; AdamW's moments and step
    key = tiny_model.trf_blocks[1].att.W_key.weight
    if poison == "nan gradient":
        key.register_hook(lambda grad: grad * math.nan)
    elif poison == "inf gradient":  # the clip then scales the others to 0 and this one to NaN (inf * 0)
        key.register_hook(lambda grad: grad + math.inf)
    else:
        tiny_model.final_norm.register_forward_hook(lambda module, args, out: out * math.nan)
    with pytest.raises(NonFiniteLoss, match=message), out_of_memory_named("training step", 7, torch.device("cpu")):
        train_step(tiny_model, iter([(x, y)]), opt, Precision(torch.float32, torch.device("cpu")), cfg)
    assert all(torch.equal(weights[n], bits(p)) for n, p in tiny_model.named_parameters())
    for p, s in opt.state.items():
        assert all(torch.equal(state[id(p)][k], bits(v)) for k, v in s.items())  # momentum, Adam's moments, its step


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_a_step_skipped_on_the_device_is_no_step_and_one_taken_is_a_plain_step(tiny_model, tiny_cfg, optimizer):
    import copy

    from gpt.optim import steps_unless
    cfg = TrainConfig(optimizer=optimizer)
    twin = copy.deepcopy(tiny_model)
    opt, twin_opt = build_optimizer(tiny_model, cfg, torch.device("cpu")), build_optimizer(twin, cfg, torch.device("cpu"))
    x, y = torch.randint(0, tiny_cfg.vocab_size, (2, 4, 12))
    before = copy.deepcopy(tiny_model.state_dict())
    for model in (tiny_model, twin):
        model(x, targets=y).backward()
    assert steps_unless(opt, torch.tensor(True))  # skipped
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())
    assert steps_unless(opt, torch.tensor(False))  # taken: the same as an ordinary step
    twin_opt.step()
    assert all(torch.equal(a, b) for a, b in zip(tiny_model.parameters(), twin.parameters()))
    assert not all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())
    assert not steps_unless(torch.optim.AdamW(tiny_model.parameters(), fused=False), torch.tensor(False))


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches and counters emptied before the test and after it."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    counters.clear()


@pytest.mark.slow  # two Inductor compiles (C++ on the CPU): ~10 s with Inductor's cache warm, ~50 s cold
def test_an_evaluation_ending_in_a_partial_batch_compiles_nothing_more(tiny_model, fresh_dynamo):
    """The padded last batch runs the full batches' graph; so does the final figure, compiled once
    more. Unpadded (DataLoader's own short last batch), the same evaluation compiles another."""
    ds = partial_split()
    net = compile_model(tiny_model, True, CPU)  # what train() evaluates through

    def graphs() -> int:
        return counters["stats"]["unique_graphs"]

    evaluate(net, eval_loader(ds, 4, 1), CPU)  # one full batch
    assert graphs() == 1
    padded = evaluate(net, eval_loader(ds, 4, None), CPU)  # 4 full batches and the padded one
    assert graphs() == 1
    final_val_line(tiny_model, eval_loader(ds, 4, None), TrainConfig(compile=True), CPU, SINGLE, TextFormat.whole_val, 1)
    assert graphs() == 1  # Dynamo's cache: the same module, call and shape
    unpadded = evaluate(net, DataLoader(ds, batch_size=4), CPU)  # the last batch (2, 16): a new shape
    assert graphs() == 2
    assert padded == pytest.approx(unpadded, rel=1e-6)
