"""Checkpoints, and the one place models are built and loaded.

A run folder holds `latest.pt` (everything an exact resume needs, `gpt.resume`) and `best.pt`
(weights, config and losses, for sampling). Both are plain dicts: the un-compiled model's
`state_dict` and the config as plain data; a model with frozen weights (a LoRA run's) saves only
what trains. A file is written to a temporary file, fsynced and moved into place, so a crash at any
moment leaves the previous checkpoint whole; it is read with `torch.load(..., weights_only=True)`,
which refuses to run code hidden in a pickle.

`run_model` makes the model a run trains, `build_model` its first weights: random (`train.init_from:
scratch`), a run trained here, or GPT-2's (`gpt.gpt2`, imported only then); with `train.lora`, a
frozen base with adapters (`gpt.lora`, imported only then). A resumed run is built the same way, its weights left
for the checkpoint to fill. `load_model` is how everything that reads a run gets its model:
generate.py, chat.py, `python -m gpt evaluate`, `export`, `attention-map`: a plain `GPTModel`, a LoRA
run's adapters merged in.
"""

import dataclasses
import os
import pickle
import re
import warnings
from pathlib import Path

import torch

from gpt.config import Config, GPT2_SIZES, SCRATCH, TrainConfig, config_from_dict
from gpt.errors import UserError
from gpt.model import ARCHITECTURE_FIELDS, GPTModel, ModelConfig

LATEST_NAME = "latest.pt"
BEST_NAME = "best.pt"


def save_checkpoint(path: Path, state: dict) -> None:
    """Write `state` to `path` atomically (temporary file, fsync, rename); any failure keeps the old one."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)  # make the rename itself survive a power cut
    except OSError as e:
        tmp.unlink(missing_ok=True)
        previous = "the previous checkpoint is kept" if path.exists() else "nothing was saved"
        raise UserError(f"cannot write checkpoint {path} ({e.strerror or e}); {previous}; "
                        "free some disk space or choose another train.out_dir") from None
    except BaseException:  # interrupted (a second Ctrl-C): the previous checkpoint is whole
        tmp.unlink(missing_ok=True)
        raise


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on every platform (Windows); the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def run_checkpoints(out_dir: Path) -> list[Path]:
    """The checkpoints (latest.pt, best.pt) that a run folder holds."""
    return [p for p in (out_dir / LATEST_NAME, out_dir / BEST_NAME) if p.is_file()]


def checkpoint_path(location: str | Path) -> Path:
    """The checkpoint to sample from: a file as given, or a run folder's best.pt, else latest.pt."""
    path = Path(location).expanduser()
    if path.is_dir():
        candidates = [path / BEST_NAME, path / LATEST_NAME]
        path = next((p for p in candidates if p.is_file()), path)
        if path.is_dir():
            raise UserError(f"no checkpoint in {path} (looked for {BEST_NAME} and {LATEST_NAME}); train one "
                            "first (python train.py --config small.yaml) or pass --checkpoint RUN_DIR")
    if not path.is_file():
        raise UserError(
            f"no checkpoint at {path}; train one first (python train.py --config small.yaml) "
            "or pass --checkpoint RUN_DIR"
        )
    return path


def load_checkpoint(path: Path, device: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """The checkpoint dict at `path`, read safely; clear errors for files that are not one.

    `mmap`: the tensors are mapped from the file, read only where used (to read a checkpoint's config)."""
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickles on stderr: say it once
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises many types for truncated, foreign or unsafe files
        raise _unreadable(path, e) from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise UserError(f"{path} is not a checkpoint written by train.py")
    return state


def _unreadable(path: Path, e: Exception) -> UserError:
    """What went wrong reading `path`, in one line: unsafe, foreign, or truncated/damaged."""
    text = str(e)
    unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if unsafe:
        return UserError(f"cannot read checkpoint {path}: unpickling it would call {unsafe.group(1)}, and a "
                         "checkpoint written by train.py never runs code; refused, nothing was run. Use a "
                         "checkpoint you trust")
    if isinstance(e, pickle.UnpicklingError):
        return UserError(f"cannot read checkpoint {path}: it is not a PyTorch checkpoint; give a latest.pt "
                         "or best.pt written by train.py")
    reason = text.split(". ")[0].strip() or "the file is empty"
    return UserError(f"cannot read checkpoint {path}: it is truncated or damaged ({reason[:120]}); use "
                     "another checkpoint or train again")


def is_frozen_in_part(model: torch.nn.Module) -> bool:
    """True when some weights of `model` do not train (a LoRA run's base): its checkpoints hold the rest."""
    return any(not p.requires_grad for p in model.parameters())


def model_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights a checkpoint holds: the model's whole `state_dict`, or for a model frozen in part
    (a LoRA run's) only what trains, its adapters and new token rows (the base is named beside them)."""
    if is_frozen_in_part(model):
        return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    return model.state_dict()


def load_weights(model: torch.nn.Module, weights: dict, path: Path) -> None:
    """Copy a checkpoint's weights (`model_weights`) into `model`; a UserError if they do not fit it."""
    try:
        if is_frozen_in_part(model):  # what trains, by name; the frozen base is not in `weights`
            wanted = {name for name, p in model.named_parameters() if p.requires_grad}
            missing, unexpected = sorted(wanted - set(weights)), sorted(set(weights) - wanted)
            if missing or unexpected:
                raise RuntimeError("the adapters differ:\n" + (f'missing "{missing[0]}"' if missing
                                                                else f'unexpected "{unexpected[0]}"'))
            model.load_state_dict(weights, strict=False)  # a wrong shape still raises
        else:
            model.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as e:
        lines = [line.strip() for line in str(e).strip().splitlines()] or [type(e).__name__]
        detail = lines[1] if len(lines) > 1 else lines[0]  # the first specific mismatch
        raise UserError(f"the weights in {path} do not fit the model its config describes ({detail[:200]}); "
                        "the file was damaged or edited: use another checkpoint") from None


def config_differences(saved: dict, requested: dict, prefix: str) -> list[str]:
    """`prefix.key: checkpoint A, config B` for every key whose value differs."""
    return [f"{prefix}.{key}: checkpoint {saved.get(key)!r}, config {requested.get(key)!r}"
            for key in sorted(set(saved) | set(requested), key=str) if saved.get(key) != requested.get(key)]


# --------------------------------------------------------------------------- building and loading models

def run_checkpoint(location: str) -> Path | None:
    """The checkpoint of a run folder trained here (best.pt, else latest.pt) or a .pt file; None when
    `location` names something else (scratch, a GPT-2 size, Hugging Face weights: a size name wins over
    a folder of the same name)."""
    if location in GPT2_SIZES or location == SCRATCH:
        return None
    path = Path(location).expanduser()
    if path.is_dir() and any((path / name).is_file() for name in (BEST_NAME, LATEST_NAME)):
        return checkpoint_path(path)
    if path.is_file() and path.suffix == ".pt":
        return path
    return None


def resolve_model_config(cfg: ModelConfig, init_from: str, given: set[str] | tuple = ()) -> ModelConfig:
    """`cfg` with the architecture of the `init_from` weights; `given` are the keys the user set.

    A given architecture field must match the weights (context_length may be smaller). Nothing is read
    but a run's config or a weights file's config.json or shapes.
    """
    if init_from == SCRATCH:
        return cfg
    run = run_checkpoint(init_from)
    if run is not None:
        run_cfg = config_from_dict(load_checkpoint(run, mmap=True)["config"], source=str(run)).model  # weights unread
        wanted = {name: getattr(run_cfg, name) for name in ARCHITECTURE_FIELDS}
    else:
        from gpt.gpt2.pretrained import pretrained_architecture
        wanted = pretrained_architecture(init_from)
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


def run_model(cfg: ModelConfig, run: TrainConfig, new_rows: range = range(0),
                resumed: tuple[Path, dict] | None = None) -> tuple[GPTModel, dict]:
    """The model a run trains, on the CPU, and what its checkpoints record of it beyond the weights.

    `cfg` is settled (`resolve_model_config`, and a data format's tokens). Full training: `run.init_from`'s
    weights (or random ones); resumed, its weights are left for the checkpoint to fill, so GPT-2's need
    not be read. With `run.lora`: the frozen base and fresh adapters (and trainable `new_rows`), the base
    checked against a resumed run's record of it (`gpt.lora.lora_model`).
    """
    if run.lora is None:
        return (GPTModel(cfg) if resumed is not None else build_model(cfg, run.init_from)), {}
    from gpt.lora import LORA_BASE, lora_model
    model, base = lora_model(run, lambda: build_model(cfg, run.init_from), new_rows, resumed)
    return model, {LORA_BASE: base}


def lora_line(model: GPTModel, run: TrainConfig) -> list[str]:
    """A LoRA run's line on its adapters (`gpt.lora.adapters_line`); none for full training."""
    if run.lora is None:
        return []
    from gpt.lora import adapters_line
    return [adapters_line(model, run.lora)]


def build_model(cfg: ModelConfig, init_from: str = SCRATCH) -> GPTModel:
    """A new model for `cfg` (from `resolve_model_config`): random, or with the `init_from` weights.

    `cfg.vocab_size` may exceed the weights' (a chat template's tokens): the new rows are added by
    `add_token_rows`.
    """
    model = GPTModel(cfg)
    if init_from == SCRATCH:
        return model
    run = run_checkpoint(init_from)
    if run is not None:
        weights, trained = run, load_model(run)[0]
        state, vocab = trained.state_dict(), trained.cfg.vocab_size
        state = {**state, "pos_emb.weight": state["pos_emb.weight"][:cfg.context_length]}
    else:
        from gpt.gpt2.pretrained import pretrained_state
        state, vocab, weights = pretrained_state(init_from, cfg)
    if vocab > cfg.vocab_size:
        raise UserError(f"train.init_from {init_from!r} has {vocab} token ids and the model {cfg.vocab_size}; "
                        "a vocabulary can grow (new tokens), not shrink")
    try:
        model.load_state_dict(add_token_rows(state, vocab, cfg))
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


def load_model(location: str | Path, device: str | torch.device = "cpu") -> tuple[GPTModel, Config]:
    """The trained model (in eval mode, on `device`) and its config, from a run folder or checkpoint file."""
    path = checkpoint_path(location)
    return model_from_state(load_checkpoint(path), path, device)  # read on the CPU: no optimizer state on the device


def model_from_state(state: dict, path: Path, device: str | torch.device = "cpu") -> tuple[GPTModel, Config]:
    """The model (in eval mode, on `device`) and config of a checkpoint already read from `path`; a
    LoRA run's is its base with the adapters merged in, a plain GPTModel."""
    config = config_from_dict(state["config"], source=str(path))
    if config.train.lora is None:
        model = GPTModel(config.model)
        load_weights(model, state["model"], path)
    else:
        from gpt.lora import merged_model
        model = merged_model(config.train, lambda: build_model(config.model, config.train.init_from), state,
                             path, load_weights)
    return model.to(device).eval(), config


