"""Saving and loading runs.

A checkpoint is a plain dict: the model's `state_dict` (always from the un-compiled module,
so no `_orig_mod.` prefixes), the optimizer's state, the whole config as plain data, the step
and the best validation loss. It is written to a temporary file and moved into place with
`os.replace`, so a crash while saving leaves the previous checkpoint intact. It is read with
`torch.load(..., weights_only=True)`, which refuses to run code hidden in a pickle.
"""

import os
from pathlib import Path

import torch

from gpt.config import Config, config_from_dict
from gpt.errors import UserError
from gpt.model import GPTModel

CHECKPOINT_NAME = "ckpt.pt"


def save_checkpoint(path: Path, state: dict) -> None:
    """Write `state` to `path` atomically (temporary file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_path(location: str | Path) -> Path:
    """The checkpoint file for a run folder or a file path; a UserError if there is none."""
    path = Path(location).expanduser()
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise UserError(
            f"no checkpoint at {path}; train one first (python train.py --config small.yaml) "
            "or pass --checkpoint RUN_DIR"
        )
    return path


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> dict:
    """The checkpoint dict at `path`, read safely; clear errors for files that are not one."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises many types for truncated, foreign or unsafe files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read checkpoint {path} ({reason[:200]}); it is damaged or not a checkpoint") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise UserError(f"{path} is not a checkpoint written by train.py")
    return state


def load_model(location: str | Path, device: str | torch.device = "cpu") -> tuple[GPTModel, Config]:
    """The trained model (in eval mode, on `device`) and its config, from a run dir or file."""
    path = checkpoint_path(location)
    state = load_checkpoint(path)  # on the CPU: the optimizer state need not reach the device
    config = config_from_dict(state["config"], source=str(path))
    model = GPTModel(config.model)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).strip().splitlines()]
        detail = lines[1] if len(lines) > 1 else lines[0]  # the first specific mismatch
        raise UserError(f"the weights in {path} do not fit the model its config describes ({detail[:200]})") from None
    return model.to(device).eval(), config
