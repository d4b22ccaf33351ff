"""LoRA (gpt/lora/): the adapted model starts as its base, only the adapters and new token rows
train, merging changes no output, and a LoRA run's checkpoints hold the adapters alone, name their
base, resume exactly and load everywhere a run is read."""

import copy
import json
import signal

import pytest
import torch
from torch.nn.utils import parametrize

import chat
import generate
import train
from conftest import randomised
from gpt.checkpoint import load_checkpoint, load_model
from gpt.config import LoRAConfig, TrainConfig, load_config
from gpt.errors import UserError
from gpt.lora import LORA_BASE, LoRALinear, add_adapters, fingerprint, is_adapted, merge
from gpt.model import GPTModel, ModelConfig
from gpt.optim import build_optimizer

MERGE_TOLERANCE = 1e-5  # float32: W x + s B (A x) and (W + s B A) x round differently, by ~1e-7 here


@pytest.fixture
def cfg(tiny_cfg) -> ModelConfig:
    return ModelConfig(**{**tiny_cfg.__dict__, "qkv_bias": True})  # biases too: they must stay frozen


NEW_ROWS = range(97, 101)  # as a chat run's 4 markers past the base's vocabulary (here 97 of 101 ids)


def adapted(cfg: ModelConfig, targets=("attention", "mlp"), dropout=0.0) -> tuple[GPTModel, GPTModel]:
    """(base, a deep copy of it with adapters on `targets` and trainable NEW_ROWS)."""
    base = randomised(cfg).eval()
    model = add_adapters(copy.deepcopy(base), LoRAConfig(rank=4, alpha=8, dropout=dropout, targets=list(targets)),
                         NEW_ROWS)
    return base, model


def tokens(cfg: ModelConfig, batch: int = 8) -> torch.Tensor:
    """Enough rows (batch x context > 3 x emb_dim) for attention's fused sdpa projection to be eligible."""
    return torch.randint(0, cfg.vocab_size, (batch, cfg.context_length), generator=torch.Generator().manual_seed(1))


def train_steps(model: GPTModel, cfg: ModelConfig, steps: int = 2) -> None:
    """AdamW steps on a batch whose inputs and targets include the new token ids. Two: at the first, B = 0
    gives A no gradient (only B and the rows move); from the second every adapter does."""
    idx = tokens(cfg)
    every_third = idx[:, ::3]
    idx[:, ::3] = NEW_ROWS.start + torch.arange(every_third.numel()).view(every_third.shape) % len(NEW_ROWS)
    optimizer = build_optimizer(model, TrainConfig(optimizer="adamw", learning_rate=1e-2, weight_decay=0.0),
                                torch.device("cpu"))
    model.train()
    for _ in range(steps):
        model(idx[:, :-1], targets=idx[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def test_the_adapted_model_starts_as_its_base_exactly(cfg):
    base, model = adapted(cfg)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 6 * cfg.n_layers
    idx = tokens(cfg)
    with torch.no_grad():
        assert torch.equal(model(idx), base(idx))  # B = 0: bit for bit, new rows included


def test_only_the_adapters_and_new_rows_train_and_the_frozen_rows_do_not_move(cfg):
    base, model = adapted(cfg)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_a." in n or ".lora_b." in n or n.endswith(".rows") for n in trainable)
    optimizer = build_optimizer(model, TrainConfig(optimizer="adamw"), torch.device("cpu"))
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(trainable)  # no frozen weight in it
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    train_steps(model, cfg)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != (name in trainable), name  # what trains moved, nothing else
    weight = model.tok_emb.weight  # (padded_vocab, emb_dim): the frozen rows spliced with the new ones
    assert torch.equal(weight[:NEW_ROWS.start], base.tok_emb.weight[:NEW_ROWS.start])
    assert torch.equal(weight[NEW_ROWS.stop:], base.tok_emb.weight[NEW_ROWS.stop:])
    assert not torch.equal(weight[NEW_ROWS.start:NEW_ROWS.stop], base.tok_emb.weight[NEW_ROWS.start:NEW_ROWS.stop])
    assert torch.equal(model.out_head.weight, weight)  # the head is still tied to the embedding


@pytest.mark.parametrize("targets", [["attention"], ["W_query"], ["W_value", "ff.proj"]])
def test_the_fused_attention_projection_never_bypasses_an_adapter(cfg, targets):
    """sdpa stacks W_query, W_key and W_value into one matmul; an adapter on any of them must still act."""
    base, model = adapted(cfg, targets)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_b.weight.normal_(0, 0.3)
    explicit = copy.deepcopy(model)
    for block in explicit.trf_blocks:
        block.att.impl = "explicit"  # the chapter's three projections
    idx, real = tokens(cfg), slice(0, cfg.vocab_size)  # the padding ids' logits are -inf either way
    with torch.no_grad():
        fused = model(idx)[..., real]
        assert (fused - explicit(idx)[..., real]).abs().max() < 1e-5
        assert (fused - base(idx)[..., real]).abs().max() > 1e-2  # the adapters do act


def test_merging_changes_no_output_and_gives_a_plain_tied_model(cfg):
    _, model = adapted(cfg)
    train_steps(model, cfg)
    idx = tokens(cfg)
    with torch.no_grad():
        expected = model(idx)
        merged = merge(model)
        got = merged(idx)
    assert not is_adapted(merged) and not parametrize.is_parametrized(merged.tok_emb)
    assert merged.out_head.weight is merged.tok_emb.weight
    assert merged.state_dict().keys() == GPTModel(cfg).state_dict().keys()
    finite = expected.isfinite()  # the padding ids' logits are -inf in both
    assert torch.equal(finite, got.isfinite())
    assert (expected[finite] - got[finite]).abs().max() < MERGE_TOLERANCE


def test_the_fingerprint_names_the_weights_exactly(cfg):
    model = randomised(cfg)
    print_before = fingerprint(model)
    assert fingerprint(randomised(cfg)) == print_before
    with torch.no_grad():
        model.trf_blocks[1].ff.fc.bias[3] += 1e-6
    assert fingerprint(model) != print_before


def test_train_lora_is_read_as_a_nested_section_layer_by_layer(tmp_path):
    path = tmp_path / "lora.yaml"
    path.write_text("train:\n  optimizer: adamw\n  lora: {rank: 4, targets: [attention, ff.fc]}\n", encoding="utf-8")
    cfg = load_config(str(path), ["--train.lora.alpha=32", "--train.lora.targets=W_value"])
    assert cfg.train.lora == LoRAConfig(rank=4, alpha=32.0, targets=["W_value"])  # the file's rank kept
    assert load_config(str(path), ["--train.lora=null"]).train.lora is None
    assert load_config("tiny.yaml").train.lora is None  # absent: off
    assert LoRAConfig(targets=["mlp", "W_query"]).paths() == ["att.W_query", "ff.fc", "ff.proj"]
    for override, message in [("--train.lora.rank=many", "train.lora.rank in the command line must be int"),
                              ("--train.lora.rnak=2", "unknown key train.lora.rnak in the command line; did you "
                                                      "mean train.lora.rank?"),
                              ("--train.lora.alpha=0", "train.lora.alpha must be more than 0"),
                              ("--train.lora.dropout=1", r"train.lora.dropout must be in \[0, 1\)"),
                              ("--train.lora=8", "train.lora in the command line must be a mapping of rank, alpha")]:
        with pytest.raises(UserError, match=message):
            load_config(str(path), [override])


# --------------------------------------------------------------------------- runs

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny base run, and a LoRA run tuned on it (adapters on attention only)."""
    root = tmp_path_factory.mktemp("lora-runs")
    base, tuned = root / "base", root / "tuned"
    assert train.main(["--config", "tiny.yaml", f"--train.out_dir={base}", "--train.max_iters=2",
                       "--sample.max_new_tokens=1"]) == 0
    assert train.main(lora_args(base, tuned, "--train.max_iters=3", "--train.lora.targets=[attention]")) == 0
    return base, tuned


def lora_args(base, out, *more) -> list[str]:
    return ["--config", "tiny.yaml", f"--train.init_from={base}", f"--train.out_dir={out}", "--train.optimizer=adamw",
            "--train.lora.rank=2", "--train.learning_rate=3e-2", "--sample.max_new_tokens=1", *more]


def test_a_lora_checkpoint_holds_the_adapters_and_names_its_base(runs):
    base, tuned = runs
    for name in ("latest.pt", "best.pt"):
        state = load_checkpoint(tuned / name)
        assert state["model"] and all(".lora_a." in k or ".lora_b." in k for k in state["model"])  # no base weight
        assert state[LORA_BASE]["init_from"] == str(base)
        assert state[LORA_BASE]["sha256"] == fingerprint(load_model(base)[0])  # the base as it was loaded
    assert (tuned / "best.pt").stat().st_size < (base / "best.pt").stat().st_size / 20


def test_every_reader_gets_the_merged_model(runs, capsys):
    base, tuned = runs
    model, config = load_model(tuned)
    assert config.train.lora.targets == ["attention"] and not is_adapted(model)
    base_model = load_model(base)[0]
    with torch.no_grad():  # the adapters trained: the merged model is not its base
        assert not torch.equal(model.trf_blocks[0].att.W_query.weight, base_model.trf_blocks[0].att.W_query.weight)
    assert torch.equal(model.trf_blocks[0].ff.fc.weight, base_model.trf_blocks[0].ff.fc.weight)  # not a target
    assert generate.main(["Hi", "--checkpoint", str(tuned), "--max-new-tokens", "3"]) == 0
    assert f"sampling from {tuned / 'best.pt'}" in capsys.readouterr().err


@pytest.mark.slow
def test_a_run_can_start_from_a_lora_run(runs, tmp_path):
    """init_from a LoRA run: its base with the adapters merged, to tune fully or with new adapters."""
    _, tuned = runs
    assert train.main(lora_args(tuned, tmp_path / "again", "--train.max_iters=1")) == 0
    state = load_checkpoint(tmp_path / "again" / "latest.pt")
    assert state[LORA_BASE]["sha256"] == fingerprint(load_model(tuned)[0])


@pytest.mark.slow
def test_a_stopped_lora_chat_run_resumes_exactly_and_chats(runs, tmp_path, monkeypatch, capsys):
    """With dropout on the adapters and the model: stopped halfway and resumed, a chat LoRA run (new
    token rows trained) ends on the very adapters, rows and optimizer state of a run that never stopped."""
    from gpt.resume import StopRequest
    base, _ = runs
    corpus = tmp_path / "chats.jsonl"
    corpus.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Hi {i}"},
                                                        {"role": "assistant", "content": f"Hello {i}."}]}) + "\n"
                              for i in range(40)), encoding="utf-8")
    chat_args = ["--data.format=chat", f"--data.corpus={corpus}", f"--data.prepared_dir={tmp_path / 'prepared'}",
                 "--data.val_fraction=0.2", "--train.max_iters=12", "--train.eval_interval=3",
                 "--model.drop_rate=0.1", "--train.lora.dropout=0.1"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # both runs sum in the same order
    try:
        assert train.main(lora_args(base, tmp_path / "unbroken", *chat_args)) == 0

        class StopHalfway(StopRequest):  # as if SIGTERM came during step 6
            asked = 0

            def __call__(self) -> bool:
                StopHalfway.asked += 1
                return StopHalfway.asked == 6

        monkeypatch.setattr(train, "StopRequest", StopHalfway)
        args = lora_args(base, tmp_path / "stopped", *chat_args)
        assert train.main(args) == 128 + signal.SIGTERM
        assert train.main([*args, "--resume"]) == 0
    finally:
        torch.set_num_threads(threads)
    reference, resumed = (load_checkpoint(tmp_path / run / "latest.pt") for run in ("unbroken", "stopped"))
    assert any(name.endswith(".rows") for name in resumed["model"])  # the chat markers' rows trained
    assert reference["model"].keys() == resumed["model"].keys()
    for name, tensor in reference["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    for key, value in reference["optimizer"]["state"].items():
        for part, tensor in value.items():
            assert torch.equal(tensor, resumed["optimizer"]["state"][key][part]), (key, part)
    assert resumed["val_loss"] == reference["val_loss"] and resumed["step"] == 12
    tuned, base_model = load_model(tmp_path / "stopped")[0], load_model(base)[0]
    assert torch.equal(tuned.tok_emb.weight[:50257], base_model.tok_emb.weight[:50257])  # GPT-2's rows frozen
    capsys.readouterr()
    assert chat.main(["--checkpoint", str(tmp_path / "stopped"), "--prompt", "Hi 3", "--max-new-tokens", "4"]) == 0
