"""Train a GPT: `python train.py --config small.yaml [--section.key=value ...] [--resume | --overwrite]`.

On several GPUs (or CPU processes), the same script under torchrun:
`torchrun --nproc_per_node=N train.py --config small.yaml` (see `gpt.distributed`).
"""

import os
import shlex
import signal
import sys
from pathlib import Path

import torch

from gpt.chat.data import load_chat_splits
from gpt.chat.template import TEMPLATE, chat_model_config, check_resumed_template, reply
from gpt.checkpoint import load_checkpoint
from gpt.config import Config, load_config
from gpt.data import load_text_splits
from gpt.distributed import (
    Distributed, batch_line, environment_place, environment_rank, launched_by_torchrun, plural, start,
)
from gpt.errors import ArgumentParser, UserError, run_cli
from gpt.gpt2.pretrained import build_model, lora_model, refuse_random_base, resolve_model_config
from gpt.lora import LORA_BASE, adapters_line
from gpt.metrics import RunLog
from gpt.model import GPTModel
from gpt.precision import precision_line
from gpt.resume import RunCheckpoints, StopRequest, check_resumable, checkpoint_to_resume, restore_run, seed_run
from gpt.sampling import print_samples
from gpt.tools.evaluate import final_val_line
from gpt.tools.multiple_choice import Prompts, Scoring, TaskScorer
from gpt.tools.plot import plot_after_training
from gpt.device import pick_device, setup_device
from gpt.training import Run, TrainData, new_run, train, train_data


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
    new_rows = settle_model_config(cfg)
    resumed = open_checkpoint(cfg, resume, overwrite, say)
    setup_device(device)
    seed_run(cfg.train.seed, dist.rank, resumed[1]["step"] if resumed else 0)  # before the weights are drawn
    data = load_data(cfg, dist, device, say)
    model, extras = run_model(cfg, resumed, new_rows)
    model.use_attention(cfg.train.attn_impl)
    run = new_run(model.to(device), cfg.train, device, dist)
    describe_run(run, cfg, data, say)
    last_saved = None if resumed is None else resumed[1]["step"]  # the last good checkpoint's step
    checkpoints = RunCheckpoints(cfg, data.batches, dist, extras, last_saved)
    checkpoints.make_folder(overwrite)
    log = run_log(cfg, resumed is None, data) if dist.is_main else None
    with StopRequest(quiet=not dist.is_main) as stop, checkpoints.explained_stops():
        if resumed is not None:
            restore_run(run, data.batches, *resumed)
        del resumed  # its tensors are in the run now
        try:
            state = train(run, cfg.train, data, checkpoints.save, stop, log)
        finally:
            if log is not None:
                log.close()
    if state.step < cfg.train.max_iters:  # stopped by a signal (here or on another process)
        say(f"stopped at step {state.step}; saved {checkpoints.latest}; resume with: {resume_command}", flush=True)
        return 128 + (stop.signum or signal.SIGTERM)
    if cfg.train.whole_val_at_end:  # the figure to compare runs by: every window, not the periodic subset
        with checkpoints.explained_stops():
            say(final_val_line(model, data.whole_val, cfg.train, device, dist, cfg.data.format == "chat", state.step))
    if dist.is_main:
        print(f"saved {checkpoints.latest} (step {state.step}); best: {checkpoints.best} (step {state.best_step}, "
              f"val loss {state.best_val_loss:.4f} on the periodic subset)")
        print(plot_after_training(cfg.train.out_dir))
        print_sample(model, cfg, device)
    return 0


def settle_model_config(cfg: Config) -> range:
    """Settle `cfg.model` before anything is built -> the ids of the token rows the run adds (a chat run's).

    A pretrained init_from brings its architecture (context_length included) with its weights; resolved
    first, so a resume compares the architecture it will really build.
    """
    cfg.model = resolve_model_config(cfg.model, cfg.train.init_from, cfg.given_keys.get("model", ()))
    base_vocab = cfg.model.vocab_size  # the weights' own; a chat run's new token rows come after
    if cfg.data.format == "chat":  # the template's markers are token ids of their own (gpt.chat.template)
        cfg.model = chat_model_config(cfg.model)
    if cfg.train.lora is not None:
        refuse_random_base(cfg.train.init_from)
    return range(base_vocab, cfg.model.vocab_size)


def describe_run(run: Run, cfg: Config, data: TrainData, say) -> None:
    """The lines that open a run: the model, the device, the batch, the precision (and a LoRA run's adapters)."""
    dist = run.dist
    processes = f" x {plural(dist.world_size, 'process', 'processes')}" if dist.launched else ""
    say(f"model: {run.model.num_parameters() / 1e6:.2f}M parameters; device: {run.precision.device}{processes}; "
        f"{len(data.batches.dataset):,} train windows")
    say(batch_line(cfg.data.batch_size, cfg.train.grad_accum_steps, cfg.model.context_length, dist))
    say(f"precision: {precision_line(cfg.train.dtype, run.precision.device)}")
    if cfg.train.lora is not None:
        say(adapters_line(run.model, cfg.train.lora))


def run_log(cfg: Config, fresh: bool, data: TrainData) -> RunLog:
    """The run folder's metrics log (a fresh run's starts anew; a resumed one's continues)."""
    tokens_per_step = cfg.data.batch_size * cfg.model.context_length * cfg.train.grad_accum_steps
    return RunLog(cfg.train.out_dir, cfg.train.tensorboard, fresh=fresh, tokens_per_step=tokens_per_step,
                  task_columns=data.score_tasks.columns if data.score_tasks else [])


def run_model(cfg: Config, resumed: tuple[Path, dict] | None, new_rows: range) -> tuple[GPTModel, dict]:
    """The model to train, on the CPU, and what its checkpoints record of it beyond the weights.

    Full training: init_from's weights (or random ones); resumed, an empty model that the checkpoint
    fills, with no need to read GPT-2's first. With train.lora: the frozen base and fresh adapters (and
    trainable `new_rows`), the base checked against a resumed run's record of it (`lora_model`).
    """
    extras = {"chat_template": TEMPLATE} if cfg.data.format == "chat" else {}  # what the checkpoints record beside the run
    if cfg.train.lora is None:
        return (GPTModel(cfg.model) if resumed is not None else build_model(cfg.model, cfg.train.init_from)), extras
    model, base = lora_model(cfg, new_rows, resumed)
    return model, {**extras, LORA_BASE: base}


def open_checkpoint(cfg: Config, resume: bool, overwrite: bool, say=print) -> tuple[Path, dict] | None:
    """The (path, checkpoint) to resume, checked against `cfg` before any work, changed settings noted;
    None for a fresh run."""
    path = checkpoint_to_resume(Path(cfg.train.out_dir), resume, overwrite)
    if path is None:
        return None
    checkpoint = load_checkpoint(path)
    check_resumed_template(checkpoint.get("chat_template"), path, cfg.data.format == "chat")
    for change in check_resumable(checkpoint, path, cfg):
        say(f"note: {change}; continuing with the config's value")
    return path, checkpoint


def load_data(cfg: Config, dist: Distributed, device: torch.device, say=print) -> TrainData:
    """The run's batches and loaders: text windows, or for a chat run one conversation per window."""
    context = cfg.model.context_length
    if cfg.data.format == "chat":  # the loss on the replies only (gpt.chat.data)
        splits = load_chat_splits(cfg.data, context, dist)
        for split, windows in zip(("train", "val"), splits):
            say(windows.describe(split))
    else:
        splits = load_text_splits(cfg.data, context, dist)
    data = train_data(*splits, cfg.data, cfg.train, dist, device)
    if cfg.train.eval_tasks:  # read (downloaded, made) by rank 0 first, then by the others
        scoring = Scoring(Prompts.for_model(cfg.data.format == "chat"), context, cfg.data.batch_size * context, device,
                          compile=cfg.train.compile)
        data.score_tasks = dist.in_turn(
            lambda: TaskScorer(cfg.train.eval_tasks, cfg.train.eval_task_items, scoring, dist))
        for task in data.score_tasks.tasks:
            say(f"scoring {task.name} at each evaluation: {len(task.items):,} items of {task.source}")
    return data


def print_sample(model: torch.nn.Module, cfg: Config, device: torch.device) -> None:
    """A reply to the sample prompt for a chat run, else a continuation of it."""
    print("\n--- sample ---")
    if cfg.data.format == "chat":
        print(f"> {cfg.sample.prompt}")
        reply(model, [{"role": "user", "content": cfg.sample.prompt}], cfg.sample, device,
              torch.Generator(device=device).manual_seed(cfg.sample.seed),
              write=lambda text: print(text, end="", flush=True))
        print()
        return
    print_samples(model, cfg.sample.prompt, cfg.sample, device)


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
