import types

import pytest
import torch
import torch.nn.functional as F

from gpt import CausalAttention

# The seed notebook's six-token example ("Your journey starts with one step").
INPUTS = torch.tensor([
    [0.43, 0.15, 0.89], [0.55, 0.87, 0.66], [0.57, 0.85, 0.64],
    [0.22, 0.58, 0.33], [0.77, 0.25, 0.10], [0.05, 0.80, 0.55],
])
BATCH = torch.stack((INPUTS, INPUTS), dim=0)
# What the notebook printed: its masked_fill result is dropped, so no row is masked.
NOTEBOOK_OUTPUT = torch.tensor([
    [-0.5337, -0.1051], [-0.5323, -0.1080], [-0.5323, -0.1079],
    [-0.5297, -0.1076], [-0.5311, -0.1066], [-0.5299, -0.1081],
])
# The correct causal output (as chapter 3 of "LLMs from scratch" prints it).
CAUSAL_OUTPUT = torch.tensor([
    [-0.4519, 0.2216], [-0.5874, 0.0058], [-0.6300, -0.0632],
    [-0.5675, -0.0843], [-0.5526, -0.0981], [-0.5299, -0.1081],
])


def seed_module(dropout: float = 0.0) -> CausalAttention:
    torch.manual_seed(123)
    return CausalAttention(d_in=3, d_out=2, context_length=BATCH.shape[1], dropout=dropout)


def test_seed_example_is_causal_and_not_the_notebooks_output():
    ca = seed_module()
    out = ca(BATCH)
    assert out.shape == (2, 6, 2)
    assert torch.allclose(out[0], CAUSAL_OUTPUT, atol=1e-4)
    assert torch.allclose(out[1], CAUSAL_OUTPUT, atol=1e-4)
    # The notebook's printed rows differ everywhere but the last (which sees all tokens anyway).
    assert not torch.allclose(out[0, :5], NOTEBOOK_OUTPUT[:5], atol=1e-3)
    assert torch.allclose(out[0, 5], NOTEBOOK_OUTPUT[5], atol=1e-4)
    # The first token can only attend to itself: its context vector is its own value vector.
    assert torch.allclose(out[0, 0], ca.W_value(INPUTS[0]), atol=1e-6)


def test_notebook_bug_reproduced_by_dropping_the_mask():
    """The notebook's output is exactly what attention with no mask at all gives."""
    ca = seed_module()
    q, k, v = ca.W_query(BATCH), ca.W_key(BATCH), ca.W_value(BATCH)
    unmasked = torch.softmax(q @ k.transpose(1, 2) / 2 ** 0.5, dim=-1) @ v
    assert torch.allclose(unmasked[0], NOTEBOOK_OUTPUT, atol=1e-4)


def test_matches_torch_sdpa_single_and_multi_head():
    torch.manual_seed(0)
    x = torch.randn(3, 10, 24)
    for heads in (1, 4):
        ca = CausalAttention(24, 24, context_length=12, dropout=0.0, num_heads=heads, out_proj=False)
        shape = (3, 10, heads, 24 // heads)
        q, k, v = (w(x).view(shape).transpose(1, 2) for w in (ca.W_query, ca.W_key, ca.W_value))
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(3, 10, 24)
        assert torch.allclose(ca(x), ref, atol=1e-5)


def explicit_and_sdpa(*args, **kwargs) -> tuple[CausalAttention, CausalAttention]:
    """Two modules with the same weights, one per implementation."""
    explicit = CausalAttention(*args, impl="explicit", **kwargs)
    sdpa = CausalAttention(*args, impl="sdpa", **kwargs)
    sdpa.load_state_dict(explicit.state_dict())
    return explicit, sdpa


@pytest.mark.parametrize("heads,qkv_bias", [(1, False), (4, True)])
def test_sdpa_path_equals_explicit_path_outputs_and_gradients(heads, qkv_bias):
    torch.manual_seed(0)
    explicit, sdpa = explicit_and_sdpa(24, 24, 16, 0.0, qkv_bias=qkv_bias, num_heads=heads)
    x = torch.randn(3, 11, 24)
    outputs, grads = [], []
    for module in (explicit, sdpa):
        xi = x.clone().requires_grad_()
        out = module(xi)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outputs.append(out)
        grads.append([xi.grad] + [p.grad for p in module.parameters()])
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)
    assert len(grads[0]) == len(grads[1])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5)


def test_sdpa_dropout_only_in_training():
    _, sdpa = explicit_and_sdpa(8, 8, 6, 0.5, num_heads=2)
    x = torch.randn(2, 6, 8)
    sdpa.train()
    assert not torch.allclose(sdpa(x), sdpa(x))
    sdpa.eval()
    assert torch.equal(sdpa(x), sdpa(x))
    sdpa.dropout.p = 0.0
    assert torch.allclose(sdpa(x), sdpa.eval()(x))


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("impl", ["explicit", "sdpa"])
def test_cached_keys_and_values_give_the_same_output(impl, compiled):
    """Feeding the sequence in pieces through a KV cache equals one full pass, for both paths: eager
    over the filled slots, and traced by torch.compile (its eager backend: Dynamo, no compiler) over
    every slot, the stale ones left in the cache hidden by the causal mask."""
    from gpt.attention import LayerCache
    torch.manual_seed(0)
    ca = CausalAttention(8, 8, context_length=10, dropout=0.0, num_heads=2, impl=impl).eval()
    x = torch.randn(2, 10, 8)
    counts = types.SimpleNamespace(pos=torch.zeros((), dtype=torch.long), length=0)  # what gpt.model.KVCache counts
    cache = LayerCache(torch.randn(2, 2, 10, 4) * 100, torch.randn(2, 2, 10, 4) * 100, counts)  # stale slots
    attend = torch.compile(ca, backend="eager", fullgraph=True) if compiled else ca
    pieces = []
    for a, b in ((0, 4), (4, 5), (5, 8), (8, 10)):
        pieces.append(attend(x[:, a:b], cache))
        counts.length = b
        counts.pos.fill_(b)
    assert torch.allclose(torch.cat(pieces, dim=1), ca(x), atol=1e-5)


def test_one_matmul_for_queries_keys_and_values_equals_the_three_projections(monkeypatch):
    """The fast path stacks W_query, W_key, W_value into one matmul (where x has more rows than the
    stack); the same numbers (float32) and gradients as the explicit path's three, with and without
    biases."""
    stacked = []
    real_linear = F.linear
    monkeypatch.setattr(F, "linear", lambda x, w, b=None: stacked.append(w.shape) or real_linear(x, w, b))
    torch.manual_seed(0)
    x = torch.randn(3, 13, 12, requires_grad=True)  # 39 rows: more than the 36 of the stacked weights
    for bias in (False, True):
        fused = CausalAttention(12, 12, context_length=16, dropout=0.0, qkv_bias=bias, num_heads=3, impl="sdpa")
        separate = CausalAttention(12, 12, context_length=16, dropout=0.0, qkv_bias=bias, num_heads=3, impl="explicit")
        separate.load_state_dict(fused.state_dict())
        for a, b in zip(fused._project(x), separate._project(x)):
            assert torch.allclose(a, b, atol=1e-6)
        grads = []
        for module in (fused, separate):
            module(x).square().sum().backward()
            grads.append([p.grad.clone() for p in module.parameters()])
        for a, b in zip(*grads):
            assert torch.allclose(a, b, atol=1e-5)
        assert fused.state_dict().keys() == separate.state_dict().keys()  # W_query, W_key, W_value as they were
    assert (36, 12) in stacked  # the fused path did run its one matmul
    stacked.clear()
    fused(torch.randn(1, 2, 12))  # a token or two at a time (decoding): the three projections, no copy
    assert (36, 12) not in stacked


@pytest.mark.parametrize("impl", ["explicit", "sdpa"])
@pytest.mark.parametrize("mode,dropout", [("train", 0.0), ("eval", 0.5)])
def test_no_future_leak(mode, dropout, impl):
    torch.manual_seed(0)
    ca = CausalAttention(8, 8, context_length=12, dropout=dropout, num_heads=2, impl=impl)
    getattr(ca, mode)()
    x = torch.randn(2, 12, 8)
    for t in range(12):
        changed = x.clone()
        changed[:, t + 1:] = torch.randn_like(changed[:, t + 1:]) * 10
        assert torch.allclose(ca(x)[:, :t + 1], ca(changed)[:, :t + 1], atol=1e-6), t
        if t < 11:  # and the change does reach the later positions (the test can fail)
            assert not torch.allclose(ca(x)[:, t + 1:], ca(changed)[:, t + 1:])


def test_dropout_active_in_train_and_off_in_eval():
    ca = seed_module(dropout=0.5)
    ca.train()
    torch.manual_seed(1)
    first = ca(BATCH)
    torch.manual_seed(2)
    second = ca(BATCH)
    assert not torch.allclose(first, second)
    ca.eval()
    assert torch.allclose(ca(BATCH)[0], CAUSAL_OUTPUT, atol=1e-4)
    assert torch.equal(ca(BATCH), ca(BATCH))


def test_mask_is_a_non_persistent_buffer():
    ca = CausalAttention(4, 4, context_length=5, dropout=0.0)
    assert "mask" in dict(ca.named_buffers())
    assert "mask" not in ca.state_dict()
    assert ca.mask.dtype == torch.bool
    assert torch.equal(ca.mask, torch.triu(torch.ones(5, 5, dtype=torch.bool), diagonal=1))


def test_parameter_names_order_and_projection():
    single = CausalAttention(3, 2, 6, 0.0)
    assert [n for n, _ in single.named_parameters()] == ["W_query.weight", "W_key.weight", "W_value.weight"]
    multi = CausalAttention(6, 6, 6, 0.0, qkv_bias=True, num_heads=3, out_proj=True)
    names = [n for n, _ in multi.named_parameters()]
    assert names[:6] == ["W_query.weight", "W_query.bias", "W_key.weight", "W_key.bias",
                         "W_value.weight", "W_value.bias"]
    assert "out_proj.weight" in names
    assert multi(torch.randn(2, 5, 6)).shape == (2, 5, 6)


def test_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="divisible"):
        CausalAttention(8, 10, 4, 0.0, num_heads=3)
    with pytest.raises(ValueError, match="impl"):
        CausalAttention(8, 8, 4, 0.0, impl="fast")
    ca = CausalAttention(4, 4, context_length=5, dropout=0.0)
    with pytest.raises(ValueError, match="longer than context_length 5"):
        ca(torch.randn(1, 6, 4))
