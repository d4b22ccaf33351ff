"""Train a GPT: `python train.py --config small.yaml [--section.key=value ...] [--resume | --overwrite]`.

On several GPUs (or CPU processes), the same script under torchrun:
`torchrun --nproc_per_node=N train.py --config small.yaml` (see `gpt.distributed`).
"""

import dataclasses
import signal
import sys
from pathlib import Path

import torch

from gpt.checkpoint import lora_line, resolve_model_config, run_model
from gpt.config import Config, load_config
from gpt.data import DataFormat, data_format
from gpt.device import pick_device, setup_device
from gpt.distributed import Distributed, batch_line, environment_place, environment_rank, plural, resume_command, start
from gpt.errors import ArgumentParser, UserError, run_cli
from gpt.metrics import RunLog, plot_after_training
from gpt.precision import precision_line
from gpt.resume import RunCheckpoints, StopRequest, open_checkpoint, restore_run, seed_run
from gpt.training import Run, TrainData, evaluations, final_val_line, new_run, train, train_data


def run(cfg: Config, resume: bool, overwrite: bool, resume_with: str) -> int:
    """Prepare the data, build the model, train (or continue) it, save it and print a sample.

    Returns the exit code: 0 when the run is complete, 128 + the signal's number when SIGINT
    or SIGTERM stopped it (after saving). Under torchrun this is one of the processes.
    """
    # Before joining the process group: a batch the processes cannot share stops every one at once.
    environment_place().check_batch(cfg.data.batch_size, cfg.train.grad_accum_steps)
    dist, device = start(pick_device(cfg.train.device))
    try:
        return train_run(cfg, resume, overwrite, resume_with, dist, device)
    finally:
        dist.close()


def train_run(cfg: Config, resume: bool, overwrite: bool, resume_with: str, dist: Distributed,
              device: torch.device) -> int:
    """`run`'s work, as process `dist.rank` of `dist.world_size` (rank 0 of 1 without torchrun)."""
    say = print if dist.is_main else lambda *args, **kwargs: None  # rank 0 speaks for all
    fmt = data_format(cfg.data.format)  # text, or chat's conversations (gpt.chat.format)
    # The model is settled before anything is built: init_from's architecture, then the format's tokens.
    weights = resolve_model_config(cfg.model, cfg.train.init_from, cfg.given_keys.get("model", ()))
    cfg = dataclasses.replace(cfg, model=fmt.model_config(weights))
    resumed = open_checkpoint(cfg, fmt.records, resume, overwrite, say)
    setup_device(device)
    seed_run(cfg.train.seed, dist.rank, resumed[1]["step"] if resumed else 0)  # before the weights are drawn
    data = load_data(cfg, fmt, dist, device, say)
    model, records = run_model(cfg.model, cfg.train, range(weights.vocab_size, cfg.model.vocab_size), resumed)
    run = new_run(model.use_attention(cfg.train.attn_impl).to(device), cfg.train, device, dist)
    describe_run(run, cfg, data, say)
    last_saved = None if resumed is None else resumed[1]["step"]  # the last good checkpoint's step
    checkpoints = RunCheckpoints(cfg, data.batches, dist, {**fmt.records, **records}, last_saved)
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
        say(f"stopped at step {state.step}; saved {checkpoints.latest}; resume with: {resume_with}", flush=True)
        return 128 + (stop.signum or signal.SIGTERM)
    if cfg.train.whole_val_at_end:  # the figure to compare runs by: every window, not the periodic subset
        with checkpoints.explained_stops():
            say(final_val_line(model, data.whole_val, cfg.train, device, dist, fmt.whole_val, state.step))
    if dist.is_main:
        print(f"saved {checkpoints.latest} (step {state.step}); best: {checkpoints.best} (step {state.best_step}, "
              f"val loss {state.best_val_loss:.4f} on the periodic subset)")
        print(plot_after_training(cfg.train.out_dir, {k: v for e in data.evaluations for k, v in e.references.items()}))
        print("\n--- sample ---")
        fmt.print_sample(model, cfg.sample, device)
    return 0


def load_data(cfg: Config, fmt: DataFormat, dist: Distributed, device: torch.device, say=print) -> TrainData:
    """The run's batches and loaders, in the data format's windows, and what it evaluates beyond the loss."""
    context = cfg.model.context_length
    data = train_data(*fmt.splits(cfg.data, context, dist, say), cfg.data, cfg.train, dist, device)
    data.evaluations = evaluations(cfg.train, fmt.chat, context, cfg.data.batch_size, device, dist)
    return data


def describe_run(run: Run, cfg: Config, data: TrainData, say=print) -> None:
    """The lines that open a run: the model, the device, the batch, the precision (and a LoRA run's adapters)."""
    dist = run.dist
    processes = f" x {plural(dist.world_size, 'process', 'processes')}" if dist.launched else ""
    say(f"model: {run.model.num_parameters() / 1e6:.2f}M parameters; device: {run.precision.device}{processes}; "
        f"{len(data.batches.dataset):,} train windows")
    say(batch_line(cfg.data.batch_size, cfg.train.grad_accum_steps, cfg.model.context_length, dist))
    say(f"precision: {precision_line(cfg.train.dtype, run.precision.device)}")
    for line in lora_line(run.model, cfg.train):
        say(line)


def run_log(cfg: Config, fresh: bool, data: TrainData) -> RunLog:
    """The run folder's metrics log (a fresh run's starts anew; a resumed one's continues)."""
    tokens_per_step = cfg.data.batch_size * cfg.model.context_length * cfg.train.grad_accum_steps
    return RunLog(cfg.train.out_dir, cfg.train.tensorboard, fresh=fresh, tokens_per_step=tokens_per_step,
                  task_columns=[column for e in data.evaluations for column in e.columns])


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
        return run(load_config(args.config, overrides), args.resume, args.overwrite, resume_command(Path(__file__), argv))

    # Under torchrun every process reports its own mistakes; all but rank 0 name themselves.
    return run_cli(work, rank=environment_rank())


if __name__ == "__main__":
    sys.exit(main())
