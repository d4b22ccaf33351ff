import warnings

import pytest
import torch

from gpt.model import GPTModel, ModelConfig
from gpt.sampling import SampleConfig, continue_prompt, filter_logits, generate
from gpt.tokenizer import EOT_ID


class Recorder(torch.nn.Module):
    """Wraps a model and records every call: (tokens given, positions covered, cached?)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.cfg, self.calls = model, model.cfg, []

    def new_kv_cache(self, batch):
        return self.model.new_kv_cache(batch)

    def forward(self, idx, cache=None):
        start = 0 if cache is None else cache[0].length
        self.calls.append((idx.shape[1], start + idx.shape[1], cache is not None))
        return self.model(idx, cache)

    @property
    def lengths(self):
        return [covered for _, covered, _ in self.calls]


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
    assert model.calls == 4  # stopped when both rows finished, not after 10 steps


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


@pytest.mark.parametrize("static_cache", [False, True])
@pytest.mark.parametrize("attn_impl", ["sdpa", "explicit"])
def test_kv_cache_greedy_equals_recomputation(attn_impl, static_cache, tiny_cfg):
    """Same tokens with and without the cache (dynamic or static), batched, across the point
    where the cache fills up."""
    torch.manual_seed(3)
    model = GPTModel(ModelConfig(**{**tiny_cfg.__dict__, "attn_impl": attn_impl})).eval()
    prompt = torch.randint(0, tiny_cfg.vocab_size, (3, 4))
    steps = 2 * tiny_cfg.context_length
    cached = generate(model, prompt, steps, temperature=0, kv_cache=True, static_cache=static_cache)
    recomputed = generate(model, prompt, steps, temperature=0, kv_cache=False)
    assert torch.equal(cached, recomputed)
    assert len(set(cached[:, -steps:].flatten().tolist())) > 3  # not one token repeated: a real comparison


def test_static_kv_cache_logits_equal_full_forward(tiny_model, tiny_cfg):
    """Every slot attended, the unfilled ones masked: the full forward's logits, piece by piece."""
    tiny_model.eval()
    idx = torch.randint(0, tiny_cfg.vocab_size, (2, tiny_cfg.context_length))
    real = slice(0, tiny_cfg.vocab_size)  # padding logits are -inf in both
    full = tiny_model(idx)[..., real]
    cache = tiny_model.new_kv_cache(2, static=True)
    for a, b in ((0, 5), (5, 6), (6, 11), (11, 16)):
        assert cache[0].keys.shape[-2] == tiny_cfg.context_length  # the same shape throughout
        assert torch.allclose(tiny_model(idx[:, a:b], cache)[..., real], full[:, a:b], atol=1e-5)
        cache[0].pos.fill_(b)  # the caller advances the shared position


@pytest.mark.slow
def test_compiled_decoding_step_gives_the_same_greedy_tokens(tiny_cfg):
    """torch.compile's default mode on the CPU (CUDA graphs are CUDA's): the compiled one-token step
    with the static cache, batched, against recomputation; the position is a tensor, so one compile."""
    from gpt.sampling import compiled_decode_step
    torch.manual_seed(3)
    model = GPTModel(tiny_cfg).eval()
    prompt = torch.randint(0, tiny_cfg.vocab_size, (2, 4))
    step = compiled_decode_step(True, torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a fallback to the plain step would warn
        compiled = generate(model, prompt, 20, temperature=0, static_cache=True, step=step)
    assert torch.equal(compiled, generate(model, prompt, 20, temperature=0, kv_cache=False))


def test_a_decoding_step_that_fails_to_compile_warns_and_samples_uncompiled(tiny_cfg, monkeypatch):
    torch.manual_seed(3)
    model = GPTModel(tiny_cfg).eval()
    prompt = torch.randint(0, tiny_cfg.vocab_size, (3, 4))

    def broken(*args):
        raise RuntimeError("no compiler here")
    with pytest.warns(UserWarning, match="compiled decoding step failed .no compiler here") as caught:
        tokens = generate(model, prompt, 8, temperature=0, static_cache=True, step=broken)
    # once, not at every token (torch may warn of other things the first time it compiles)
    assert len([w for w in caught if "compiled decoding step failed" in str(w.message)]) == 1
    assert torch.equal(tokens, generate(model, prompt, 8, temperature=0, kv_cache=False))
    with pytest.raises(ValueError, match="needs the static KV cache"):
        generate(model, prompt, 2, step=broken)


def test_kv_cache_logits_equal_full_forward(tiny_model, tiny_cfg):
    """Feeding a sequence in pieces through the cache gives the full forward's logits."""
    tiny_model.eval()
    idx = torch.randint(0, tiny_cfg.vocab_size, (2, tiny_cfg.context_length))
    full = tiny_model(idx)
    cache = tiny_model.new_kv_cache(2)
    pieces = [tiny_model(idx[:, a:b], cache) for a, b in ((0, 5), (5, 6), (6, 11), (11, 16))]
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)
    with pytest.raises(ValueError, match="longer than context_length"):
        tiny_model(idx[:, :1], cache)  # full: the caller must crop and recompute
