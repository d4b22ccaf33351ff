import math

import pytest
import torch

from gpt import GPTModel, ModelConfig
from gpt.config import TrainConfig
from gpt.optim import build_optimizer


def test_logits_shape_and_padded_vocabulary(tiny_model, tiny_cfg):
    assert tiny_cfg.padded_vocab_size == 128  # 101 rounded up to a multiple of 64
    assert ModelConfig().padded_vocab_size == 50304
    idx = torch.randint(0, tiny_cfg.vocab_size, (3, 10))
    logits = tiny_model(idx)
    assert logits.shape == (3, 10, 128)
    # Padding ids have probability exactly 0; real tokens all have some.
    probs = torch.softmax(logits, dim=-1)
    assert torch.all(probs[..., tiny_cfg.vocab_size:] == 0)
    assert torch.all(probs[..., :tiny_cfg.vocab_size] > 0)


def test_padding_changes_nothing_but_the_shape(tiny_cfg):
    """The padded model's loss, and its gradients on real tokens, equal an unpadded model's."""
    torch.manual_seed(0)
    padded = GPTModel(tiny_cfg)
    unpadded = GPTModel(ModelConfig(**{**tiny_cfg.__dict__, "vocab_pad_multiple": 1}))
    state = padded.state_dict()
    state["tok_emb.weight"] = state["tok_emb.weight"][:tiny_cfg.vocab_size]
    state["out_head.weight"] = state["tok_emb.weight"]
    unpadded.load_state_dict(state)
    x, y = torch.randint(0, tiny_cfg.vocab_size, (2, 2, 12))
    losses = []
    for model in (padded, unpadded):
        loss = model(x, targets=y)
        loss.backward()
        losses.append(loss)
    assert torch.allclose(losses[0], losses[1], atol=1e-6)
    grad = padded.tok_emb.weight.grad
    assert torch.allclose(grad[:tiny_cfg.vocab_size], unpadded.tok_emb.weight.grad, atol=1e-6)
    assert torch.all(grad[tiny_cfg.vocab_size:] == 0)  # padding rows never learn


def test_input_longer_than_context_is_a_clear_error(tiny_model, tiny_cfg):
    idx = torch.zeros(1, tiny_cfg.context_length + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="longer than context_length 16"):
        tiny_model(idx)


@pytest.mark.parametrize("attn_impl", ["sdpa", "explicit"])
@pytest.mark.parametrize("mode,drop_rate", [("train", 0.0), ("eval", 0.3)])
def test_no_future_leak_through_the_model(mode, drop_rate, attn_impl, tiny_cfg):
    torch.manual_seed(0)
    cfg = ModelConfig(**{**tiny_cfg.__dict__, "drop_rate": drop_rate})
    model = getattr(GPTModel(cfg), mode)()
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.context_length))
    base = model(idx)
    for t in (0, 5, cfg.context_length - 2):
        changed = idx.clone()
        changed[:, t + 1:] = (changed[:, t + 1:] + 1) % cfg.vocab_size
        out = model(changed)
        assert torch.allclose(base[:, :t + 1], out[:, :t + 1], atol=1e-5)
        assert not torch.allclose(base[:, t + 1:], out[:, t + 1:], atol=1e-5)


def test_dropout_on_in_train_off_in_eval(tiny_cfg):
    torch.manual_seed(0)
    model = GPTModel(ModelConfig(**{**tiny_cfg.__dict__, "drop_rate": 0.2}))
    idx = torch.randint(0, tiny_cfg.vocab_size, (2, 8))
    model.train()
    assert not torch.allclose(model(idx), model(idx))
    model.eval()
    assert torch.equal(model(idx), model(idx))


def test_each_place_of_dropout_has_its_own_rate_and_drop_rate_sets_the_rest(tiny_cfg):
    """LLMs from Scratch's exercise 4.3: the embeddings, the attention weights and the shortcut connections."""
    cfg = ModelConfig(**{**tiny_cfg.__dict__, "drop_rate": 0.0, "drop_rate_attn": 0.1})
    model = GPTModel(cfg)
    assert model.drop_emb.p == 0.0
    assert all(block.att.dropout.p == 0.1 and block.drop_resid.p == 0.0 for block in model.trf_blocks)
    alone = GPTModel(ModelConfig(**{**tiny_cfg.__dict__, "drop_rate": 0.2}))  # as configs and checkpoints before
    assert alone.drop_emb.p == 0.2 and all(b.att.dropout.p == b.drop_resid.p == 0.2 for b in alone.trf_blocks)
    assert cfg.dropout_settings() == {"drop_rate_emb": 0.0, "drop_rate_attn": 0.1, "drop_rate_shortcut": 0.0}
    assert alone.cfg.dropout_settings() == {"drop_rate": 0.2}
    with pytest.raises(ValueError, match="model.drop_rate_shortcut must be in .0, 1. or null, got 1.5"):
        ModelConfig(drop_rate_shortcut=1.5)


def test_attention_weight_dropout_alone_changes_training_s_outputs_only(tiny_cfg):
    """Only the attention weights dropped: outputs differ between two training passes, and agree in eval."""
    torch.manual_seed(0)
    model = GPTModel(ModelConfig(**{**tiny_cfg.__dict__, "drop_rate": 0.0, "drop_rate_attn": 0.3}))
    idx = torch.randint(0, tiny_cfg.vocab_size, (2, 8))
    assert not torch.allclose(model.train()(idx), model(idx))
    assert torch.equal(model.eval()(idx), model(idx))


def test_weight_tying_and_parameter_count(tiny_model, tiny_cfg):
    assert tiny_model.out_head.weight is tiny_model.tok_emb.weight
    d, n, c = tiny_cfg.emb_dim, tiny_cfg.n_layers, tiny_cfg.context_length
    per_block = 3 * d * d + (d * d + d) + 2 * 2 * d + (d * 4 * d + 4 * d) + (4 * d * d + d)
    expected = tiny_cfg.padded_vocab_size * d + c * d + n * per_block + 2 * d
    assert tiny_model.num_parameters() == expected


def test_gpt2_initialisation():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=5000, context_length=64, emb_dim=128, n_heads=4, n_layers=8)
    model = GPTModel(cfg)
    assert abs(model.tok_emb.weight.std().item() - 0.02) < 0.002
    assert abs(model.trf_blocks[0].ff.fc.weight.std().item() - 0.02) < 0.002
    residual = 0.02 / math.sqrt(2 * cfg.n_layers)
    assert abs(model.trf_blocks[0].att.out_proj.weight.std().item() - residual) < 0.001
    assert abs(model.trf_blocks[0].ff.proj.weight.std().item() - residual) < 0.001
    assert torch.count_nonzero(model.trf_blocks[0].ff.fc.bias) == 0


def test_initial_loss_is_near_uniform(tiny_model, tiny_cfg):
    idx = torch.randint(0, tiny_cfg.vocab_size, (4, 16))
    loss = tiny_model(idx[:, :-1], targets=idx[:, 1:]).item()
    assert abs(loss - math.log(tiny_cfg.vocab_size)) < 0.3


def test_tiny_model_overfits_one_batch(tiny_model, tiny_cfg):
    torch.manual_seed(0)
    x = torch.randint(0, tiny_cfg.vocab_size, (4, 16))
    y = torch.randint(0, tiny_cfg.vocab_size, (4, 16))
    opt = build_optimizer(tiny_model, TrainConfig(learning_rate=3e-3, weight_decay=0.0), torch.device("cpu"))
    tiny_model.train()
    first = tiny_model(x, targets=y).item()
    for _ in range(150):
        loss = tiny_model(x, targets=y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 4.0
    assert loss.item() < 0.1


def test_derived_buffers_not_in_state_dict(tiny_model):
    assert not any(k.endswith(("mask", "logit_bias")) for k in tiny_model.state_dict())


def test_attention_impls_share_weights_and_logits(tiny_cfg):
    """train.attn_impl changes how attention is computed, not the checkpoint or the result."""
    torch.manual_seed(0)
    sdpa = GPTModel(tiny_cfg).eval()
    explicit = GPTModel(tiny_cfg).use_attention("explicit").eval()
    explicit.load_state_dict(sdpa.state_dict())
    idx = torch.randint(0, tiny_cfg.vocab_size, (2, tiny_cfg.context_length))
    assert torch.allclose(sdpa(idx), explicit(idx), atol=1e-5)


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(emb_dim=100, n_heads=3)
    with pytest.raises(ValueError, match="drop_rate"):
        ModelConfig(drop_rate=1.0)
    with pytest.raises(ValueError, match="attn_impl"):
        TrainConfig(attn_impl="flash")
    with pytest.raises(ValueError, match="attention impl"):
        GPTModel(ModelConfig()).use_attention("flash")


@pytest.mark.parametrize("attn_impl", ["sdpa", "explicit"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients_dropout_included(tiny_cfg, attn_impl):
    torch.manual_seed(0)
    model = GPTModel(ModelConfig(**{**tiny_cfg.__dict__, "drop_rate": 0.3})).use_attention(attn_impl).train()
    x, y = torch.randint(0, tiny_cfg.vocab_size, (2, 4, 12))
    block_calls = []
    model.trf_blocks[0].register_forward_pre_hook(lambda *args: block_calls.append(1))
    results = {}
    for on in (False, True):
        model.zero_grad()
        block_calls.clear()
        torch.manual_seed(1)
        loss = model(x, targets=y, checkpoint_activations=on)
        loss.backward()
        # The RNG moves on as it would without checkpointing: the next draw (the next step's masks) is the same.
        results[on] = (loss.detach(), [p.grad.clone() for p in model.parameters()], torch.rand(4), len(block_calls))
    (loss, grads, draw, calls), (ckpt_loss, ckpt_grads, ckpt_draw, ckpt_calls) = results[False], results[True]
    assert (calls, ckpt_calls) == (1, 2)  # with checkpointing, each block runs again in backward
    assert torch.equal(loss, ckpt_loss) and torch.equal(draw, ckpt_draw)
    assert all(torch.equal(a, b) for a, b in zip(grads, ckpt_grads))
    torch.manual_seed(2)  # dropout really acts: other masks, another loss
    assert not torch.equal(model(x, targets=y).detach(), loss)


def test_activation_checkpointing_keeps_only_the_blocks_inputs_for_backward(tiny_cfg):
    torch.manual_seed(0)
    model = GPTModel(ModelConfig(**{**tiny_cfg.__dict__, "n_layers": 4, "drop_rate": 0.1})).train()
    parameters = {p.data_ptr() for p in model.parameters()}
    x = torch.randint(0, tiny_cfg.vocab_size, (4, 16))

    def saved_activation_bytes(checkpoint_activations: bool) -> int:
        """Bytes of the non-parameter tensors autograd keeps for backward during one forward pass."""
        saved = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.data_ptr() not in parameters:
                saved[(t.data_ptr(), t.dtype, t.shape)] = t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x, targets=x, checkpoint_activations=checkpoint_activations)
        return sum(saved.values())

    stored = saved_activation_bytes(False)
    checkpointed = saved_activation_bytes(True)
    assert checkpointed < stored / 5


def loss_and_gradients(model, loss_of) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = loss_of()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_the_loss_inside_the_model_is_the_cross_entropy_of_its_logits(tiny_model, tiny_cfg):
    """forward(idx, targets=...) is F.cross_entropy on forward(idx)'s logits: the same ops, the same numbers."""
    x, y = torch.randint(0, tiny_cfg.vocab_size, (2, 3, 12))
    eager, eager_grads = loss_and_gradients(
        tiny_model, lambda: torch.nn.functional.cross_entropy(tiny_model(x).flatten(0, 1), y.flatten()))
    inside, inside_grads = loss_and_gradients(tiny_model, lambda: tiny_model(x, targets=y))
    assert torch.equal(inside, eager)
    assert all(torch.equal(a, b) for a, b in zip(inside_grads, eager_grads))
    per_token = tiny_model(x, targets=y, reduction="none")
    assert per_token.shape == (3 * 12,) and torch.allclose(per_token.mean(), eager)
    with pytest.raises(ValueError, match="targets and a KV cache"):
        tiny_model(x, tiny_model.kv_cache(3), targets=y)


@pytest.mark.slow
def test_inductor_compiles_the_loss_with_the_model_and_matches_eager(tiny_cfg):
    """fullgraph=True: the loss is in the one compiled graph (a graph break would fail). Inductor's
    CPU kernels sum in another order than eager's, so float32 agreement to ~1e-5, not bit for bit."""
    torch.manual_seed(0)
    model = GPTModel(tiny_cfg)
    compiled = torch.compile(model, fullgraph=True)  # inductor, C++ kernels on the CPU
    x, y = torch.randint(0, tiny_cfg.vocab_size, (2, 3, 12))
    eager, eager_grads = loss_and_gradients(model, lambda: model(x, targets=y))
    fused, fused_grads = loss_and_gradients(model, lambda: compiled(x, targets=y))
    assert torch.allclose(fused, eager, atol=1e-5)
    for a, b in zip(fused_grads, eager_grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    assert all(g.abs().sum() > 0 for g in eager_grads)  # every parameter got a gradient to compare
