"""Saving and loading checkpoints: a run folder's `latest.pt` (everything an exact resume needs,
`gpt.resume`) and `best.pt` (weights, config and losses, for sampling).

Both are plain dicts: the un-compiled model's `state_dict` (a LoRA run's adapters only) and the config
as plain data. A file is written to a temporary file, fsynced and moved into place, so a crash at
any moment leaves the previous checkpoint whole; it is read with `torch.load(..., weights_only=True)`,
which refuses to run code hidden in a pickle.
"""

import os
import pickle
import re
import warnings
from pathlib import Path

import torch

from gpt.errors import UserError
from gpt.lora import is_adapted, load_trainable_state, trainable_state

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


def model_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights a checkpoint holds: the model's whole `state_dict`, or for a LoRA model (`gpt.lora`)
    only what trains, its adapters and new token rows (the base is named beside them, not copied)."""
    return trainable_state(model) if is_adapted(model) else model.state_dict()


def load_weights(model: torch.nn.Module, weights: dict, path: Path) -> None:
    """Copy a checkpoint's weights (`model_weights`) into `model`; a UserError if they do not fit it."""
    try:
        if is_adapted(model):
            load_trainable_state(model, weights)
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
