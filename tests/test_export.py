"""Export to Hugging Face's GPT-2 format: transformers loads it with the same logits, and so do we."""

import json

import pytest
import torch

import train
from conftest import randomised
from gpt.checkpoint import build_model, resolve_model_config
from gpt.gpt2 import export
from gpt.gpt2.hf_format import from_hf_state_dict, to_hf_state_dict
from gpt.model import GPTModel, ModelConfig

transformers = pytest.importorskip("transformers")


def max_difference(ours: GPTModel, theirs, idx: torch.Tensor) -> float:
    """Largest |difference| between our logits over the real vocabulary and transformers'."""
    with torch.no_grad():
        return (ours(idx)[..., :ours.cfg.vocab_size] - theirs(idx).logits).abs().max().item()


def test_layout_conversion_is_its_own_inverse(tiny_cfg):
    cfg = ModelConfig(**{**tiny_cfg.__dict__, "qkv_bias": True})
    state = randomised(cfg).eval().state_dict()
    back = from_hf_state_dict(to_hf_state_dict(state, cfg), cfg, "test")
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize("qkv_bias", [False, True])  # without: written as zero biases
def test_exported_model_gives_the_same_logits_in_transformers(qkv_bias, tiny_cfg, tmp_path):
    model = randomised(ModelConfig(**{**tiny_cfg.__dict__, "qkv_bias": qkv_bias})).eval()
    files = export.export_model(model, tmp_path / "hf")
    assert sorted(f.name for f in files) == ["config.json", "model.safetensors"]  # 101 tokens: no tokenizer
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert theirs.config.vocab_size == 101 and theirs.config.n_positions == tiny_cfg.context_length
    idx = torch.randint(0, 101, (2, tiny_cfg.context_length), generator=torch.Generator().manual_seed(1))
    assert max_difference(model, theirs, idx) < 1e-5


# What llama.cpp's convert_hf_to_gguf.py reads from a GPT-2 config.json (llama.cpp's conversion/gpt2.py,
# GPT2Model.set_gguf_parameters, and TextModel: the class by `architectures`, the block count, the
# vocabulary's size); OpenAI's own GPT-2 config.json has each of them.
LLAMA_CPP_GPT2_KEYS = ("architectures", "n_ctx", "n_embd", "n_head", "n_layer", "layer_norm_epsilon", "vocab_size")


def test_the_config_holds_what_llama_cpps_converter_reads(tiny_cfg, tmp_path):
    export.export_model(randomised(tiny_cfg), tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text(encoding="utf-8"))
    assert [key for key in LLAMA_CPP_GPT2_KEYS if key not in config] == []
    assert config["architectures"] == ["GPT2LMHeadModel"]  # the converter's class for it: GPT2Model
    assert config["n_ctx"] == config["n_positions"] == tiny_cfg.context_length
    assert (config["n_embd"], config["n_head"], config["n_layer"]) == (32, 4, 2)
    assert config["layer_norm_epsilon"] == 1e-5 and config["vocab_size"] == 101


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert train.main(["--config", "tiny.yaml", f"--train.out_dir={out}", "--train.max_iters=3",
                       "--train.learning_rate=3e-2", "--sample.max_new_tokens=2"]) == 0
    return out


def test_a_trained_run_round_trips(tiny_run, tmp_path, capsys):
    from gpt.checkpoint import load_model
    out = tmp_path / "hf"
    assert export.main([str(tiny_run), str(out)]) == 0
    assert f"to {out}" in capsys.readouterr().out
    ours, _ = load_model(tiny_run)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    idx = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(2))
    assert max_difference(ours, theirs, idx) < 1e-5
    back = build_model(resolve_model_config(ModelConfig(), str(out), ()), str(out)).eval()
    assert max_difference(back, theirs, idx) < 1e-5  # our own loader reads the export
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)  # GPT-2's BPE ships with it
    from gpt.tokenizer import get_tokenizer
    text = "To be, or not to be: that is the question.<|endoftext|>"
    assert tokenizer(text)["input_ids"] == get_tokenizer().encode(text, allowed_special="all")


@pytest.mark.slow
def test_a_lora_run_exports_with_its_adapters_merged(tiny_run, tmp_path):
    """A LoRA run's checkpoint holds adapters only; its export is a whole GPT-2: the base with them merged."""
    from gpt.checkpoint import load_model
    from gpt.lora import is_adapted
    lora = tmp_path / "lora"
    assert train.main(["--config", "tiny.yaml", f"--train.init_from={tiny_run}", f"--train.out_dir={lora}",
                       "--train.max_iters=2", "--train.optimizer=adamw", "--train.learning_rate=3e-2",
                       "--train.lora.rank=2", "--sample.max_new_tokens=1"]) == 0
    assert export.main([str(lora), str(tmp_path / "hf")]) == 0
    ours, base = load_model(lora)[0], load_model(tiny_run)[0]
    assert not is_adapted(ours)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(3))
    assert max_difference(ours, theirs, idx) < 1e-5
    assert max_difference(base, theirs, idx) > 1e-3  # the adapters are in it, not the bare base


def test_export_refuses_to_overwrite_without_being_asked(tiny_run, tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert export.main([str(tiny_run), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {out} is not empty; choose a new folder or pass --overwrite"
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert export.main([str(tiny_run), str(out), "--overwrite"]) == 0
    assert (out / "model.safetensors").is_file() and (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("case,message", [
    ("missing run", "no checkpoint at"),
    ("out is a file", "is a file; give a folder"),
])
def test_export_mistakes_are_one_line(case, message, tiny_run, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    argv = {"missing run": [str(tmp_path / "nowhere"), str(tmp_path / "out")],
            "out is a file": [str(tiny_run), str(tmp_path / "file")]}[case]
    assert export.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
