"""Train a GPT: `python train.py --config small.yaml [--section.key=value ...] [--resume | --overwrite]`.

On several GPUs (or CPU processes), the same script under torchrun:
`torchrun --nproc_per_node=N train.py --config small.yaml` (see `gpt.distributed`).
"""

import dataclasses
import os
import shlex
import signal
import sys
from pathlib import Path

import torch

from gpt.chat.data import load_chat_splits
from gpt.chat.template import TEMPLATE, chat_model_config, check_resumed_template, reply
from gpt.checkpoint import BEST_NAME, LATEST_NAME, load_checkpoint, run_checkpoints, save_checkpoint
from gpt.config import Config, load_config
from gpt.data import TrainBatches, eval_loader, load_text_splits
from gpt.distributed import (
    Distributed, batch_line, environment_place, environment_rank, launched_by_torchrun, plural, start,
)
from gpt.errors import ArgumentParser, UserError, run_cli
from gpt.tools.evaluate import final_val_line
from gpt.model import GPTModel
from gpt.resume import (
    StopRequest, best_checkpoint, check_resumable, checkpoint_to_resume, rank_seed, restore_training,
    rng_state, seed_everything, training_checkpoint,
)
from gpt.metrics import RunLog
from gpt.tools.plot import plot_after_training
from gpt.precision import Precision, pick_dtype, precision_line
from gpt.gpt2.pretrained import build_model, resolve_model_config
from gpt.sampling import print_samples
from gpt.training import NonFiniteLoss, OutOfMemory, TrainState, pick_device, setup_device, train


def run(cfg: Config, resume: bool, overwrite: bool, resume_command: str) -> int:
    """Prepare the data, build the model, train (or continue) it, save it and print a sample.

    Returns the exit code: 0 when the run is complete, 128 + the signal's number when SIGINT
    or SIGTERM stopped it (after saving). Under torchrun this is one of the processes.
    """
    # Before joining the process group: a batch the processes cannot share stops every one at once.
    environment_place().check_batch(cfg.data.batch_size, cfg.train.grad_accum_steps)
    dist, device = start(pick_device(cfg.train.device))
    try:
        return train_run(cfg, resume, overwrite, resume_command, dist, device)
    finally:
        dist.close()


def train_run(cfg: Config, resume: bool, overwrite: bool, resume_command: str, dist: Distributed,
              device: torch.device) -> int:
    """`run`'s work, as process `dist.rank` of `dist.world_size` (rank 0 of 1 without torchrun)."""
    say = print if dist.is_main else lambda *args, **kwargs: None  # rank 0 speaks for all
    # A pretrained init_from brings its architecture (context_length included) with its weights;
    # resolved first, so a resume compares the architecture it will really build.
    cfg.model = resolve_model_config(cfg.model, cfg.given_keys.get("model", ()))
    chat = cfg.data.format == "chat"
    if chat:  # the template's markers are token ids of their own (gpt.chat.template)
        cfg.model = chat_model_config(cfg.model)
    template = {"chat_template": TEMPLATE} if chat else {}  # what the checkpoints record
    out_dir = Path(cfg.train.out_dir)
    resume_from = checkpoint_to_resume(out_dir, resume, overwrite)
    checkpoint = open_checkpoint(resume_from, cfg, say) if resume_from is not None else None
    setup_device(device)
    seed_everything(cfg.train.seed)
    context = cfg.model.context_length
    if chat:  # one conversation per window, the loss on the replies only (gpt.chat.data)
        train_set, val_set = load_chat_splits(cfg.data, context, dist)
        for split, windows in (("train", train_set), ("val", val_set)):
            say(windows.describe(split))
    else:
        train_set, val_set = load_text_splits(cfg.data, context, dist)
    pin = device.type == "cuda"
    batch_size, accum = cfg.data.batch_size, cfg.train.grad_accum_steps
    train_batches = TrainBatches(train_set, batch_size, cfg.train.seed, cfg.data.num_workers, pin_memory=pin,
                                 rank=dist.rank, world_size=dist.world_size, shares=dist.batch_shares(accum))
    eval_loaders = {
        split: eval_loader(dataset, cfg.data.batch_size, cfg.train.eval_iters, dist.rank, dist.world_size)
        for split, dataset in (("train", train_set), ("val", val_set))
    }
    whole_val = eval_loader(val_set, cfg.data.batch_size, None, dist.rank, dist.world_size)

    # Resuming loads the run's own weights: no need to read GPT-2's again first.
    model = (GPTModel(cfg.model) if checkpoint is not None else build_model(cfg.model)).to(device)
    if dist.rank:  # the same weights everywhere (DDP also copies rank 0's), other dropout masks
        seed_everything(rank_seed(cfg.train.seed, dist.rank))
    tokens_per_step = batch_size * context * accum
    processes = f" x {plural(dist.world_size, 'process', 'processes')}" if dist.launched else ""
    say(f"model: {model.num_parameters() / 1e6:.2f}M parameters; device: {device}{processes}; "
        f"{len(train_set):,} train windows")
    say(batch_line(batch_size, accum, context, dist))
    precision = Precision(pick_dtype(cfg.train.dtype, device), device)
    say(f"precision: {precision_line(cfg.train.dtype, device)}")

    latest, best = out_dir / LATEST_NAME, out_dir / BEST_NAME
    last_saved = checkpoint["step"] if checkpoint is not None else None  # the last good checkpoint

    def save(state: TrainState, optimizer, scaler) -> None:
        nonlocal last_saved
        rank_rngs = dist.gather(rng_state())  # every process takes part; rank 0 writes
        if dist.is_main:
            save_checkpoint(latest, {**training_checkpoint(model, optimizer, scaler, state, train_batches, cfg,
                                                           rank_rngs), **template})
            if state.best_step == state.step:  # evaluated just now, and the best so far
                save_checkpoint(best, {**best_checkpoint(model, state, cfg), **template})
        last_saved = state.step

    def restore(optimizer, scaler) -> TrainState:
        nonlocal checkpoint
        state = restore_training(checkpoint, resume_from, model, optimizer, scaler, train_batches,
                                 cfg.train.seed, dist.rank, dist.world_size)
        saved_by = checkpoint.get("world_size", 1)
        if saved_by != dist.world_size:
            say(f"note: {resume_from} was written by {plural(saved_by, 'process', 'processes')} and continues with "
                f"{dist.world_size}: the batches and the schedule continue exactly, the dropout masks "
                "differ from an unbroken run's")
        checkpoint = None  # its tensors are in the model and optimizer now; free the copy
        say(f"resuming {resume_from} at step {state.step}")
        return state

    if dist.is_main:
        try:  # fail now, not at the first checkpoint
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create train.out_dir {out_dir} ({e.strerror}); "
                            "choose a folder you can write to") from None
        if overwrite:  # asked for: the new run replaces the old one's checkpoints
            for old in run_checkpoints(out_dir):
                old.unlink()
    log = (RunLog(out_dir, cfg.train.tensorboard, fresh=checkpoint is None, tokens_per_step=tokens_per_step)
           if dist.is_main else None)
    with StopRequest(quiet=not dist.is_main) as stop:
        try:
            state = train(model, cfg.train, train_batches, eval_loaders, device, save,
                          restore=restore if checkpoint is not None else None, precision=precision,
                          should_stop=stop, log=log, dist=dist)
        except NonFiniteLoss as e:
            raise non_finite_error(e, latest, last_saved) from None
        except OutOfMemory as e:
            raise out_of_memory_error(e, cfg, dist, latest, last_saved) from None
        finally:
            if log is not None:
                log.close()
    if state.step < cfg.train.max_iters:  # stopped by a signal (here or on another process)
        say(f"stopped at step {state.step}; saved {latest}; resume with: {resume_command}", flush=True)
        return 128 + (stop.signum or signal.SIGTERM)
    if cfg.train.whole_val_at_end:  # the figure to compare runs by: every window, not the periodic subset
        try:
            say(final_val_line(model, whole_val, cfg.train.dtype, device, dist, chat, state.step))
        except OutOfMemory as e:
            raise out_of_memory_error(e, cfg, dist, latest, last_saved) from None
    if not dist.is_main:
        return 0
    print(f"saved {latest} (step {state.step}); best: {best} (step {state.best_step}, val loss "
          f"{state.best_val_loss:.4f} on the periodic subset)")
    print(plot_after_training(out_dir))
    print("\n--- sample ---")
    if chat:
        print(f"> {cfg.sample.prompt}")
        reply(model, [{"role": "user", "content": cfg.sample.prompt}], cfg.sample, device,
              torch.Generator().manual_seed(cfg.sample.seed), write=lambda text: print(text, end="", flush=True))
        print()
        return 0
    # A few hundred tokens: not worth compiling the decoding step for (tens of seconds on a GPU),
    # unless the config asks for it explicitly.
    sample = cfg.sample if cfg.sample.compile is True else dataclasses.replace(cfg.sample, compile=False)
    print_samples(model, cfg.sample.prompt, sample, device)
    return 0


def open_checkpoint(path: Path, cfg: Config, say=print) -> dict:
    """The checkpoint to resume, checked against `cfg` before any work; changed settings noted."""
    checkpoint = load_checkpoint(path)
    check_resumed_template(checkpoint.get("chat_template"), path, cfg.data.format == "chat")
    for change in check_resumable(checkpoint, path, cfg):
        say(f"note: {change}; continuing with the config's value")
    return checkpoint


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


def resume_command(argv: list[str]) -> str:
    """The command that continues this run: the same arguments, with --resume for --overwrite.

    Under torchrun: torchrun with as many processes on this machine (another count works too).
    """
    script = Path(__file__)
    try:  # as the user would type it from where they are
        script = Path(os.path.relpath(script))
    except ValueError:  # another drive (Windows): keep the full path
        pass
    args = [arg for arg in argv if arg != "--overwrite"]
    if "--resume" not in args:
        args.append("--resume")
    if not launched_by_torchrun():
        return shlex.join(["python", str(script), *args])
    if os.environ["WORLD_SIZE"] != os.environ["LOCAL_WORLD_SIZE"]:  # several machines
        return "torchrun [this run's torchrun options] " + shlex.join([str(script), *args])
    return shlex.join(["torchrun", f"--nproc_per_node={os.environ['LOCAL_WORLD_SIZE']}", str(script), *args])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = ArgumentParser(
        description="Train a GPT. Any config field can be overridden as --section.key=value, "
        "e.g. --train.max_iters=20 --model.n_layers=2.",
        allow_abbrev=False,
    )
    parser.add_argument("--config", help="YAML config: a path, or a file name in configs/ (e.g. small.yaml)")
    begin = parser.add_mutually_exclusive_group()
    begin.add_argument("--resume", action="store_true",
                       help="continue the run in train.out_dir exactly from its latest.pt")
    begin.add_argument("--overwrite", action="store_true",
                       help="start afresh even though train.out_dir holds a run (its checkpoints are replaced)")
    args, overrides = parser.parse_known_args(argv)

    def work() -> int:
        bad = [o for o in overrides if o.startswith("-") and "." not in o.split("=")[0]]
        if bad:
            raise UserError(f"unknown option {bad[0]}; use --config FILE and --section.key=value overrides")
        return run(load_config(args.config, overrides), args.resume, args.overwrite, resume_command(argv))

    # Under torchrun every process reports its own mistakes; all but rank 0 name themselves.
    return run_cli(work, rank=environment_rank())


if __name__ == "__main__":
    sys.exit(main())
