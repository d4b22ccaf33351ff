"""What only an NVIDIA GPU can check: every test here is skipped without CUDA.

Mixed precision (bf16, fp16 with its GradScaler), torch.compile with inductor, fused AdamW and
Muon's bf16 iteration, KV-cache sampling, pinned-memory batches, activation checkpointing's
memory, a real out-of-memory error, checkpoints that cross from the GPU to the CPU, exact resume
with the CUDA RNG states and, with two GPUs, NCCL.

Run it on a GPU box with `bash scripts/gpu_check.sh` (docs/gpus.md), or `python -m pytest tests/test_cuda.py`.

TF32 is turned off for each test (`no_tf32`), and again (`tf32(False)`) where a test compares after
running train.py's main, which turns it on: comparisons of two paths are then of fp32 sums taken in
another order, not of 10-bit mantissas. Both go through the API training uses
(`gpt.device.allow_tf32_matmuls`): torch refuses to mix it with the legacy flags.
"""

import contextlib
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import MuonOneByOne, SavesOnly
from gpt.checkpoint import load_checkpoint
from gpt.config import TrainConfig
from gpt.data import TokenWindows, TrainBatches, eval_loader
from gpt.device import allow_tf32_matmuls, setup_device
from gpt.model import GPTModel, ModelConfig
from gpt.optim import Muon, bf16_is_fast, build_optimizer
from gpt.precision import Precision
from gpt.sampling import generate
from gpt.training import TrainData, new_run, to_device, train, train_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (CUDA)")

ROOT = Path(__file__).resolve().parent.parent
CUDA = torch.device("cuda")
CPU = torch.device("cpu")


@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 matmuls on or off inside, restored after (train.py's setup_device turns them on process-wide)."""
    saved = torch.backends.cuda.matmul.fp32_precision == "tf32"
    allow_tf32_matmuls(enabled)
    try:
        yield
    finally:
        allow_tf32_matmuls(saved)


@pytest.fixture(autouse=True)
def no_tf32():
    """Full fp32 matmuls during the test; a test that runs train.py's main pins it again where it compares."""
    with tf32(False):
        yield


def pattern_windows(context: int = 12) -> TokenWindows:
    """A learnable repeating pattern over a 101-token vocabulary."""
    return TokenWindows((np.arange(3000) * 7 % 101).astype(np.uint16), context, context)


def trained_on_cuda(cfg: ModelConfig, steps: int = 20, **train_overrides) -> tuple[GPTModel, list]:
    """A fresh model trained on CUDA for `steps` with `train()`; returns it and its saves (step, val loss)."""
    ds = pattern_windows()
    torch.manual_seed(0)
    model = GPTModel(cfg).to(CUDA)
    train_cfg = TrainConfig(max_iters=steps, eval_interval=steps // 2, eval_iters=2, warmup_iters=2,
                            learning_rate=3e-3, min_lr=3e-4, **train_overrides)
    saves = []
    train(new_run(model, train_cfg, CUDA), train_cfg, TrainData(TrainBatches(ds, 4, seed=1, pin_memory=True),
          {"train": eval_loader(ds, 4, 2), "val": eval_loader(ds, 4, 2)}), SavesOnly(lambda state: saves.append((state.step, state.val_loss))))
    return model, saves


# --------------------------------------------------------------------------- mixed precision

@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_trains_on_cuda_and_keeps_fp32_weights(tiny_cfg, dtype):
    if dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    model, saves = trained_on_cuda(tiny_cfg, dtype=dtype)
    fp32_model, fp32_saves = trained_on_cuda(tiny_cfg, dtype="float32")
    assert all(p.dtype == torch.float32 and p.device.type == CUDA.type for p in model.parameters())
    assert saves[-1][1] < saves[0][1] < math.log(101)  # it learns
    assert saves[-1][1] == pytest.approx(fp32_saves[-1][1], abs=0.15)  # about as well as fp32
    assert saves != fp32_saves  # and really ran in lower precision


def test_fp16_grad_scaler_skips_a_step_that_overflowed_and_halves_its_scale(tiny_cfg):
    torch.manual_seed(0)
    model = GPTModel(tiny_cfg).to(CUDA)
    precision = Precision(torch.float16, CUDA)
    optimizer = build_optimizer(model, TrainConfig(optimizer="adamw"), CUDA)
    cfg = TrainConfig(grad_clip=1.0)
    x, y = torch.randint(0, tiny_cfg.vocab_size, (2, 4, 12)).to(torch.uint16)
    scale = precision.scaler.get_scale()
    assert precision.scaler.is_enabled() and scale == 2.0**16

    before = [p.detach().clone() for p in model.parameters()]
    train_step(model, iter([(x, y)]), optimizer, precision, cfg)
    assert precision.scaler.get_scale() == scale  # no overflow: the same scale (it grows after 2,000 steps)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))  # and the step was taken

    # An overflowing gradient (what fp16's range makes of a too-large scaled loss): step skipped, scale halved.
    hook = model.trf_blocks[0].ff.fc.weight.register_hook(lambda grad: grad * math.inf)
    before = [p.detach().clone() for p in model.parameters()]
    loss, _ = train_step(model, iter([(x, y)]), optimizer, precision, cfg)
    hook.remove()
    assert math.isfinite(loss)  # the loss itself is fine: only the gradients overflowed
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert precision.scaler.get_scale() == scale / 2

    train_step(model, iter([(x, y)]), optimizer, precision, cfg)  # and then it carries on
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


# --------------------------------------------------------------------------- compile

@pytest.mark.parametrize("activation_checkpointing", [False, True])
def test_compiled_training_on_cuda_matches_eager(tiny_cfg, activation_checkpointing):
    """inductor (the real backend, generating Triton kernels): the losses and weights of eager
    training, nothing falling back to eager. Not bit for bit: fused kernels sum in another order,
    and Muon's bf16 iteration can round those differences either way, so the bounds are loose
    enough for that and tight enough to catch a wrong graph (a missing term, a stale weight)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, saves = trained_on_cuda(tiny_cfg, steps=10, dtype="float32", compile=True,
                                       activation_checkpointing=activation_checkpointing)
    assert not [w for w in caught if "torch.compile failed" in str(w.message)]
    eager, eager_saves = trained_on_cuda(tiny_cfg, steps=10, dtype="float32", compile=False)
    assert [s for s, _ in saves] == [s for s, _ in eager_saves]
    assert [v for _, v in saves] == pytest.approx([v for _, v in eager_saves], abs=1e-3)
    assert max((p - q).abs().max().item() for p, q in zip(model.parameters(), eager.parameters())) < 1e-2
    assert not any(k.startswith("_orig_mod.") for k in model.state_dict())
    if not activation_checkpointing:  # the final whole-val pass runs the periodic evaluation's graph
        from torch._dynamo.utils import counters

        from gpt.distributed import SINGLE
        from gpt.training import final_val_line
        graphs = counters["stats"]["unique_graphs"]
        final_val_line(model, eval_loader(pattern_windows(), 4, None), TrainConfig(dtype="float32", compile=True),
                       CUDA, SINGLE, ("val loss", "the val split"), 10)
        assert counters["stats"]["unique_graphs"] == graphs  # on a GPU it scores in training's dtype: no recompile


def test_a_training_step_waits_for_the_gpu_once(tiny_cfg):
    """Muon and fused AdamW in bf16, clipped (gpt2-124m.yaml's step): the one host sync is the loss read at
    the end (torch's sync debug mode warns at each); the count of targets goes up from pinned memory."""
    torch.manual_seed(0)
    model = GPTModel(tiny_cfg).to(CUDA)
    cfg = TrainConfig(grad_clip=1.0, grad_accum_steps=2)
    optimizer = build_optimizer(model, cfg, CUDA)
    precision = Precision(torch.bfloat16, CUDA)
    batches = TrainBatches(pattern_windows(), 4, seed=0, pin_memory=True)
    stream = iter(batches)
    for _ in range(2):  # warm: the optimizer's state, the allocator's blocks, pinned memory
        train_step(model, stream, optimizer, precision, cfg)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train_step(model, stream, optimizer, precision, cfg)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, syncs


def test_a_one_process_group_on_the_gpu_takes_a_plain_cuda_device(tiny_cfg):
    """`python -m gpt bench --ddp` on `auto`'s plain `cuda`: the NCCL group is made (it refuses a device_id
    without an index), and DDP trains a step in it."""
    from gpt.distributed import single_process_group
    group = single_process_group(CUDA)
    try:
        assert torch.distributed.get_backend() == "nccl"
        torch.manual_seed(0)
        model = GPTModel(tiny_cfg).to(CUDA)
        wrapped = group.wrap(model, CUDA)
        assert wrapped.device_ids == [torch.cuda.current_device()]
        cfg = TrainConfig(optimizer="adamw")
        loss, _ = train_step(wrapped, iter(TrainBatches(pattern_windows(), 4, seed=0, pin_memory=True)),
                             build_optimizer(model, cfg, CUDA), Precision(torch.bfloat16, CUDA), cfg, dist=group)
        assert math.isfinite(loss)
    finally:
        group.close()


# --------------------------------------------------------------------------- optimizers

def test_fused_adamw_on_cuda_matches_the_per_tensor_version(tiny_cfg):
    torch.manual_seed(0)
    model = GPTModel(tiny_cfg).to(CUDA)
    reference = GPTModel(tiny_cfg).to(CUDA)
    reference.load_state_dict(model.state_dict())
    cfg = TrainConfig(optimizer="adamw", learning_rate=1e-2)
    fused, plain = build_optimizer(model, cfg, CUDA), build_optimizer(reference, cfg, CUDA, fused=False)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    x = torch.randint(0, tiny_cfg.vocab_size, (2, 12), device=CUDA)
    for _ in range(3):
        for m, opt in ((model, fused), (reference, plain)):
            m(x, targets=x.roll(1)).backward()
            opt.step()
            opt.zero_grad()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_muon_on_cuda_runs_torch_s_bf16_iteration_and_trains(tiny_cfg):
    """A GPU with bf16 runs torch.optim.Muon's bf16 Newton-Schulz (batched, in our Muon); float32 where bf16 is emulated."""
    torch.manual_seed(0)
    optimizer = build_optimizer(GPTModel(tiny_cfg).to(CUDA), TrainConfig(), CUDA)
    assert isinstance(optimizer.muon, Muon)
    assert optimizer.muon.ns_dtype == (torch.bfloat16 if bf16_is_fast(CUDA) else torch.float32)
    model, saves = trained_on_cuda(tiny_cfg, optimizer="muon", dtype="float32")
    assert saves[-1][1] < saves[0][1] < math.log(101)


def test_our_muon_in_bf16_is_torch_muon_on_cuda_too():
    """The CPU test's bit-for-bit check (tests/test_optim.py), on the GPU's bf16 matmuls."""
    torch.manual_seed(0)
    shapes = [(64, 32), (32, 64), (48, 48)]
    ours = [torch.nn.Parameter(torch.randn(s, device=CUDA)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    a, b = MuonOneByOne(ours, ns_dtype=torch.bfloat16, lr=0.02), torch.optim.Muon(theirs, lr=0.02)
    generator = torch.Generator(device=CUDA).manual_seed(1)
    for _ in range(3):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn(p.shape, generator=generator, device=CUDA)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    assert all(torch.equal(p, q) for p, q in zip(ours, theirs))


# --------------------------------------------------------------------------- sampling and checkpoints

@pytest.mark.parametrize("attn_impl", ["sdpa", "explicit"])
def test_kv_cache_sampling_on_cuda_equals_recomputation(tiny_cfg, attn_impl):
    torch.manual_seed(0)
    model = GPTModel(tiny_cfg).use_attention(attn_impl).to(CUDA).eval()
    prompt = torch.randint(0, tiny_cfg.vocab_size, (3, 5), device=CUDA)
    with torch.no_grad():
        # Logits of the last position, cached step by step against the whole window recomputed.
        cache = model.kv_cache(3)
        model(prompt[:, :4], cache)
        cache.advance(4)
        cached = model(prompt[:, 4:], cache)[:, -1]
        assert torch.allclose(cached, model(prompt)[:, -1], atol=1e-5)
    # 5 + 14 tokens: past the 16-token context, where the cache gives way to cropping and recomputing.
    greedy = [generate(model, prompt, 14, temperature=0, kv_cache=kv) for kv in (True, False)]
    assert torch.equal(*greedy)


def test_cuda_graph_decoding_gives_recomputation_s_greedy_tokens_and_records_once(tiny_cfg, monkeypatch):
    """The kept cache and the one-token step captured in CUDA graphs (chat.py's path on CUDA),
    batched, past the context (where it gives way to recomputing): the same greedy tokens, no
    fallback, no CUDA graph skipped (a skip is counted, not raised), and a second call compiles and
    records nothing new."""
    from torch._dynamo.utils import counters
    from torch._inductor import cudagraph_trees
    recorded = []
    record = cudagraph_trees.CUDAGraphTreeManager.record_function

    def counting(self, *args, **kwargs):
        recorded.append(1)
        return record(self, *args, **kwargs)
    monkeypatch.setattr(cudagraph_trees.CUDAGraphTreeManager, "record_function", counting)
    torch.manual_seed(0)
    model = GPTModel(tiny_cfg).to(CUDA).eval()
    prompt = torch.randint(0, tiny_cfg.vocab_size, (3, 5), device=CUDA)
    counters.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graphed = generate(model, prompt, 14, temperature=0, compile=True)
        graphs, records = counters["stats"]["unique_graphs"], len(recorded)
        again = generate(model, prompt, 14, temperature=0, compile=True)
    assert not [w for w in caught if "torch.compile failed" in str(w.message)]
    assert torch.equal(graphed, generate(model, prompt, 14, temperature=0, kv_cache=False))
    assert torch.equal(graphed, again)
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    assert records >= 1 and counters["stats"]["unique_graphs"] == graphs and len(recorded) == records


def test_decoding_waits_for_the_gpu_once_per_token(tiny_cfg):
    """The draw on the GPU, the end-of-text check read with the token: one host sync per token
    (torch's sync debug mode warns at each), sampled (top-k, top-p) and greedy."""
    torch.manual_seed(0)
    model = GPTModel(tiny_cfg).to(CUDA).eval()
    prompt = torch.randint(0, tiny_cfg.vocab_size, (2, 3), device=CUDA)
    generator = torch.Generator(device=CUDA).manual_seed(0)
    for settings in ({"temperature": 0}, {"temperature": 0.8, "top_k": 20, "top_p": 0.9}):
        generate(model, prompt, 4, eos_id=0, generator=generator, **settings)  # warm: allocations, kernels
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                generate(model, prompt, 10, eos_id=tiny_cfg.vocab_size - 1, generator=generator, **settings)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        # 10 tokens read, and at most the copy of the result onto the GPU and the prompt's: not 3 per token
        assert len(syncs) <= 12, (settings, [str(w.message) for w in syncs])


def test_the_host_waits_for_the_token_alone_not_for_the_step_queued_after_it():
    """`read_later`: the copy into pinned memory, then work queued behind it (here ~50 ms of float32
    matmuls, as the next token's forward pass would be) is still running when the token is in hand."""
    from gpt.sampling import read_later
    token = torch.arange(5, device=CUDA)
    wait = read_later(token)
    work = torch.randn(4096, 4096, device=CUDA)
    for _ in range(20):
        work = work @ work / 64
    got = wait()
    behind = torch.cuda.Event()
    behind.record()
    assert not behind.query()  # the matmuls are still running
    assert got.is_pinned() and torch.equal(got, torch.arange(5))
    torch.cuda.synchronize()


def test_a_seeded_draw_on_the_gpu_repeats(tiny_cfg):
    torch.manual_seed(0)
    model = GPTModel(tiny_cfg).to(CUDA).eval()
    prompt = torch.randint(0, tiny_cfg.vocab_size, (2, 3), device=CUDA)
    run = lambda seed: generate(model, prompt, 12, temperature=1.0, generator=torch.Generator(device=CUDA).manual_seed(seed))
    assert torch.equal(run(5), run(5)) and not torch.equal(run(5), run(6))


def test_one_token_decoding_on_the_gpu_gets_a_kernel_that_is_not_cudnn_s():
    """GPT-2 small's one-token call in bf16 (or fp16), as generate.py makes it: torch's kernel choice
    inside DECODING_KERNELS, whatever it is outside (scripts/sdpa_decoding.py prints both)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from gpt.sampling import DECODING_KERNELS, decoding_dtype
    dtype = decoding_dtype(CUDA) if decoding_dtype(CUDA) != torch.float32 else torch.float16
    keys = torch.randn(1, 12, 1024, 64, device=CUDA, dtype=dtype)[:, :, :300]
    query = torch.randn(1, 12, 1, 64, device=CUDA, dtype=dtype)
    with sdpa_kernel(DECODING_KERNELS):
        choice = torch._fused_sdp_choice(query, keys, keys)
    assert choice != int(SDPBackend.CUDNN_ATTENTION) and choice in [int(k) for k in DECODING_KERNELS]


def test_generate_py_decodes_in_bf16_on_cuda_after_setting_up_the_device(tiny_cfg):
    """generate.py and chat.py keep the weights in bf16 on a GPU with it, TF32 on through the new API."""
    from gpt.sampling import for_decoding
    setup_device(CUDA)
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    model = for_decoding(GPTModel(tiny_cfg).to(CUDA), CUDA)
    if torch.cuda.is_bf16_supported(including_emulation=False):
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    out = generate(model, torch.zeros(1, 2, dtype=torch.long, device=CUDA), 8, temperature=0)
    assert out.shape == (1, 10) and model.kv_cache(1).layers[0].keys.dtype == next(model.parameters()).dtype


def test_a_checkpoint_trained_on_cuda_loads_and_samples_on_cpu(corpus_file, tmp_path, capsys):
    import generate as generate_script
    import train as train_script
    out = tmp_path / "run"
    assert train_script.main(["--config", "tiny.yaml", f"--data.corpus={corpus_file}",
                              f"--data.prepared_dir={tmp_path / 'prepared'}", "--model.context_length=16",
                              "--train.device=cuda", "--train.compile=false", "--train.max_iters=4",
                              f"--train.out_dir={out}", "--sample.max_new_tokens=2"]) == 0
    checkpoint = load_checkpoint(out / "latest.pt")
    assert all(t.device == CPU for t in checkpoint["model"].values())  # read onto the CPU
    assert checkpoint["rng"]["cuda"]  # the GPU's RNG state was saved
    capsys.readouterr()
    assert generate_script.main(["Line 3", "--checkpoint", str(out), "--device", "cpu", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("Line 3")
    # The same weights give the same logits on both devices.
    model = GPTModel(ModelConfig(**checkpoint["config"]["model"])).eval()
    model.load_state_dict(checkpoint["model"])
    x = torch.randint(0, 1000, (2, 16))
    with torch.no_grad(), tf32(False):  # train_script.main turned TF32 on (setup_device): fp32 against fp32
        on_cpu = model(x)
        on_cuda = model.to(CUDA)(x.to(CUDA)).cpu()
    assert torch.allclose(on_cpu, on_cuda, atol=1e-4)


def test_exact_resume_on_cuda_with_its_rng_states(corpus_file, tmp_path, monkeypatch):
    """Dropout on; a run stopped at step 3 and resumed to 6 against runs that never stopped.

    Some CUDA kernels add in whatever order their threads finish (atomic adds in the backward
    of embeddings and of the fused attention kernels), so two unbroken runs may already differ in
    the last bits; what holds is that the resumed run is about as close to an unbroken one as
    the unbroken ones are to each other (within 10x that, or 1e-6 where they agree bit for bit).
    With the dropout masks of another RNG state the difference would be orders of magnitude larger.
    """
    import train as train_script
    from gpt.resume import StopRequest

    args = ["--config", "tiny.yaml", f"--data.corpus={corpus_file}", f"--data.prepared_dir={tmp_path / 'prepared'}",
            "--model.context_length=16", "--model.drop_rate=0.1", "--data.batch_size=2", "--train.device=cuda",
            "--train.compile=false", "--train.max_iters=6", "--train.eval_interval=3", "--sample.max_new_tokens=1",
            "--train.optimizer=adamw"]  # AdamW: Muon's bf16 iteration would magnify last-bit differences

    def weights(run: str) -> dict:
        return torch.load(tmp_path / run / "latest.pt", weights_only=True)

    for run in ("unbroken", "again"):
        assert train_script.main([*args, f"--train.out_dir={tmp_path / run}"]) == 0

    class StopAtThree(StopRequest):
        asked = 0

        def __call__(self) -> bool:
            StopAtThree.asked += 1
            return StopAtThree.asked == 3

    monkeypatch.setattr(train_script, "StopRequest", StopAtThree)
    broken = [*args, f"--train.out_dir={tmp_path / 'broken'}"]
    assert train_script.main(broken) != 0
    stopped = weights("broken")
    assert stopped["step"] == 3 and stopped["rng"]["cuda"]  # the GPU's dropout RNG, saved
    assert train_script.main([*broken, "--resume"]) == 0

    unbroken, again, resumed = weights("unbroken"), weights("again"), weights("broken")
    assert resumed["step"] == unbroken["step"] == 6 and resumed["data"] == unbroken["data"]

    def largest_difference(a: dict, b: dict) -> float:
        return max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"])
    noise = largest_difference(unbroken, again)
    assert noise < 1e-4
    assert largest_difference(unbroken, resumed) <= max(10 * noise, 1e-6)


# --------------------------------------------------------------------------- memory

def test_pinned_memory_batches_reach_the_gpu_intact():
    ds = TokenWindows(np.arange(4000, dtype=np.uint16), 16, 16)
    inputs, targets = next(iter(TrainBatches(ds, 8, seed=0, pin_memory=True)))
    assert inputs.is_pinned() and targets.is_pinned() and inputs.dtype == torch.uint16
    on_gpu = to_device(inputs, CUDA)  # an asynchronous copy, widened to int64 on the GPU
    assert on_gpu.is_cuda and on_gpu.dtype == torch.int64
    assert torch.equal(on_gpu.cpu(), inputs.long())


def test_activation_checkpointing_on_cuda_same_gradients_less_memory():
    cfg = ModelConfig(vocab_size=512, context_length=512, emb_dim=256, n_heads=4, n_layers=6, drop_rate=0.1)
    torch.manual_seed(0)
    model = GPTModel(cfg).to(CUDA).train()
    x = torch.randint(0, cfg.vocab_size, (8, 512), device=CUDA)
    results = {}
    for on in (False, True):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        torch.manual_seed(1)  # the same dropout masks
        loss = model(x, targets=x.roll(-1, 1), checkpoint_activations=on)
        loss.backward()
        torch.cuda.synchronize()
        results[on] = (loss.item(), [p.grad.clone() for p in model.parameters()],
                       torch.cuda.max_memory_allocated() - start)
    (loss, grads, peak), (ckpt_loss, ckpt_grads, ckpt_peak) = results[False], results[True]
    assert ckpt_loss == loss
    for a, b in zip(grads, ckpt_grads):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)  # attention backward may add in another order
    assert ckpt_peak < 0.7 * peak, (peak, ckpt_peak)


def test_running_out_of_gpu_memory_is_one_line_and_keeps_the_checkpoint(corpus_file, tmp_path):
    """A real CUDA out-of-memory: 4,096 windows of 256 tokens at once (the logits alone would take
    over 200 GB; a stride of 1 makes that many windows of the small corpus), resumed from a good
    checkpoint that must survive byte for byte."""
    out = tmp_path / "run"
    args = [str(ROOT / "train.py"), "--config", "tiny.yaml", f"--data.corpus={corpus_file}",
            f"--data.prepared_dir={tmp_path / 'prepared'}", "--model.context_length=256", "--data.stride=1",
            "--train.device=cuda", "--train.compile=false", f"--train.out_dir={out}", "--sample.max_new_tokens=1"]
    first = subprocess.run([sys.executable, *args, "--train.max_iters=2"], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    saved = (out / "latest.pt").read_bytes()
    done = subprocess.run([sys.executable, *args, "--train.max_iters=4", "--resume", "--data.batch_size=4096"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 2, done.stderr
    error = done.stderr.strip().splitlines()
    assert len(error) == 1 and "Traceback" not in done.stderr, done.stderr
    assert error[0].startswith("error: out of memory on cuda:0 during training step 3 (tried to allocate ")
    assert "batches of 4096 windows x 256 tokens" in error[0] and "--data.batch_size=2048" in error[0]
    assert f"the last checkpoint, {out / 'latest.pt'} (step 2), is kept" in error[0]
    assert (out / "latest.pt").read_bytes() == saved


# --------------------------------------------------------------------------- several GPUs

@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_with_nccl_train_like_one(corpus_file, tmp_path):
    """2 processes (NCCL), each taking half of each micro-batch, against one GPU: TF32 on in both
    (train.py's setting), so the tolerance is TF32's, not fp32's."""
    args = [str(ROOT / "train.py"), "--config", "tiny.yaml", f"--data.corpus={corpus_file}",
            f"--data.prepared_dir={tmp_path / 'prepared'}", "--model.context_length=16", "--model.drop_rate=0",
            "--train.compile=false", "--train.max_iters=6", "--train.eval_interval=2", "--sample.max_new_tokens=1"]
    prepare = subprocess.run([sys.executable, *args, "--train.max_iters=1", f"--train.out_dir={tmp_path / 'p'}"],
                             capture_output=True, text=True)
    assert prepare.returncode == 0, prepare.stderr  # the token files exist before two processes look for them
    runs = {}
    for processes in (1, 2):
        out = tmp_path / f"gpus-{processes}"
        launcher = [sys.executable] if processes == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        done = subprocess.run([*launcher, *args, f"--train.out_dir={out}"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        runs[processes] = torch.load(out / "latest.pt", weights_only=True)
    one, two = runs[1], runs[2]
    assert two["world_size"] == 2 and one["data"] == two["data"]
    assert abs(one["val_loss"] - two["val_loss"]) < 1e-3
    assert max((one["model"][k] - two["model"][k]).abs().max().item() for k in one["model"]) < 1e-3
