"""Stopping a run at any moment and continuing it exactly.

`latest.pt` holds everything that decides what happens next: the weights, the optimizer, the
loop's `TrainState`, the GradScaler, the data position and every RNG's state (each process's, under
torchrun), all as tensors and plain data that `torch.load(..., weights_only=True)` reads. Restoring
is load, then apply: train.py builds the run as a fresh one would, then `restore_run` fills it.
`RunCheckpoints` is where the loop saves, and turns a stop the loop raises (a NaN, running out of
memory) into one line naming the last good checkpoint; `StopRequest` turns SIGINT and SIGTERM into
a request the loop honours after its step.
"""

import contextlib
import dataclasses
import os
import random
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from gpt.checkpoint import (BEST_NAME, LATEST_NAME, config_differences, load_checkpoint, load_weights, model_weights,
                            run_checkpoints, save_checkpoint)
from gpt.config import Config, config_from_dict
from gpt.data import TrainBatches
from gpt.distributed import Distributed, SINGLE, plural
from gpt.errors import UserError, first_line
from gpt.training import NonFiniteLoss, OutOfMemory, Run, TrainState

# What latest.pt holds beyond the weights and config; best.pt (weights only) lacks these.
RESUME_KEYS = ("optimizer", "scaler", "data", "rng", *(f.name for f in dataclasses.fields(TrainState)))
RANK_SEED_STRIDE = 1_000_003  # rank r > 0 of a run seeds with seed + r * this (`seed_run`)


# --------------------------------------------------------------------------- RNG states

def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's RNGs (torch's seeds every CUDA device too)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_run(seed: int, rank: int = 0, step: int = 0) -> None:
    """Seed every RNG of process `rank` of a run that starts (or resumes) at `step`: the one place a run
    seeds them. Rank 0's seed is `seed` itself, so one process is unaffected; the others draw other
    dropout masks. A resumed process then gets its saved RNG states back where it has them (`restore_run`)."""
    seed_everything(seed + rank * RANK_SEED_STRIDE + step if rank else seed)


def rng_state() -> dict:
    """Every RNG's state as tensors, numbers and lists (NumPy's key array becomes a tensor)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
        # Only once CUDA is in use: before that nothing has drawn from it (and asking would start it).
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "mps": torch.mps.get_rng_state() if torch.backends.mps.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    """Put every RNG back where `rng_state` found it (GPU states only where that GPU exists)."""
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state((numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)
    if state.get("mps") is not None and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])


# --------------------------------------------------------------------------- checkpoints

def training_checkpoint(run: Run, batches: TrainBatches, cfg: Config, rank_rngs: list[dict] | None = None) -> dict:
    """What latest.pt holds: everything an exact resume needs.

    `rank_rngs` holds every process's `rng_state()` in rank order (default: this process's).
    """
    rank_rngs = rank_rngs or [rng_state()]
    scaler = run.precision.scaler
    return {
        "model": model_weights(run.model),  # a LoRA run's: its adapters only
        "optimizer": run.optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
        "config": dataclasses.asdict(cfg),
        **dataclasses.asdict(run.state),
        "data": batches.state_dict(),
        "rng": rank_rngs[0],
        "rank_rng": rank_rngs[1:],  # ranks 1, 2, ... of a run with several processes
        "world_size": len(rank_rngs),
    }


def best_checkpoint(run: Run, cfg: Config) -> dict:
    """What best.pt holds: the weights, the config and the losses, for sampling."""
    return {"model": model_weights(run.model), "config": dataclasses.asdict(cfg), **dataclasses.asdict(run.state)}


def checkpoint_to_resume(out_dir: Path, resume: bool, overwrite: bool) -> Path | None:
    """latest.pt when resuming; None for a fresh run, which may not replace a run unasked."""
    if resume:
        latest = out_dir / LATEST_NAME
        if not latest.is_file():
            raise UserError(f"--resume: there is no {LATEST_NAME} in {out_dir} to continue; "
                            "start a fresh run without --resume")
        return latest
    existing = run_checkpoints(out_dir)
    if existing and not overwrite:
        names = " and ".join(p.name for p in existing)
        raise UserError(f"{out_dir} already holds a run ({names}); continue it with --resume, "
                        "replace it with --overwrite, or set train.out_dir to another folder")
    return None


def check_resumable(checkpoint: dict, path: Path, cfg: Config) -> list[str]:
    """Refuse a checkpoint that cannot continue into `cfg`; return the other settings that changed."""
    missing = [key for key in RESUME_KEYS if key not in checkpoint]
    if missing:
        raise UserError(f"{path} cannot be resumed: it has no {', '.join(missing)} "
                        f"(only {LATEST_NAME} files written by train.py can); start again with --overwrite")
    saved = dataclasses.asdict(config_from_dict(checkpoint["config"], source=str(path)))
    requested = dataclasses.asdict(cfg)
    model_changes = config_differences(saved["model"], requested["model"], "model")
    if model_changes:
        raise UserError(f"{path} holds another model than the config asks for "
                        f"({'; '.join(model_changes)}); resume with the checkpoint's model settings, "
                        "or start a new run with --overwrite or another train.out_dir")
    if saved["train"]["lora"] != requested["train"]["lora"]:  # other adapters: the saved ones fit no longer
        def lora(values: dict | None) -> str:
            return "none (full fine-tuning)" if values is None else ", ".join(f"{k} {v}" for k, v in values.items())
        raise UserError(f"{path} was trained with train.lora {lora(saved['train']['lora'])} and the config asks for "
                        f"{lora(requested['train']['lora'])}; resume with the run's train.lora, or start a new run "
                        "with --overwrite or another train.out_dir")
    saved_optimizer = saved_optimizer_name(checkpoint)
    if saved_optimizer != cfg.train.optimizer:
        raise UserError(f"{path} was trained with train.optimizer {saved_optimizer} and the config asks for "
                        f"{cfg.train.optimizer}: its optimizer state cannot carry over; resume with "
                        f"--train.optimizer={saved_optimizer}, or start a new run with --overwrite or another "
                        "train.out_dir")
    step = checkpoint["step"]
    if not isinstance(step, int) or step < 0:
        raise UserError(f"{path} is damaged (its step is {step!r}); start again with --overwrite")
    if step >= cfg.train.max_iters:
        raise UserError(f"the run in {path.parent} is already at step {step} and train.max_iters "
                        f"is {cfg.train.max_iters}; raise it (e.g. --train.max_iters={2 * cfg.train.max_iters}) "
                        "to train further")
    return [change for section in ("model", "data", "train", "sample")
            for change in config_differences(saved[section], requested[section], section)
            if not change.startswith("train.optimizer:")]  # checked above, from the state itself


def open_checkpoint(cfg: Config, records: dict, resume: bool, overwrite: bool, say=print) -> tuple[Path, dict] | None:
    """The (path, checkpoint) to resume, checked against `cfg` and the `records` its data format keeps
    (a chat run's template) before any work, changed settings noted; None for a fresh run."""
    path = checkpoint_to_resume(Path(cfg.train.out_dir), resume, overwrite)
    if path is None:
        return None
    checkpoint = load_checkpoint(path)
    check_same_template(checkpoint.get("chat_template"), records.get("chat_template"), path, cfg.data.format)
    for change in check_resumable(checkpoint, path, cfg):
        say(f"note: {change}; continuing with the config's value")
    return path, checkpoint


def check_same_template(saved: object, wanted: object, path: Path, data_format: str) -> None:
    """A UserError if a run resumes with another chat template than its checkpoint's (None: a text run's)."""
    if saved == wanted:
        return

    def name(t: object) -> str:
        return "none (a text run)" if t is None else repr(t.get("name") if isinstance(t, dict) else t)
    raise UserError(f"{path} was trained with the chat template {name(saved)} and this run asks for "
                    f"{name(wanted)} (data.format {data_format}); a run keeps its template: "
                    "resume with the settings it was started with, or start a new run with --overwrite or "
                    "another train.out_dir")


def saved_optimizer_name(checkpoint: dict) -> str:
    """The `train.optimizer` a latest.pt was written by, read from its optimizer state itself (Muon's
    has a part per optimizer): a config that lacks the key reads as the default, whatever trained it."""
    state = checkpoint["optimizer"]
    return "muon" if isinstance(state, dict) and set(state) == {"muon", "adamw"} else "adamw"


def restore_run(run: Run, batches: TrainBatches, path: Path, checkpoint: dict) -> None:
    """Fill a new run's objects from the latest.pt at `path`: weights, optimizer, GradScaler, loop state, data
    position and RNGs. It builds nothing: `run` and `batches` are the ones the run would start with.

    A process gets its saved RNGs when the checkpoint was written by as many processes (rank 0 always);
    otherwise it keeps those `seed_run` gave it.
    """
    load_weights(run.model, checkpoint["model"], path)
    rank, world_size = run.dist.rank, run.dist.world_size
    saved_by = checkpoint.get("world_size", 1)
    try:
        run.optimizer.load_state_dict(checkpoint["optimizer"])
        if run.precision.scaler.is_enabled() and checkpoint["scaler"] is not None:
            run.precision.scaler.load_state_dict(checkpoint["scaler"])
        batches.load_state_dict(checkpoint["data"])
        run.state = TrainState(**{f.name: checkpoint[f.name] for f in dataclasses.fields(TrainState)})
        if rank == 0 or saved_by == world_size:
            set_rng_state(checkpoint["rng"] if rank == 0 else checkpoint["rank_rng"][rank - 1])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
        raise UserError(f"{path} is damaged: its training state cannot be restored ({first_line(e)}); "
                        "start again with --overwrite") from None
    if run.dist.is_main:
        if saved_by != world_size:
            print(f"note: {path} was written by {plural(saved_by, 'process', 'processes')} and continues with "
                  f"{world_size}: the batches and the schedule continue exactly, the dropout masks "
                  "differ from an unbroken run's")
        print(f"resuming {path} at step {run.state.step}")


# --------------------------------------------------------------------------- a run's folder

class RunCheckpoints:
    """A run folder's latest.pt and best.pt, where `train` saves the run.

    `extras` go into both files beside the run's state (a chat run's template). `last_saved` is the step
    of the last good checkpoint (a resumed run's). Every process calls `save` (their RNG states are
    gathered) and rank 0 writes.
    """

    def __init__(self, cfg: Config, batches: TrainBatches, dist: Distributed = SINGLE, extras: dict | None = None,
                 last_saved: int | None = None):
        out_dir = Path(cfg.train.out_dir)
        self.latest, self.best = out_dir / LATEST_NAME, out_dir / BEST_NAME
        self.cfg, self.batches, self.dist = cfg, batches, dist
        self.extras = extras or {}
        self.last_saved = last_saved

    def make_folder(self, overwrite: bool) -> None:
        """Create the run folder now, not at the first save; with `overwrite`, remove the old run's checkpoints."""
        if not self.dist.is_main:
            return
        out_dir = self.latest.parent
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create train.out_dir {out_dir} ({e.strerror}); "
                            "choose a folder you can write to") from None
        if overwrite:  # asked for: the new run replaces the old one's checkpoints
            for old in run_checkpoints(out_dir):
                old.unlink()

    def save(self, run: Run) -> None:
        """Write latest.pt, and best.pt when `run.state` holds the best val loss so far, measured just now."""
        rank_rngs = self.dist.gather(rng_state())  # every process takes part; rank 0 writes
        state = run.state
        if self.dist.is_main:
            save_checkpoint(self.latest, {**training_checkpoint(run, self.batches, self.cfg, rank_rngs), **self.extras})
            if state.best_step == state.step:  # evaluated just now, and the best so far
                save_checkpoint(self.best, {**best_checkpoint(run, self.cfg), **self.extras})
        self.last_saved = state.step

    @contextlib.contextmanager
    def explained_stops(self) -> Iterator[None]:
        """Inside, `NonFiniteLoss` and `OutOfMemory` become one-line UserErrors naming the last good checkpoint."""
        try:
            yield
        except NonFiniteLoss as e:
            raise non_finite_error(e, self.latest, self.last_saved) from None
        except OutOfMemory as e:
            raise out_of_memory_error(e, self.cfg, self.dist, self.latest, self.last_saved) from None


def non_finite_error(e: NonFiniteLoss, latest: Path, last_saved: int | None) -> UserError:
    """The error for a NaN/inf: the step, the last good checkpoint and what to do."""
    if last_saved is None:
        return UserError(f"{e}; last good checkpoint: none yet; lower train.learning_rate (or set "
                         "train.grad_clip) and start again")
    return UserError(f"{e}; last good checkpoint: {latest} (step {last_saved}); lower train.learning_rate "
                     "(or set train.grad_clip) and continue from it with --resume, or start again with "
                     "--overwrite")


def out_of_memory_error(e: OutOfMemory, cfg: Config, dist: Distributed, latest: Path,
                        last_saved: int | None) -> UserError:
    """The error for running out of GPU memory: where, at which batch size, and what to lower."""
    batch_size, accum = cfg.data.batch_size, cfg.train.grad_accum_steps
    training = e.phase == "training step"
    # Training micro-batches are each process's slice; evaluation batches are data.batch_size whole.
    windows = dist.local_batch_size(batch_size, accum) if training else batch_size
    on_each = f" on each of {dist.world_size} processes" if dist.launched else ""
    ideas = []
    smaller = next((batch_size // f for f in range(2, batch_size + 1) if batch_size % f == 0), None)
    if smaller is not None:  # the same global batch in smaller micro-batches
        ideas.append(f"lower data.batch_size and raise train.grad_accum_steps to keep the global batch (e.g. "
                     f"--data.batch_size={smaller} --train.grad_accum_steps={accum * batch_size // smaller})")
    if training and not cfg.train.activation_checkpointing:
        ideas.append("set --train.activation_checkpointing=true")
    ideas.append("lower model.context_length")
    kept = (f"the last checkpoint, {latest} (step {last_saved}), is kept" if last_saved is not None
            else "no checkpoint was written yet")
    to_fit = ", ".join(ideas[:-1]) + ", or " + ideas[-1] if len(ideas) > 1 else ideas[0]
    return UserError(f"{e} with batches of {plural(windows, 'window', 'windows')} x {cfg.model.context_length:,} "
                     f"tokens{on_each} (data.batch_size {batch_size}, model.context_length "
                     f"{cfg.model.context_length}); to fit, {to_fit}; {kept}")


# --------------------------------------------------------------------------- signals

class StopRequest:
    """While active, SIGINT and SIGTERM ask the loop to stop after its step; a second one stops now.

    Use as a context manager; calling it says whether a stop was asked for, and `signum` which
    signal asked. `quiet` leaves the "finishing this step" line to another process (torchrun
    sends the signal to every one).
    """

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.signum: int | None = None
        self._previous: dict = {}
        self._pid = os.getpid()

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signals reach only that one
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __call__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: object) -> None:
        if os.getpid() != self._pid:  # a DataLoader worker forked with the handler: the main one decides
            return
        if self.signum is not None:
            raise KeyboardInterrupt  # asked twice: stop at once; latest.pt is still whole
        self.signum = signum
        if not self.quiet:
            print(f"\n{signal.Signals(signum).name}: finishing this step and saving "
                  "(send it again to stop at once)", file=sys.stderr, flush=True)
