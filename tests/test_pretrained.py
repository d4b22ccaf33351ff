"""GPT-2 weights in Hugging Face's format: loaded with the same logits, located offline, errors clear."""

import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

import generate
import train
from gpt.checkpoint import build_model, load_model, resolve_model_config
from gpt.config import load_config
from gpt.errors import UserError
from gpt.gpt2 import hf_format, pretrained
from gpt.gpt2.hf_format import architecture_from_weights
from gpt.model import ModelConfig


def load(init_from: str | Path, given=(), **fields):
    """Our model for `init_from`, in eval mode, as train.py builds it."""
    cfg = resolve_model_config(ModelConfig(**fields), str(init_from), given)
    return build_model(cfg, str(init_from)).eval()


def max_logit_difference(ours, theirs, idx: torch.Tensor) -> float:
    """Largest |difference| between our logits over the real vocabulary and transformers'."""
    with torch.no_grad():
        mine = ours(idx)[..., :ours.cfg.vocab_size]
        reference = theirs(idx).logits
    return (mine - reference).abs().max().item()


def openai_style_bin(hf_model, folder: Path) -> Path:
    """pytorch_model.bin as OpenAI's upload has it: no `transformer.` prefix, masks stored."""
    folder.mkdir()
    state = {k.removeprefix("transformer."): v for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    n = hf_model.config.n_positions
    for i in range(hf_model.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, folder / "pytorch_model.bin")
    return folder / "pytorch_model.bin"


def test_safetensors_folder_gives_transformers_logits(hf_small_vocab):
    hf_model, folder = hf_small_vocab
    ours = load(folder)
    cfg = ours.cfg
    assert (cfg.vocab_size, cfg.context_length, cfg.emb_dim, cfg.n_heads, cfg.n_layers) == (1000, 64, 32, 2, 2)
    assert cfg.qkv_bias and cfg.padded_vocab_size == 1024
    idx = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(1))
    assert max_logit_difference(ours, hf_model, idx) < 1e-5
    with torch.no_grad():
        padding = ours(idx)[..., 1000:]
    assert padding.shape[-1] == 24 and torch.all(padding == -torch.inf)
    assert torch.all(ours.tok_emb.weight[1000:] == 0)
    assert ours.out_head.weight is ours.tok_emb.weight  # still tied after loading


def test_pytorch_model_bin_in_openai_layout(hf_small_vocab, tmp_path):
    hf_model, folder = hf_small_vocab
    weights = openai_style_bin(hf_model, tmp_path / "bin")
    shutil.copy(folder / "config.json", weights.parent)
    idx = torch.randint(0, 1000, (3, 40), generator=torch.Generator().manual_seed(2))
    assert max_logit_difference(load(weights.parent), hf_model, idx) < 1e-5
    assert max_logit_difference(load(weights), hf_model, idx) < 1e-5  # the file named directly


def test_shorter_context_crops_the_position_table(hf_small_vocab):
    hf_model, folder = hf_small_vocab
    ours = load(folder, given={"context_length"}, context_length=16)
    assert ours.cfg.context_length == 16 and ours.pos_emb.weight.shape == (16, 32)
    idx = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(3))
    assert max_logit_difference(ours, hf_model, idx) < 1e-5


def test_architecture_the_config_sets_must_match_the_weights(hf_small_vocab, tmp_path):
    _, folder = hf_small_vocab
    given = {"emb_dim", "n_layers", "n_heads", "context_length"}
    with pytest.raises(UserError, match=r"sets emb_dim 64 \(the weights need 32\), n_layers 3 \(the weights "
                                        r"need 2\); remove those keys"):
        resolve_model_config(ModelConfig(emb_dim=64, n_heads=2, n_layers=3,
                                         context_length=64), str(folder), given)
    with pytest.raises(UserError, match=r"context_length 65 \(the weights need at most 64\)"):
        resolve_model_config(ModelConfig(context_length=65), str(folder), {"context_length"})
    # Fields nobody set come from the weights; matching ones and free ones are fine.
    cfg = resolve_model_config(ModelConfig(emb_dim=32, n_heads=2, drop_rate=0.3), str(folder),
                               {"emb_dim", "n_heads", "drop_rate"})
    assert (cfg.emb_dim, cfg.n_layers, cfg.context_length, cfg.drop_rate) == (32, 2, 64, 0.3)


def test_yaml_keys_count_as_set_even_at_their_default(hf_small_vocab, tmp_path):
    _, folder = hf_small_vocab
    path = tmp_path / "ft.yaml"
    path.write_text(f"model:\n  context_length: 256\ntrain:\n  init_from: {folder}\n", encoding="utf-8")
    cfg = load_config(str(path))  # loading reads no weights
    assert cfg.model.context_length == 256 == ModelConfig().context_length
    with pytest.raises(UserError, match=r"context_length 256 \(the weights need at most 64\)"):
        resolve_model_config(cfg.model, cfg.train.init_from, cfg.given_keys["model"])
    cfg = load_config(str(path), ["--model.context_length=32"])
    assert resolve_model_config(cfg.model, cfg.train.init_from, cfg.given_keys["model"]).context_length == 32


def test_bare_weights_file_is_sized_from_its_shapes(hf_small_vocab, tmp_path):
    hf_model, _ = hf_small_vocab
    weights = openai_style_bin(hf_model, tmp_path / "bare")  # no config.json beside it
    with pytest.raises(UserError, match="32 wide, not one of the released GPT-2 sizes.*config.json beside it"):
        load(weights)
    shapes = {"wte.weight": torch.zeros(50257, 768), "wpe.weight": torch.zeros(1024, 768),
              "h.0.ln_1.weight": torch.zeros(768), "h.11.ln_1.weight": torch.zeros(768),
              **{f"h.{i}.attn.c_attn.weight": torch.zeros(1) for i in range(12)}}
    assert architecture_from_weights(shapes, "x") == {
        "vocab_size": 50257, "context_length": 1024, "emb_dim": 768, "n_heads": 12, "n_layers": 12,
        "qkv_bias": True}


def test_unsupported_variants_and_bad_files(hf_small_vocab, tmp_path):
    _, folder = hf_small_vocab
    relu = tmp_path / "relu"
    shutil.copytree(folder, relu)
    config = json.loads((relu / "config.json").read_text())
    (relu / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    garbage = tmp_path / "garbage"
    shutil.copytree(folder, garbage)
    (garbage / "model.safetensors").write_bytes(b"not safetensors at all")
    cases = [
        (relu, "GPT-2 variant this model does not compute: activation_function 'relu'"),
        (tmp_path / "empty", "holds no model.safetensors or pytorch_model.bin"),
        (tmp_path / "notes.txt", "not a .safetensors or .bin weights file"),
        (tmp_path / "missing", "is not scratch, a GPT-2 size \\(gpt2, gpt2-medium, gpt2-large, gpt2-xl\\)"),
        (garbage, "cannot read weights .*model.safetensors"),
    ]
    for init_from, message in cases:
        with pytest.raises(UserError, match=message):
            load(init_from)


class Payload:
    """Unpickling this runs code (it creates a file): what weights_only=True must refuse."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_pickle_with_code_is_refused(tmp_path):
    torch.save({"wte.weight": Payload(tmp_path / "pwned")}, tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match="cannot read weights"):
        load(tmp_path / "pytorch_model.bin")
    assert not (tmp_path / "pwned").exists()


@pytest.fixture
def no_local_weights(tmp_path, monkeypatch):
    """An empty data/gpt2-weights/, so size names must be downloaded."""
    monkeypatch.setattr(pretrained, "WEIGHTS_DIR", tmp_path / "gpt2-weights")
    return tmp_path / "gpt2-weights"


def fake_hub(monkeypatch, download, cached=None):
    """Install a stand-in `huggingface_hub` module (no network is ever used)."""
    hub = types.SimpleNamespace(hf_hub_download=download,
                                try_to_load_from_cache=lambda repo, file: (cached or {}).get(file))
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)


def test_size_name_without_huggingface_hub_says_what_to_install(no_local_weights, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import now raises ImportError
    with pytest.raises(UserError, match=r"the gpt2-medium weights are not in .*gpt2-weights/gpt2-medium/; to "
                                        r"download them, pip install huggingface_hub safetensors.*or copy "
                                        r"config.json and model.safetensors from https://huggingface.co/"
                                        r"openai-community/gpt2-medium into"):
        load("gpt2-medium")


def test_size_name_offline_says_where_to_put_the_files(no_local_weights, monkeypatch):
    def offline(repo, file):
        raise ConnectionError("Failed to resolve 'huggingface.co'")
    fake_hub(monkeypatch, offline)
    with pytest.raises(UserError, match=r"could not download gpt2 from huggingface.co \(Failed to resolve "
                                        r"'huggingface.co'\); check the connection, or copy config.json and "
                                        r"model.safetensors .* into .*gpt2-weights/gpt2/"):
        load("gpt2")


def test_size_name_downloads_config_and_safetensors_only(no_local_weights, monkeypatch, hf_small_vocab):
    hf_model, folder = hf_small_vocab
    asked = []

    def download(repo, file):
        asked.append((repo, file))
        return str(folder / file)
    fake_hub(monkeypatch, download)
    idx = torch.randint(0, 1000, (1, 20), generator=torch.Generator().manual_seed(4))
    assert max_logit_difference(load("gpt2-large"), hf_model, idx) < 1e-5
    assert set(asked) == {("openai-community/gpt2-large", "config.json"),
                          ("openai-community/gpt2-large", "model.safetensors")}
    # Once in the cache, nothing is downloaded.
    fake_hub(monkeypatch, lambda repo, file: pytest.fail("downloaded again"),
             cached={f: str(folder / f) for f in ("config.json", "model.safetensors")})
    assert load("gpt2-large").cfg.emb_dim == 32


def test_size_name_found_in_the_local_folder_needs_no_hub(no_local_weights, monkeypatch, hf_small_vocab):
    _, folder = hf_small_vocab
    shutil.copytree(folder, no_local_weights / "gpt2")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    assert load("gpt2").cfg.vocab_size == 1000


def test_finetune_config_takes_gpt2_small_architecture(no_local_weights):
    gpt2_config = {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_embd": 768,
                   "n_layer": 12, "n_head": 12, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5}
    (no_local_weights / "gpt2").mkdir(parents=True)
    (no_local_weights / "gpt2" / "config.json").write_text(json.dumps(gpt2_config))
    (no_local_weights / "gpt2" / "model.safetensors").write_bytes(b"")  # resolving reads only config.json
    cfg = load_config("finetune-shakespeare.yaml")
    assert cfg.train.init_from == "gpt2"
    model_cfg = resolve_model_config(cfg.model, cfg.train.init_from, cfg.given_keys["model"])
    assert (model_cfg.vocab_size, model_cfg.emb_dim, model_cfg.n_heads, model_cfg.n_layers) == (50257, 768, 12, 12)
    assert model_cfg.qkv_bias and model_cfg.context_length <= 1024


def greedy_ids(hf_model, ids: list[int], steps: int) -> list[int]:
    """transformers' greedy continuation, one argmax at a time."""
    idx = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(steps):
            idx = torch.cat([idx, hf_model(idx).logits[:, -1:].argmax(-1)], dim=1)
    return idx[0, len(ids):].tolist()


def test_generate_samples_from_a_hugging_face_folder(hf_gpt2_vocab, capsys):
    from gpt.tokenizer import get_tokenizer
    hf_model, folder = hf_gpt2_vocab
    assert generate.main(["To be", "--checkpoint", str(folder), "--temperature", "0",
                          "--max-new-tokens", "8", "--no-stop-at-eot"]) == 0
    enc = get_tokenizer()
    expected = enc.decode(greedy_ids(hf_model, enc.encode("To be"), 8))
    assert capsys.readouterr().out == "To be" + expected + "\n"


def test_training_starts_from_the_weights(hf_gpt2_vocab, tmp_path):
    """tiny.yaml's architecture is the test model's, with context 32 of its 64 positions."""
    hf_model, folder = hf_gpt2_vocab
    out = tmp_path / "run"
    assert train.main(["--config", "tiny.yaml", f"--train.init_from={folder}", f"--train.out_dir={out}",
                       "--train.max_iters=1", "--train.learning_rate=1e-9", "--train.min_lr=0",
                       "--sample.max_new_tokens=2"]) == 0
    model, config = load_model(out)
    assert config.train.init_from == str(folder) and config.model.qkv_bias
    wpe = hf_model.transformer.wpe.weight[:32]
    assert torch.allclose(model.pos_emb.weight, wpe, atol=1e-6)  # one step at lr 1e-9


def test_training_reports_a_conflicting_architecture(hf_gpt2_vocab, tmp_path, capsys):
    _, folder = hf_gpt2_vocab
    assert train.main(["--config", "tiny.yaml", f"--train.init_from={folder}", "--model.n_layers=4",
                       f"--train.out_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: train.init_from") and "n_layers 4 (the weights need 2)" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "run").exists()


@pytest.mark.parametrize("weights_file", ["model.safetensors", "pytorch_model.bin"])
def test_the_weights_are_read_once_when_a_run_starts(hf_small_vocab, tmp_path, monkeypatch, weights_file):
    """Sizing the model (no config.json: from the tensors' shapes) reads none of the weights; building it
    reads them once, and gives the same model as reading them whole."""
    hf_model, folder = hf_small_vocab
    bare = tmp_path / "bare"
    bare.mkdir()
    if weights_file == "model.safetensors":
        shutil.copy(folder / weights_file, bare / weights_file)
    else:
        torch.save({k: v for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}, bare / weights_file)
    monkeypatch.setitem(hf_format.GPT2_HEADS, 32, 2)  # the head count of a 32-wide GPT-2, as if released
    reads = []
    real = pretrained.read_weights
    monkeypatch.setattr(pretrained, "read_weights",
                        lambda path, shapes_only=False: reads.append(shapes_only) or real(path, shapes_only))
    cfg = resolve_model_config(ModelConfig(), str(bare / weights_file), ())
    assert reads == [True] and cfg.vocab_size == 1000 and cfg.n_layers == 2
    model = build_model(cfg, str(bare / weights_file)).eval()
    assert reads == [True, False]  # one read of the weights themselves
    idx = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    assert max_logit_difference(model, hf_model, idx) < 1e-5


def test_a_bin_older_than_the_zip_format_is_sized_too(tmp_path):
    """Mapping needs torch's zip format; an older .bin is read whole for its shapes instead of refused."""
    path = tmp_path / "pytorch_model.bin"
    torch.save({"wte.weight": torch.zeros(7, 4)}, path, _use_new_zipfile_serialization=False)
    assert pretrained.read_weights(path, shapes_only=True)["wte.weight"].shape == (7, 4)
