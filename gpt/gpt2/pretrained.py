"""Where a model's weights start: `train.init_from` is `scratch`, a GPT-2 size, or a path.

- `scratch` (the default): a new, randomly initialised `GPTModel`.
- `gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`: OpenAI's released weights in Hugging Face's
  format (`config.json` + `model.safetensors`). Looked for in `data/gpt2-weights/<name>/`
  first (copy the two files there by hand on a machine with no network), then fetched with
  `huggingface_hub` (which reuses its own cache, so a second run downloads nothing).
- a run trained here: its folder (best.pt, else latest.pt) or a `.pt` checkpoint file; the
  architecture is the run's (a chat fine-tune starts this way: configs/shakespeare-chat.yaml).
  A LoRA run's weights are its base's with its adapters merged in (`load_model`), so a run can
  start from one, full or LoRA again, as long as that run's own base is still there, unchanged.
- a path: a folder holding `config.json` and `model.safetensors` or `pytorch_model.bin`
  (what `save_pretrained` and `python -m gpt export` write), or one of those weight files.
  A bare weights file with no `config.json` beside it is sized from its tensor shapes, with the
  head count of the released GPT-2 size of that width. No network is used for a path.

A size name wins over a folder of the same name; write `./gpt2` to mean the folder.

The architecture comes from the weights, so a config may leave it out. A field the config does
set (in the YAML or on the command line) must agree with the weights, or loading stops with
the list of differences; `context_length` may be smaller than the weights' `n_positions`, and
then only the first `context_length` rows of the position table are kept (positions past the
context are never looked up). `drop_rate` and `vocab_pad_multiple` are free.

Loading a config never touches the network or the weights. When a run starts,
`resolve_model_config` sizes the model from config.json or the tensors' shapes (none of the weights
read), and `build_model` reads them, once.

`load_model` (and `model_from_state`, for a checkpoint already read) is how everything that reads
a run gets its model: generate.py, chat.py, `python -m gpt evaluate`, `export` and
`attention-map`. It lives here, not in gpt/checkpoint.py, because a LoRA run (`gpt.lora`) is a
base read by `build_model` plus the adapters of its checkpoint: `lora_model` builds the base,
checks it is the one the run was tuned on (its `fingerprint`), adds the adapters, and
`model_from_state` merges them, so every reader gets a plain `GPTModel`. train.py builds a LoRA
run's model with `lora_model` too, fresh or resumed.
"""

import dataclasses
import json
import sys
from collections.abc import Collection
from pathlib import Path

import torch

from gpt.checkpoint import BEST_NAME, LATEST_NAME, checkpoint_path, load_checkpoint, load_weights
from gpt.config import Config, config_from_dict, load_config
from gpt.corpus.downloads import DATA_DIR
from gpt.errors import UserError, first_line
from gpt.gpt2.hf_format import (ARCHITECTURE_FIELDS, architecture_from_config, architecture_from_weights,
                                from_hf_state_dict, normalise_keys)
from gpt.lora import LORA_BASE, add_adapters, base_record, merge
from gpt.model import GPTModel, ModelConfig
from gpt.sampling import SampleConfig

SCRATCH = "scratch"
GPT2_SIZES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
HF_REPO = "openai-community/{name}"  # the four sizes as OpenAI released them, on huggingface.co
WEIGHTS_DIR = DATA_DIR / "gpt2-weights"  # <name>/config.json + model.safetensors, by hand
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # in order of preference
CONFIG_FILE = "config.json"
RUN_FILES = (BEST_NAME, LATEST_NAME)  # a folder holding one of these is a run trained here
DEFAULT_RUN_CONFIG = "small.yaml"  # with no --checkpoint, read the run this config writes (the quick start's)


def find_weights(folder: Path) -> Path | None:
    """The weights file in a Hugging Face model folder, safetensors first; None if none."""
    return next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)


def download_gpt2(name: str) -> Path:
    """The weights file of GPT-2 size `name`, fetched with huggingface_hub (or from its cache)."""
    local = WEIGHTS_DIR / name
    by_hand = (f"or copy config.json and model.safetensors from https://huggingface.co/"
               f"{HF_REPO.format(name=name)} into {local}/")
    try:
        import huggingface_hub
    except ImportError:
        raise UserError(f"the {name} weights are not in {local}/; to download them, pip install "
                        f"huggingface_hub safetensors (the [hf] extra), {by_hand}") from None
    repo, files = HF_REPO.format(name=name), (CONFIG_FILE, WEIGHT_FILES[0])
    cached = [huggingface_hub.try_to_load_from_cache(repo, file) for file in files]
    if all(isinstance(path, str) for path in cached):  # downloaded before: no network at all
        return Path(cached[1])
    print(f"downloading {name} weights from huggingface.co ...", file=sys.stderr)
    try:
        paths = [huggingface_hub.hf_hub_download(repo, file) for file in files]
    except Exception as e:  # offline, proxy, rate limit, missing file: the remedy is the same
        reason = first_line(e, 160)
        raise UserError(f"could not download {name} from huggingface.co ({reason}); check the "
                        f"connection, {by_hand}") from None
    return Path(paths[1])


def locate_weights(init_from: str) -> Path:
    """The weights file `train.init_from` names (a GPT-2 size or a path); never `scratch`."""
    if init_from in GPT2_SIZES:
        return find_weights(WEIGHTS_DIR / init_from) or download_gpt2(init_from)
    path = Path(init_from).expanduser()
    if path.is_dir():
        found = find_weights(path)
        if found is None:
            raise UserError(f"{path} holds no {' or '.join(WEIGHT_FILES)}; give a Hugging Face GPT-2 "
                            "model folder (save_pretrained or python -m gpt export writes one)")
        return found
    if path.is_file():
        if not path.name.endswith((".safetensors", ".bin")):
            raise UserError(f"{path} is not a .safetensors or .bin weights file; for a run trained "
                            "here, use generate.py --checkpoint")
        return path
    raise UserError(f"train.init_from {init_from!r} is not {SCRATCH}, a GPT-2 size "
                    f"({', '.join(GPT2_SIZES)}), a run folder trained here (best.pt or latest.pt) or an "
                    "existing path to Hugging Face GPT-2 weights")


def read_weights(path: Path, shapes_only: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a `.safetensors` or `pytorch_model.bin` file, read without running code.

    `shapes_only`: the tensors as their shapes (mapped from the file or meta tensors), none of the
    weights read: what sizing a model needs, before `build_model` reads them once.
    """
    if path.name.endswith(".safetensors"):
        try:
            from safetensors import safe_open
            from safetensors.torch import load_file
        except ImportError:
            raise UserError(f"reading {path} needs safetensors: pip install safetensors "
                            "(the [hf] extra)") from None

        def reader(p):
            if not shapes_only:
                return load_file(p)
            with safe_open(p, "pt") as f:
                return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    else:
        def reader(p):  # weights_only: a .bin is a pickle, and must not run code
            try:  # mapped, for the shapes: a file older than torch's zip format cannot be, and is read
                return torch.load(p, map_location="cpu", weights_only=True, mmap=shapes_only)
            except RuntimeError:
                if not shapes_only:
                    raise
                return torch.load(p, map_location="cpu", weights_only=True)
    try:
        state = reader(str(path))
    except Exception as e:  # truncated, foreign or unsafe files raise many types
        raise UserError(f"cannot read weights {path} ({first_line(e)}); it is damaged or not a weights file") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise UserError(f"{path} is not a state dict of tensors")
    return state


def weights_architecture(weights: Path) -> dict:
    """Our architecture fields for a weights file: from config.json beside it, else its shapes."""
    config_path = weights.parent / CONFIG_FILE
    if config_path.is_file():
        try:
            hf_config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise UserError(f"cannot read {config_path} ({e}); it is not a JSON config") from None
        if not isinstance(hf_config, dict):
            raise UserError(f"{config_path} is not a GPT-2 config.json")
        return architecture_from_config(hf_config, str(config_path))
    return architecture_from_weights(read_weights(weights, shapes_only=True), str(weights))


def run_checkpoint(init_from: str) -> Path | None:
    """The checkpoint of a run folder trained here (best.pt, else latest.pt) or a .pt file; None
    when `init_from` names something else (scratch, a GPT-2 size, Hugging Face weights)."""
    if init_from in GPT2_SIZES or init_from == SCRATCH:
        return None
    path = Path(init_from).expanduser()
    if path.is_dir() and any((path / name).is_file() for name in RUN_FILES):
        return checkpoint_path(path)
    if path.is_file() and path.suffix == ".pt":
        return path
    return None


def run_weights(checkpoint: Path) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """The weights of a run's checkpoint (a LoRA run's merged into its base) and their model config."""
    state = load_checkpoint(checkpoint)
    config = config_from_dict(state["config"], source=str(checkpoint))
    if config.train.lora is not None:  # adapters only: the weights are its base's with them merged in
        return model_from_state(state, checkpoint)[0].state_dict(), config.model
    return state["model"], config.model


def resolve_model_config(cfg: ModelConfig, init_from: str, given: Collection[str]) -> ModelConfig:
    """`cfg` with the architecture of the `init_from` weights; `given` are the keys the user set.

    A given architecture field must match the weights (context_length may be smaller).
    """
    if init_from == SCRATCH:
        return cfg
    run = run_checkpoint(init_from)
    if run is not None:
        run_cfg = config_from_dict(load_checkpoint(run, mmap=True)["config"], source=str(run)).model  # the weights stay unread
        wanted = {name: getattr(run_cfg, name) for name in ARCHITECTURE_FIELDS}
    else:
        wanted = weights_architecture(locate_weights(init_from))
    conflicts = []
    for name in ARCHITECTURE_FIELDS:
        if name not in given:
            continue
        value = getattr(cfg, name)
        if name == "context_length" and value <= wanted[name]:
            wanted[name] = value  # a shorter context: the position table is cropped
        elif value != wanted[name]:
            limit = "at most " if name == "context_length" else ""
            conflicts.append(f"{name} {value} (the weights need {limit}{wanted[name]})")
    if conflicts:
        raise UserError(f"train.init_from {init_from!r} brings its own architecture, but the config "
                        f"sets {', '.join(conflicts)}; remove those keys from the model section")
    return dataclasses.replace(cfg, **wanted)


def build_model(cfg: ModelConfig, init_from: str = SCRATCH) -> GPTModel:
    """A new model for `cfg` (from `resolve_model_config`): random, or with the `init_from` weights.

    `cfg.vocab_size` may exceed the weights' (a chat template's tokens, `gpt.chat.template`): the new rows
    are added by `add_token_rows`.
    """
    model = GPTModel(cfg)
    if init_from == SCRATCH:
        return model
    run = run_checkpoint(init_from)
    if run is not None:
        weights = run
        state, run_cfg = run_weights(run)
        vocab = run_cfg.vocab_size
        state = {**state, "pos_emb.weight": state["pos_emb.weight"][:cfg.context_length]}
    else:
        weights = locate_weights(init_from)
        hf_state = normalise_keys(read_weights(weights))  # the one read of the weights
        if "wte.weight" not in hf_state:
            raise UserError(f"{weights} holds no wte tensor; it is not GPT-2 weights")
        vocab = hf_state["wte.weight"].shape[0]
        state = from_hf_state_dict(hf_state, dataclasses.replace(cfg, vocab_size=vocab), str(weights))
    if vocab > cfg.vocab_size:
        raise UserError(f"train.init_from {init_from!r} has {vocab} token ids and the model {cfg.vocab_size}; "
                        "a vocabulary can grow (new tokens), not shrink")
    state = add_token_rows(state, vocab, cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).strip().splitlines()]
        detail = lines[1] if len(lines) > 1 else lines[0]  # the first specific mismatch
        raise UserError(f"the weights in {weights} do not fit their config.json ({detail[:200]})") from None
    return model


def add_token_rows(state: dict[str, torch.Tensor], vocab: int, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """`state` with its embedding (and tied head) sized for `cfg`: rows past `vocab` up to
    `cfg.vocab_size` (new tokens, e.g. a chat template's markers) start at the mean of the real
    tokens' rows, a neutral start (a zero row would give each new token the logit 0 everywhere);
    the padding rows past `cfg.vocab_size` are zero, as GPTModel keeps them."""
    rows = state["tok_emb.weight"]
    grown = torch.zeros(cfg.padded_vocab_size, rows.shape[1], dtype=rows.dtype)
    grown[:vocab] = rows[:vocab]
    grown[vocab:cfg.vocab_size] = rows[:vocab].float().mean(0).to(rows.dtype)
    state = {**state, "tok_emb.weight": grown}
    if "out_head.weight" in state:
        state["out_head.weight"] = grown  # tied
    return state


def refuse_random_base(init_from: str) -> None:
    """A UserError unless `init_from` brings weights for LoRA to freeze (not scratch)."""
    if init_from == SCRATCH:
        raise UserError("train.lora tunes adapters on pretrained weights, and train.init_from is scratch (random "
                        f"weights, which adapters cannot teach); set train.init_from to {', '.join(GPT2_SIZES)}, a "
                        "run folder or Hugging Face weights, or leave train.lora out to train every weight")


def lora_model(cfg: Config, new_rows: range, resumed: tuple[Path, dict] | None = None) -> tuple[GPTModel, dict]:
    """A LoRA run's model (`cfg.train.init_from`'s weights, frozen, with fresh adapters and trainable token
    rows `new_rows`) and the record of its base that its checkpoints keep (`gpt.lora.base_record`).

    With `resumed`, a checkpoint read from a path, the base must be the one it records: a UserError if
    it cannot be loaded or its weights changed (the adapters only mean something on their own base).
    """
    saved = resumed[1].get(LORA_BASE) if resumed is not None else None
    if resumed is not None and not (isinstance(saved, dict) and {"init_from", "sha256"} <= set(saved)):
        raise UserError(f"{resumed[0]} is a LoRA run's checkpoint without the record of its base ({LORA_BASE}); "
                        "the file was damaged or edited: use another checkpoint")
    try:
        base = build_model(cfg.model, cfg.train.init_from)
    except UserError as e:
        if resumed is None:
            raise
        raise UserError(f"{resumed[0]} holds LoRA adapters, not a whole model, and their base cannot be loaded: "
                        f"{e}") from None
    record = base_record(cfg.train.init_from, base, new_rows)
    if saved is not None and saved["sha256"] != record["sha256"]:
        raise UserError(f"{resumed[0]} holds LoRA adapters for train.init_from {saved['init_from']!r} with weights of "
                        f"sha256 {saved['sha256'][:12]}..., and {cfg.train.init_from!r} now has other weights "
                        f"(sha256 {record['sha256'][:12]}...); put back the weights the adapters were tuned on, or "
                        "fine-tune again on these")
    return add_adapters(base, cfg.train.lora, new_rows), record


def load_model(location: str | Path, device: str | torch.device = "cpu") -> tuple[GPTModel, Config]:
    """The trained model (in eval mode, on `device`) and its config, from a run dir or file."""
    path = checkpoint_path(location)
    # read on the CPU: the optimizer state need not reach the device
    return model_from_state(load_checkpoint(path), path, device)


def model_from_state(state: dict, path: Path, device: str | torch.device = "cpu") -> tuple[GPTModel, Config]:
    """The model (in eval mode, on `device`) and config of a checkpoint already read from `path`; a
    LoRA run's is its base with the adapters merged in, a plain GPTModel."""
    config = config_from_dict(state["config"], source=str(path))
    if config.train.lora is None:
        model = GPTModel(config.model)
        load_weights(model, state["model"], path)
    else:
        saved = state.get(LORA_BASE)
        rows = saved.get("new_token_rows") if isinstance(saved, dict) else None
        rows = range(*rows) if isinstance(rows, list) and len(rows) == 2 else range(0)
        model, _ = lora_model(config, rows, (path, state))
        load_weights(model, state["model"], path)
        merge(model)
    return model.to(device).eval(), config


def is_pretrained_source(location: str) -> bool:
    """True for a GPT-2 size name or Hugging Face-format weights, False for a run or checkpoint."""
    if location in GPT2_SIZES:
        return True
    path = Path(location).expanduser()
    if path.is_dir():
        return (path / CONFIG_FILE).is_file() or find_weights(path) is not None
    return path.is_file() and path.name.endswith((".safetensors", ".bin"))


def default_checkpoint() -> str:
    """The run folder generate.py and python -m gpt attention-map read when given no --checkpoint."""
    return load_config(DEFAULT_RUN_CONFIG).train.out_dir


def load_for_sampling(location: str, device: torch.device) -> tuple[GPTModel, SampleConfig, str]:
    """A model in eval mode on `device`, its sample settings (a run's, or defaults for GPT-2) and
    what it was read from."""
    if is_pretrained_source(location):
        cfg = resolve_model_config(ModelConfig(), location, given=())
        return build_model(cfg, location).to(device).eval(), SampleConfig(), location
    path = checkpoint_path(location)
    model, config = load_model(path, device)
    return model, config.sample, str(path)
