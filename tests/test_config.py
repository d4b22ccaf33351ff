
from dataclasses import asdict
import pytest

from gpt.config import CONFIG_DIR, Config, config_from_dict, load_config, parse_overrides
from gpt.errors import UserError
from gpt.model import GPTModel


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_loads_and_builds(path):
    cfg = load_config(str(path))
    assert cfg.model.emb_dim % cfg.model.n_heads == 0
    # Building the model validates the architecture; skip the big one's weights.
    if cfg.model.emb_dim * cfg.model.n_layers <= 4096:
        assert GPTModel(cfg.model).num_parameters() > 0


def test_expected_configs_exist():
    names = {p.name for p in CONFIG_DIR.glob("*.yaml")}
    assert {"small.yaml", "tiny.yaml", "gpt2-124m.yaml"} <= names
    gpt2 = load_config("gpt2-124m.yaml").model
    assert (gpt2.n_layers, gpt2.n_heads, gpt2.emb_dim, gpt2.context_length) == (12, 12, 768, 1024)


def test_pretraining_runs_without_dropout_and_fine_tuning_keeps_it():
    assert load_config("gpt2-124m.yaml").model.drop_rate == 0.0  # as nanoGPT, modded-nanogpt, nanochat
    assert load_config("finetune-shakespeare.yaml").model.drop_rate > 0


def test_a_checkpoint_written_with_drop_rate_alone_keeps_its_meaning():
    """Written before the three places had their own keys: its drop_rate still sets all three."""
    old = asdict(load_config("tiny.yaml"))
    old["model"] = {k: v for k, v in old["model"].items() if not k.startswith("drop_rate_")} | {"drop_rate": 0.2}
    model = config_from_dict(old).model
    assert [model.dropout(place) for place in ("emb", "attn", "shortcut")] == [0.2, 0.2, 0.2]


def test_the_quick_start_trains_with_the_seed_s_dropout_on_the_attention_weights():
    small = load_config("small.yaml").model
    assert small.dropout("attn") == 0.1 and small.dropout("emb") == small.dropout("shortcut") == 0.0
    overridden = load_config("small.yaml", ["--model.drop_rate_attn=null", "--model.drop_rate=0.2"]).model
    assert [overridden.dropout(place) for place in ("emb", "attn", "shortcut")] == [0.2, 0.2, 0.2]


def test_name_is_looked_up_in_configs():
    assert load_config("tiny.yaml").train.out_dir == "runs/tiny"


def write(tmp_path, text) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_yaml_only_sets_what_differs(tmp_path):
    cfg = load_config(write(tmp_path, "model:\n  n_layers: 3\ntrain:\n  learning_rate: 1e-3\n"))
    assert cfg.model.n_layers == 3
    assert cfg.train.learning_rate == 1e-3  # YAML 1.1 reads 1e-3 as text; accepted as a number
    assert cfg.model.emb_dim == 384  # default kept


@pytest.mark.parametrize("text,message", [
    ("model:\n  n_layer: 3\n", r"unknown key model.n_layer in .*cfg.yaml; did you mean model.n_layers"),
    ("modle:\n  n_layers: 3\n", r"unknown section 'modle' in .*cfg.yaml"),
    ("model:\n  n_layers: three\n", r"model.n_layers in .*cfg.yaml must be int, got 'three'"),
    ("model:\n  n_layers: 2.5\n", r"model.n_layers .* must be int"),
    ("train:\n  learning_rate: fast\n", r"train.learning_rate .* must be float"),
    ("data:\n  stride: []\n", r"data.stride .* must be int or null"),
    ("model:\n  qkv_bias: 1\n", r"model.qkv_bias .* must be bool"),
    ("model: [1, 2]\n", r"section 'model' in .* must be a mapping"),
    ("- a\n- b\n", r"must be a mapping of sections"),
    ("model:\n  n_layers: [\n", r"not valid YAML at line"),
    ("model:\n  emb_dim: 100\n  n_heads: 3\n", r"emb_dim \(100\) must be divisible .*cfg.yaml"),
])
def test_bad_config_files(tmp_path, text, message):
    with pytest.raises(UserError, match=message):
        load_config(write(tmp_path, text))


def test_missing_config_names_the_folder():
    with pytest.raises(UserError, match="config 'nope.yaml' not found.*available: .*small.yaml"):
        load_config("nope.yaml")


def test_command_line_overrides():
    cfg = load_config("tiny.yaml", ["--train.max_iters=3", "--model.drop_rate", "0.2",
                                    "--data.corpus=2024", "--data.stride=null"])
    assert cfg.train.max_iters == 3
    assert cfg.model.drop_rate == 0.2
    assert cfg.data.corpus == "2024"  # a str field keeps the text as typed
    assert cfg.data.stride is None


@pytest.mark.parametrize("override,message", [
    ("--train.max_iter=3", "unknown key train.max_iter in the command line; did you mean train.max_iters"),
    ("--trian.max_iters=3", "unknown section"),
    ("--max_iters=3", "write it as --section.key=value"),
    ("small.yaml", "unexpected argument 'small.yaml'.*after --config"),
    ("--train.max_iters=lots", "train.max_iters in the command line must be int"),
    ("--train.max_iters=0", "train.max_iters must be at least 1"),
])
def test_bad_overrides(override, message):
    with pytest.raises(UserError, match=message):
        load_config("tiny.yaml", [override])


def test_parse_overrides_shape():
    assert parse_overrides(["--model.n_layers=2", "--sample.prompt", "Hi there"]) == {
        "model": {"n_layers": 2}, "sample": {"prompt": "Hi there"}}


def test_round_trip_through_plain_data():
    cfg = load_config("small.yaml")
    assert config_from_dict(asdict(cfg)) == cfg
    with pytest.raises(UserError, match="unknown key model.extra in checkpoint"):
        config_from_dict({"model": {"extra": 1}})


def test_a_checkpoint_written_with_the_run_settings_in_model_still_loads():
    """Before init_from and attn_impl moved to the train section, checkpoints stored them in model."""
    old = asdict(Config())
    old["model"] |= {"init_from": "runs/small", "attn_impl": "explicit"}
    del old["train"]["init_from"], old["train"]["attn_impl"]
    cfg = config_from_dict(old)
    assert (cfg.train.init_from, cfg.train.attn_impl) == ("runs/small", "explicit")
    with pytest.raises(UserError, match="model.attn_impl in the command line is a setting of the run"):
        load_config("tiny.yaml", ["--model.attn_impl=explicit"])
