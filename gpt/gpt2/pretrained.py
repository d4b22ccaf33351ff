"""Where a model's weights start: `train.init_from` is `scratch`, a GPT-2 size, or a path.

- `scratch` (the default): a new, randomly initialised `GPTModel`.
- `gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`: OpenAI's released weights in Hugging Face's
  format (`config.json` + `model.safetensors`). Looked for in `data/gpt2-weights/<name>/`
  first (copy the two files there by hand on a machine with no network), then fetched with
  `huggingface_hub` (which reuses its own cache, so a second run downloads nothing).
- a run trained here: its folder (best.pt, else latest.pt) or a `.pt` checkpoint file; the
  architecture is the run's (a chat fine-tune starts this way: configs/shakespeare-chat.yaml).
  A LoRA run's weights are its base's with its adapters merged in (`gpt.checkpoint.load_model`), so
  a run can start from one, full or LoRA again, as long as that run's own base is still there.
  Those are read by `gpt.checkpoint` itself; this module reads GPT-2's and Hugging Face's.
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

Loading a config never touches the network or the weights. When a run starts, `gpt.checkpoint`'s
builder asks `pretrained_architecture` for the architecture (from config.json or the tensors' shapes,
none of the weights read), and `pretrained_state` for the weights, read once. This package is
imported only for those: a run from scratch or from a run trained here never loads it.
"""

import dataclasses
import json
import sys
from pathlib import Path

import torch

from gpt.config import GPT2_SIZES, SCRATCH
from gpt.downloads import DATA_DIR
from gpt.errors import UserError, first_line
from gpt.gpt2.hf_format import architecture_from_config, architecture_from_weights, from_hf_state_dict, normalise_keys
from gpt.model import ModelConfig

HF_REPO = "openai-community/{name}"  # the four sizes as OpenAI released them, on huggingface.co
WEIGHTS_DIR = DATA_DIR / "gpt2-weights"  # <name>/config.json + model.safetensors, by hand
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # in order of preference
CONFIG_FILE = "config.json"


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


def is_pretrained_source(location: str) -> bool:
    """True for a GPT-2 size name or Hugging Face-format weights, False for a run or checkpoint."""
    if location in GPT2_SIZES:
        return True
    path = Path(location).expanduser()
    if path.is_dir():
        return (path / CONFIG_FILE).is_file() or find_weights(path) is not None
    return path.is_file() and path.name.endswith((".safetensors", ".bin"))


def pretrained_architecture(init_from: str) -> dict:
    """Our architecture fields for the GPT-2 or Hugging Face weights `init_from` names, none of them read."""
    return weights_architecture(locate_weights(init_from))


def pretrained_state(init_from: str, cfg: ModelConfig) -> tuple[dict[str, torch.Tensor], int, Path]:
    """The weights `init_from` names as our state dict for `cfg`, their vocabulary size and their file
    (the one read of them)."""
    weights = locate_weights(init_from)
    hf_state = normalise_keys(read_weights(weights))
    if "wte.weight" not in hf_state:
        raise UserError(f"{weights} holds no wte tensor; it is not GPT-2 weights")
    vocab = hf_state["wte.weight"].shape[0]
    return from_hf_state_dict(hf_state, dataclasses.replace(cfg, vocab_size=vocab), str(weights)), vocab, weights
