import math
import warnings

import pytest
import torch

from gpt.model import GPTModel, ModelConfig
from gpt.sampling import SampleConfig, continue_prompt, filter_logits, generate
from gpt.tokenizer import EOT_ID
from gpt.tools.batched import generate_rows


class Recorder(torch.nn.Module):
    """Wraps a model and records every call: (tokens given, positions covered, cached?)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.cfg, self.calls = model, model.cfg, []

    def kv_cache(self, batch):
        return self.model.kv_cache(batch)

    def forward(self, idx, cache=None):
        start = 0 if cache is None else cache.length
        self.calls.append((idx.shape[1], start + idx.shape[1], cache is not None))
        return self.model(idx, cache)

    @property
    def lengths(self):
        return [covered for _, covered, _ in self.calls]


def enabled_kernels() -> dict[str, bool]:
    """Which SDPA kernels are on now (process-wide flags, which a CPU build of torch has too)."""
    cuda = torch.backends.cuda
    return {"cudnn": cuda.cudnn_sdp_enabled(), "flash": cuda.flash_sdp_enabled(),
            "efficient": cuda.mem_efficient_sdp_enabled(), "math": cuda.math_sdp_enabled()}


def test_uncompiled_decoding_leaves_cudnn_attention_out_and_training_keeps_torch_s_choice(tiny_model, tiny_cfg,
                                                                                       monkeypatch):
    """cuDNN's attention builds a graph for each new key length, and one-token decoding makes one at every
    token: every uncompiled forward pass of a decoding (the prompt, the one-token steps, the recomputed
    windows past the context) runs with cuDNN's kernel off and the others on. The compiled step (one shape)
    and a training step, and anything after, run with them as torch has them."""
    from gpt.config import TrainConfig
    from gpt.optim import build_optimizer
    from gpt.precision import Precision
    from gpt.training import train_step
    seen = []
    tiny_model.register_forward_pre_hook(lambda module, args: seen.append(enabled_kernels()))
    before = enabled_kernels()
    assert all(before.values())  # torch's default: every kernel allowed
    prompt = torch.randint(0, tiny_cfg.vocab_size, (2, 5))
    for kv_cache in (True, False):
        generate(tiny_model.eval(), prompt, 2 * tiny_cfg.context_length, temperature=0, kv_cache=kv_cache)
    assert len(seen) == 2 * 2 * tiny_cfg.context_length
    assert all(kernels == {**before, "cudnn": False} for kernels in seen)
    assert enabled_kernels() == before  # set back after decoding
    seen.clear()
    from gpt import sampling
    monkeypatch.setattr(sampling, "compiled_decode_step", lambda device_type: sampling.decode_step)  # its seat
    generate(tiny_model, prompt, 4, temperature=0, compile=True)
    assert seen == [{**before, "cudnn": False}] + [before] * 3  # the prompt uncompiled, then the compiled step's
    seen.clear()
    cpu = torch.device("cpu")
    batch = torch.randint(0, tiny_cfg.vocab_size, (2, 2, tiny_cfg.context_length)).to(torch.uint16)
    train_step(tiny_model.train(), iter([tuple(batch)]), build_optimizer(tiny_model, TrainConfig(), cpu),
               Precision(torch.float32, cpu), TrainConfig())
    assert seen == [before]


@pytest.mark.parametrize("kv_cache", [False, True])
def test_generation_runs_past_the_context_and_crops(kv_cache, tiny_model, tiny_cfg):
    model = Recorder(tiny_model.eval())
    prompt = torch.randint(0, tiny_cfg.vocab_size, (2, 5))
    out = generate(model, prompt, max_new_tokens=3 * tiny_cfg.context_length, temperature=1.0, kv_cache=kv_cache)
    assert out.shape == (2, 5 + 3 * tiny_cfg.context_length)
    assert torch.equal(out[:, :5], prompt)
    assert max(model.lengths) == tiny_cfg.context_length  # positions never pass the context
    assert model.lengths[:3] == [5, 6, 7]
    if kv_cache:  # the prompt once, then one new token per call until the cache is full
        given = [n for n, _, cached in model.calls if cached]
        assert given == [5] + [1] * (tiny_cfg.context_length - 5)
        assert not any(cached for _, _, cached in model.calls[len(given):])  # then recomputation


@pytest.mark.parametrize("kv_cache", [False, True])
def test_prompt_longer_than_the_context(kv_cache, tiny_model, tiny_cfg):
    model = Recorder(tiny_model.eval())
    prompt = torch.randint(0, tiny_cfg.vocab_size, (1, 3 * tiny_cfg.context_length))
    out = generate(model, prompt, max_new_tokens=4, temperature=0, kv_cache=kv_cache)
    assert out.shape == (1, 3 * tiny_cfg.context_length + 4)
    assert set(model.lengths) == {tiny_cfg.context_length}
    # Greedy on the cropped prompt alone gives the same tokens: only the last tokens matter.
    cropped = generate(tiny_model, prompt[:, -tiny_cfg.context_length:], max_new_tokens=1, temperature=0)
    assert out[0, -4] == cropped[0, -1]


def test_greedy_is_deterministic_and_is_the_argmax(tiny_model, tiny_cfg):
    tiny_model.eval()
    prompt = torch.randint(0, tiny_cfg.vocab_size, (3, 4))
    a = generate(tiny_model, prompt, 10, temperature=0)
    b = generate(tiny_model, prompt, 10, temperature=0)
    assert torch.equal(a, b)
    expected = tiny_model(prompt)[:, -1].argmax(-1)
    assert torch.equal(a[:, 4], expected)


def test_same_seed_same_tokens(tiny_model, tiny_cfg):
    tiny_model.eval()
    prompt = torch.randint(0, tiny_cfg.vocab_size, (2, 4))
    run = lambda seed: generate(tiny_model, prompt, 20, temperature=1.0,
                                generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_top_k_and_top_p_filter_per_row():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0], [4.0, 3.0, 2.0, 1.0]])
    kept = filter_logits(logits, top_k=2).isfinite()
    assert kept.tolist() == [[False, True, True, False], [True, True, False, False]]
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]])
    kept = filter_logits(probs.log(), top_p=0.75).isfinite()
    assert kept.tolist() == [[True, True, False, False], [False, False, True, True]]
    # The most likely token is kept even when top_p is tiny.
    assert filter_logits(probs.log(), top_p=0.01).isfinite().sum(-1).tolist() == [1, 1]


def test_top_k_one_is_greedy(tiny_model, tiny_cfg):
    tiny_model.eval()
    prompt = torch.randint(0, tiny_cfg.vocab_size, (2, 4))
    sampled = generate(tiny_model, prompt, 8, temperature=1.5, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, generate(tiny_model, prompt, 8, temperature=0))


class Scripted(torch.nn.Module):
    """A stand-in model that emits a fixed token sequence per row."""

    def __init__(self, script, vocab=60000):
        super().__init__()
        self.script, self.vocab = script, vocab
        self.cfg = type("C", (), {"context_length": 8})()
        self.calls = 0

    def forward(self, idx):
        logits = torch.full((idx.shape[0], idx.shape[1], self.vocab), -10.0)
        for row, tokens in enumerate(self.script):
            logits[row, -1, tokens[min(self.calls, len(tokens) - 1)]] = 10.0
        self.calls += 1
        return logits


def test_end_of_text_stops_rows_independently():
    model = Scripted([[5, EOT_ID, 6, 7], [8, 9, 10, EOT_ID]])
    out = generate(model, torch.zeros(2, 1, dtype=torch.long), 10, temperature=0, eos_id=EOT_ID, kv_cache=False)
    assert out[0, 1:].tolist() == [5, EOT_ID, EOT_ID, EOT_ID]  # row 0 padded once finished
    assert out[1, 1:].tolist() == [8, 9, 10, EOT_ID]
    # Stopped when both rows finished, not after 10 steps: 4 forward passes, and the one queued
    # while the last token was read.
    assert model.calls == 5


def test_continue_prompt_streams_and_batches(tiny_model, tiny_cfg):
    torch.manual_seed(0)
    model = GPTModel(ModelConfig(context_length=16, emb_dim=16, n_heads=2, n_layers=1)).eval()
    cfg = SampleConfig(max_new_tokens=30, temperature=1.0, top_k=None, seed=3, stop_at_eot=False)
    pieces = []
    text = continue_prompt(model, "Your journey", cfg, torch.device("cpu"), write=pieces.append)
    assert len(text) == 1 and "".join(pieces) == text[0] and text[0]
    again = continue_prompt(model, "Your journey", cfg, torch.device("cpu"))
    assert again == text
    many = continue_prompt(model, "Your journey", SampleConfig(**{**cfg.__dict__, "num_samples": 3}),
                           torch.device("cpu"))
    assert len(many) == 3 and len(set(many)) > 1


def test_sample_config_validation():
    with pytest.raises(ValueError, match="prompt is empty"):
        SampleConfig(prompt="")
    with pytest.raises(ValueError, match="top_p"):
        SampleConfig(top_p=1.5)
    with pytest.raises(ValueError, match="sample.compile must be true, false or auto"):
        SampleConfig(compile="yes")


@pytest.mark.parametrize("attn_impl", ["sdpa", "explicit"])
def test_kv_cache_greedy_equals_recomputation(attn_impl, tiny_cfg):
    """Same tokens with and without the cache, batched, across the point where the cache fills up."""
    torch.manual_seed(3)
    model = GPTModel(tiny_cfg).use_attention(attn_impl).eval()
    prompt = torch.randint(0, tiny_cfg.vocab_size, (3, 4))
    steps = 2 * tiny_cfg.context_length
    cached = generate(model, prompt, steps, temperature=0, kv_cache=True)
    recomputed = generate(model, prompt, steps, temperature=0, kv_cache=False)
    assert torch.equal(cached, recomputed)
    assert len(set(cached[:, -steps:].flatten().tolist())) > 3  # not one token repeated: a real comparison


@pytest.mark.parametrize("attn_impl", ["sdpa", "explicit"])
def test_kv_cache_logits_equal_full_forward(attn_impl, tiny_cfg):
    """Feeding a sequence in pieces through the cache gives the full forward's logits: every slot is
    attended, the unfilled ones hidden by the causal mask's rows at the new positions."""
    torch.manual_seed(0)
    model = GPTModel(tiny_cfg).use_attention(attn_impl).eval()
    idx = torch.randint(0, tiny_cfg.vocab_size, (2, tiny_cfg.context_length))
    real = slice(0, tiny_cfg.vocab_size)  # padding logits are -inf in both
    full = model(idx)[..., real]
    cache = model.kv_cache(2)
    for a, b in ((0, 5), (5, 6), (6, 11), (11, 16)):
        assert torch.allclose(model(idx[:, a:b], cache)[..., real], full[:, a:b], atol=1e-5)
        cache.advance(b - a)
    assert cache.length == tiny_cfg.context_length and cache.pos.item() == tiny_cfg.context_length
    with pytest.raises(ValueError, match="holds 16 positions; 17 needed"):
        cache.advance(1)  # full: the sampler crops and recomputes instead


@pytest.mark.parametrize("attn_impl", ["sdpa", "explicit"])
def test_prompts_of_different_lengths_decode_as_one_batch_as_each_alone(attn_impl, tiny_cfg):
    """Right-padded rows of a `RowCache`: greedy, float32, each row's tokens are those it gets alone, up to
    the last position of the context, and a row that stops leaves the others as they are."""
    torch.manual_seed(3)
    model = GPTModel(tiny_cfg).use_attention(attn_impl).eval()
    with torch.no_grad():  # larger weights than the init's: varied tokens, not one repeated
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.3)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, tiny_cfg.vocab_size, (n,), generator=generator).tolist() for n in (1, 5, 9, 3, 16, 12)]
    limits = [tiny_cfg.context_length + 1 - len(p) for p in prompts[:-1]] + [2]  # to the context's end; a short one
    greedy = SampleConfig(temperature=0.0)
    alone = [generate(model, torch.tensor([p]), n, temperature=0)[0, len(p):].tolist() for p, n in zip(prompts, limits)]
    assert generate_rows(model, prompts, limits, greedy) == alone
    assert len({t for row in alone for t in row}) > 10  # a real comparison
    stop = {alone[1][2], alone[3][0]}  # rows end at their first token in `stop`, and keep it
    cut = [next((i + 1 for i, t in enumerate(row) if t in stop), len(row)) for row in alone]
    assert generate_rows(model, prompts, limits, greedy, stop=stop) == [row[:n] for row, n in zip(alone, cut)]
    assert cut[1] <= 3 and cut[3] == 1 and generate_rows(model, [], [], greedy) == []
    with pytest.raises(ValueError, match="do not fit a context of 16"):
        generate_rows(model, [[1] * 10], [8], greedy)


def test_the_cache_is_kept_between_calls_and_reset(tiny_model):
    """One cache per batch size, the same tensors at every call (what a CUDA graph replays on), emptied;
    a model moved to another dtype gets a new one."""
    first = tiny_model.kv_cache(2)
    first.advance(3)
    again = tiny_model.kv_cache(2)
    assert again is first and again.length == 0 and again.pos.item() == 0
    assert [t.data_ptr() for t in again.tensors()] == [t.data_ptr() for t in first.tensors()]
    assert tiny_model.kv_cache(3) is not first
    half = tiny_model.to(torch.bfloat16)
    assert half.kv_cache(2) is not first and half.kv_cache(2).layers[0].keys.dtype == torch.bfloat16


def test_a_second_generation_gives_the_same_tokens_on_the_kept_cache(tiny_model, tiny_cfg):
    """Stale keys from the call before lie in the future of every new position: masked, never seen."""
    tiny_model.eval()
    long = torch.randint(0, tiny_cfg.vocab_size, (2, 9))
    short = long[:, :3]
    fresh = GPTModel(tiny_model.cfg).eval()
    fresh.load_state_dict(tiny_model.state_dict())
    generate(tiny_model, long, 6, temperature=0)  # fills the cache further than the next call will
    assert torch.equal(generate(tiny_model, short, 5, temperature=0), generate(fresh, short, 5, temperature=0))


def test_the_draw_is_torch_multinomial_s():
    """The exponential race gives torch.multinomial's samples for the same generator (on the CPU; on a
    GPU the generator is the GPU's), without waiting for the device."""
    from gpt.sampling import draw
    logits = torch.randn(4, 300) * 3
    cfg = SampleConfig(temperature=0.7, top_k=None)
    for seed in range(20):
        ours = draw(logits, cfg, torch.Generator().manual_seed(seed))
        theirs = torch.multinomial(torch.softmax(logits / 0.7, -1), 1,
                                   generator=torch.Generator().manual_seed(seed)).squeeze(-1)
        assert torch.equal(ours, theirs)
    assert len({draw(logits, cfg, torch.Generator().manual_seed(s))[0].item() for s in range(20)}) > 1


def test_compile_pays_only_where_it_is_won_back():
    from gpt.sampling import COMPILE_PAYS_AFTER, compile_pays
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compile_pays(True, cpu, 1) and not compile_pays(False, cuda, math.inf)
    assert not compile_pays("auto", cpu, math.inf)  # a few percent at most on a CPU
    assert not compile_pays("auto", cuda, 1023)  # a one-shot generate.py of GPT-2: never more than its context
    assert compile_pays("auto", cuda, COMPILE_PAYS_AFTER) and compile_pays("auto", cuda, math.inf)  # chat.py


@pytest.mark.slow
def test_a_second_generation_and_a_second_chat_turn_compile_nothing_new(tiny_cfg):
    """Inductor on the CPU (CUDA graphs are CUDA's): the compiled one-token step with the kept cache,
    batched and past the context, gives recomputation's greedy tokens; a second call and another
    batch size of calls before compile no new graph (Dynamo's counters), and neither does the next
    chat turn, whose prompt is longer."""
    from torch._dynamo.utils import counters
    from gpt.chat.template import CHAT_VOCAB_SIZE, reply
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(3)
    model = GPTModel(tiny_cfg).eval()
    prompt = torch.randint(0, tiny_cfg.vocab_size, (2, 4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = generate(model, prompt, 20, temperature=0, compile=True)
        graphs = counters["stats"]["unique_graphs"]
        again = generate(model, prompt, 20, temperature=0, compile=True)
    assert not [w for w in caught if "torch.compile failed" in str(w.message)]
    assert graphs >= 1 and counters["stats"]["unique_graphs"] == graphs
    assert torch.equal(compiled, again) and torch.equal(compiled, generate(model, prompt, 20, temperature=0,
                                                                           kv_cache=False))
    short = generate(model, prompt[:, :2], 6, temperature=0, compile=True)  # over the stale slots of the last call
    assert torch.equal(short, generate(model, prompt[:, :2], 6, temperature=0, kv_cache=False))
    assert counters["stats"]["unique_graphs"] == graphs
    chat = GPTModel(ModelConfig(**{**tiny_cfg.__dict__, "vocab_size": CHAT_VOCAB_SIZE, "context_length": 64})).eval()
    cfg = SampleConfig(temperature=0, max_new_tokens=8, compile=True)
    history = [{"role": "user", "content": "Which play?"}]
    first, _, _ = reply(chat, history, cfg, torch.device("cpu"))
    assert counters["stats"]["unique_graphs"] > graphs  # another model: its own graph
    graphs = counters["stats"]["unique_graphs"]
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "And who says it?"}]
    reply(chat, history, cfg, torch.device("cpu"))
    assert counters["stats"]["unique_graphs"] == graphs


def test_a_decoding_step_that_fails_to_compile_warns_and_samples_uncompiled(tiny_cfg, monkeypatch):
    from gpt.sampling import compiled_decode_step

    def no_compiler(fn, **options):
        def broken(*args):
            raise RuntimeError("no compiler here")
        return broken
    torch.manual_seed(3)
    model = GPTModel(tiny_cfg).eval()
    prompt = torch.randint(0, tiny_cfg.vocab_size, (3, 4))
    monkeypatch.setattr(torch, "compile", no_compiler)
    compiled_decode_step.cache_clear()
    try:
        with pytest.warns(UserWarning, match="torch.compile failed .no compiler here.*sample.compile: false") as caught:
            tokens = generate(model, prompt, 8, temperature=0, compile=True)
    finally:
        compiled_decode_step.cache_clear()  # the next test compiles for real
    assert len([w for w in caught if "torch.compile failed" in str(w.message)]) == 1  # once, not at every token
    assert torch.equal(tokens, generate(model, prompt, 8, temperature=0, kv_cache=False))
