"""Train a GPT: `python train.py --config small.yaml [--section.key=value ...]`."""

import sys
from pathlib import Path

import torch

from gpt.checkpoint import CHECKPOINT_NAME, save_checkpoint
from gpt.config import Config, config_to_dict, load_config
from gpt.data import TrainBatches, eval_loader, load_split, prepare
from gpt.errors import ArgumentParser, UserError, run_cli
from gpt.metrics import RunLog
from gpt.plot import plot_after_training
from gpt.pretrained import build_model, resolve_model_config
from gpt.sampling import print_samples
from gpt.training import TrainState, keep_freed_memory, pick_device, train


def run(cfg: Config) -> TrainState:
    """Prepare the data, build the model, train it, save it and print a sample."""
    device = pick_device(cfg.train.device)
    if device.type == "cpu":
        keep_freed_memory()
    torch.manual_seed(cfg.train.seed)
    # A pretrained init_from brings its architecture (context_length included) with its weights.
    cfg.model = resolve_model_config(cfg.model, cfg.given_keys.get("model", ()))
    context = cfg.model.context_length
    prepared = prepare(cfg.data)
    train_set = load_split(prepared, "train", context, cfg.data.stride or context)
    val_set = load_split(prepared, "val", context, context)
    pin = device.type == "cuda"
    train_batches = TrainBatches(train_set, cfg.data.batch_size, cfg.train.seed,
                                 cfg.data.num_workers, pin_memory=pin)
    eval_loaders = {
        "train": eval_loader(train_set, cfg.data.batch_size, cfg.train.eval_iters),
        "val": eval_loader(val_set, cfg.data.batch_size, cfg.train.eval_iters),
    }

    model = build_model(cfg.model).to(device)
    tokens_per_step = cfg.data.batch_size * context * cfg.train.grad_accum_steps
    print(f"model: {model.num_parameters() / 1e6:.2f}M parameters; device: {device}; "
          f"{len(train_set):,} train windows; {tokens_per_step:,} tokens per step")

    out_path = Path(cfg.train.out_dir) / CHECKPOINT_NAME

    def save(state: TrainState, optimizer: torch.optim.Optimizer) -> None:
        save_checkpoint(out_path, {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "config": config_to_dict(cfg),
            "step": state.step,
            "best_val_loss": state.best_val_loss,
            "train_loss": state.train_loss,
            "val_loss": state.val_loss,
        })

    try:  # fail now, not at the first checkpoint
        out_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create train.out_dir {out_path.parent} ({e.strerror}); "
                        "choose a folder you can write to") from None
    log = RunLog(out_path.parent, cfg.train.tensorboard, fresh=True, tokens_per_step=tokens_per_step)
    try:
        state = train(model, cfg.train, train_batches, eval_loaders, device, save, log)
    finally:
        log.close()
    print(f"saved {out_path} (step {state.step}, val loss {state.val_loss:.4f})")
    print(plot_after_training(out_path.parent))
    print("\n--- sample ---")
    print_samples(model, cfg.sample.prompt, cfg.sample, device)
    return state


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        description="Train a GPT. Any config field can be overridden as --section.key=value, "
        "e.g. --train.max_iters=20 --model.n_layers=2.",
        allow_abbrev=False,
    )
    parser.add_argument("--config", help="YAML config: a path, or a file name in configs/ (e.g. small.yaml)")
    args, overrides = parser.parse_known_args(argv)

    def work() -> None:
        bad = [o for o in overrides if o.startswith("-") and "." not in o.split("=")[0]]
        if bad:
            raise UserError(f"unknown option {bad[0]}; use --config FILE and --section.key=value overrides")
        run(load_config(args.config, overrides))

    return run_cli(work)


if __name__ == "__main__":
    sys.exit(main())
