"""Race training settings against each other: `python -m gpt bench race --config small.yaml`.

Each variant (by default `adamw` and `muon`: `train.optimizer`, plus any `+section.key=value`
overrides, e.g. `muon+model.n_layers=6`) trains its own model from the config, and they take
turns step by step: variant A's step 1, B's step 1, A's step 2, ... Each one's clock counts only
its own steps, so a slow spell of a shared machine slows them all alike and the ratios hold.
Evaluation is not timed. They train for the config's `train.max_iters` steps each, or, with
`--seconds S`, for as many steps as fit in S seconds of its own clock: the step count is fixed
from the time of its first steps, so the learning-rate schedule still runs its whole course.

A chat config (`data.format: chat`) races from its `train.init_from`, and is evaluated on every
held-out conversation: `--variants adamw+data.pack=false,adamw` times packing against one
conversation a window, and `adamw,adamw+train.lora.rank=8` full fine-tuning against LoRA.

Printed: the periodic val loss (the subset `train.eval_iters` gives) against tokens and seconds;
the final loss over every window of the val split; the loss of each at the point in seconds
where the fastest finished; and the seconds each needs to reach a target val loss (default: the
first variant's final periodic loss), with the ratio to the first variant.
"""

import dataclasses
import math
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

from gpt.chat.data import load_chat_split, prepare_chat
from gpt.chat.template import CHAT_VOCAB_SIZE, chat_model_config
from gpt.checkpoint import build_model, resolve_model_config
from gpt.compiled import compile_model
from gpt.config import Config, OPTIMIZERS, load_config
from gpt.corpus.prepare import prepare
from gpt.data import TrainBatches, eval_loader, load_split
from gpt.device import pick_device, setup_device
from gpt.errors import ArgumentParser, UserError, run_cli
from gpt.lora import lora_model
from gpt.model import GPTModel
from gpt.optim import build_optimizer, set_learning_rate
from gpt.precision import Precision, pick_dtype
from gpt.resume import seed_everything
from gpt.training import evaluate, train_step

TIMED_FROM = 3  # with --seconds: steps before this one (allocations, warm-up) don't set the pace
PACE_STEPS = 10  # with --seconds: the step count is fixed after this many steps


@dataclass
class Racer:
    """One variant: its config, model, optimizer, batches and what it has done so far."""

    name: str
    cfg: Config
    model: torch.nn.Module
    net: torch.nn.Module  # the model, compiled if the config says so
    optimizer: object
    precision: Precision
    batches: object
    eval_loader: object
    whole_val: object
    tokens_per_step: int
    step: int = 0
    seconds: float = 0.0
    step_times: list = field(default_factory=list)
    curve: list = field(default_factory=list)  # (step, tokens, seconds, val loss)
    final_loss: float = math.nan

    @property
    def done(self) -> bool:
        return self.step >= self.cfg.train.max_iters


def parse_variant(text: str) -> tuple[str, list[str]]:
    """`muon+model.n_layers=6` -> ('muon+model.n_layers=6', ['--train.optimizer=muon', '--model.n_layers=6'])."""
    optimizer, *settings = text.split("+")
    if optimizer not in OPTIMIZERS or any("=" not in s or "." not in s.split("=")[0] for s in settings):
        raise UserError(f"cannot read variant {text!r}; write it as OPTIMIZER[+section.key=value...], "
                        f"e.g. muon+train.muon_lr=0.04 (optimizer {' or '.join(OPTIMIZERS)})")
    return text, [f"--train.optimizer={optimizer}", *(f"--{s}" for s in settings)]


def build_racer(name: str, cfg: Config, device: torch.device) -> Racer:
    """A variant ready to race: a text run from scratch, or a chat run from its `train.init_from`.

    A chat race is evaluated on every held-out conversation, one per window, whatever `data.pack`
    says: every variant is then scored on the same windows, as `python -m gpt evaluate` scores them."""
    seed_everything(cfg.train.seed)  # every variant of one shape starts from the same weights
    if cfg.data.format == "chat":
        cfg.model = resolve_model_config(cfg.model, cfg.train.init_from, cfg.given_keys.get("model", ()))
        new_rows = range(cfg.model.vocab_size, CHAT_VOCAB_SIZE)  # the template's, where the base lacks them
        cfg.model = chat_model_config(cfg.model)
        context = cfg.model.context_length
        prepared = prepare_chat(cfg.data)
        train_set = load_chat_split(prepared, "train", context, cfg.data.pack)
        val_set = load_chat_split(prepared, "val", context)
        model = build_model(cfg.model, cfg.train.init_from) if cfg.train.lora is None else lora_model(cfg, new_rows)[0]
        periodic = None
    else:
        context = cfg.model.context_length
        prepared = prepare(cfg.data)
        train_set = load_split(prepared, "train", context, cfg.data.stride or context)
        val_set = load_split(prepared, "val", context, context)
        model, periodic = GPTModel(cfg.model), cfg.train.eval_iters
    model = model.use_attention(cfg.train.attn_impl).to(device).train()
    return Racer(
        name=name, cfg=cfg, model=model, net=compile_model(model, cfg.train.compile, device),
        optimizer=build_optimizer(model, cfg.train, device),
        precision=Precision(pick_dtype(cfg.train.dtype, device), device),
        batches=iter(TrainBatches(train_set, cfg.data.batch_size, cfg.train.seed, pin_memory=device.type == "cuda")),
        eval_loader=eval_loader(val_set, cfg.data.batch_size, periodic),
        whole_val=eval_loader(val_set, cfg.data.batch_size, None),
        tokens_per_step=cfg.data.batch_size * context * cfg.train.grad_accum_steps,
    )


def take_step(racer: Racer, device: torch.device) -> None:
    """One optimizer step of `racer`, timed on its own clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    set_learning_rate(racer.optimizer, racer.step, racer.cfg.train)
    train_step(racer.net, racer.batches, racer.optimizer, racer.precision, racer.cfg.train)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - started
    racer.seconds += elapsed
    racer.step_times.append(elapsed)
    racer.step += 1


def fit_to_budget(racer: Racer, seconds: float) -> None:
    """Set the step count that ends near `seconds` on `racer`'s clock, at its pace so far."""
    pace = statistics.median(racer.step_times[TIMED_FROM - 1:])
    steps = max(racer.step + 1, int((seconds - racer.seconds) / pace) + racer.step)
    racer.cfg.train = dataclasses.replace(racer.cfg.train, max_iters=steps)


def race(racers: list[Racer], device: torch.device, eval_every: int, budget: float | None) -> None:
    """Train every racer to its end, in turns; evaluate each every `eval_every` steps and at its end."""
    while not all(r.done for r in racers):
        for racer in racers:
            if racer.done:
                continue
            take_step(racer, device)
            if budget is not None and racer.step == PACE_STEPS:
                fit_to_budget(racer, budget)
            if racer.step % eval_every == 0 or racer.done:
                loss = evaluate(racer.net, racer.eval_loader, device, racer.precision)
                racer.curve.append((racer.step, racer.step * racer.tokens_per_step, racer.seconds, loss))
                print(f"  {racer.name}: step {racer.step}, {racer.seconds:.0f} s, val loss {loss:.4f}", flush=True)
    for racer in racers:
        racer.final_loss = evaluate(racer.model, racer.whole_val, device, racer.precision)


def loss_at(curve: list, seconds: float) -> float | None:
    """The periodic val loss at `seconds`, linear between evaluations (None before the first)."""
    points = [(s, loss) for _, _, s, loss in curve]
    if not points or seconds < points[0][0]:
        return None
    for (s0, l0), (s1, l1) in zip(points, points[1:]):
        if s0 <= seconds <= s1:
            return l0 + (l1 - l0) * (seconds - s0) / (s1 - s0)
    return points[-1][1]


def seconds_to(curve: list, target: float) -> float | None:
    """Seconds until the periodic val loss first reaches `target`, linear between evaluations."""
    previous = None
    for _, _, seconds, loss in curve:
        if loss <= target:
            if previous is None:
                return seconds
            s0, l0 = previous
            return s0 + (seconds - s0) * (l0 - target) / (l0 - loss)
        previous = (seconds, loss)
    return None


def report(racers: list[Racer], target: float) -> None:
    first = racers[0]
    print("\nval loss (periodic subset) against steps, tokens and seconds:")
    print(f"{'variant':<28} {'step':>6} {'tokens':>11} {'seconds':>8} {'val loss':>9}")
    for racer in racers:
        for step, tokens, seconds, loss in racer.curve:
            print(f"{racer.name:<28} {step:>6} {tokens:>11,} {seconds:>8.1f} {loss:>9.4f}")
    print("\nat the end, the loss over every window of the val split:")
    print(f"{'variant':<28} {'steps':>6} {'tokens':>11} {'seconds':>8} {'ms/step':>8} {'windows':>8} {'val loss':>9}")
    for racer in racers:
        print(f"{racer.name:<28} {racer.step:>6} {racer.step * racer.tokens_per_step:>11,} {racer.seconds:>8.1f} "
              f"{1e3 * racer.seconds / racer.step:>8.1f} {len(racer.whole_val.dataset):>8,} {racer.final_loss:>9.4f}")
    fastest = min(r.seconds for r in racers)
    print(f"\nat equal seconds ({fastest:.1f} s, when the fastest finished), periodic val loss:")
    for racer in racers:
        loss = loss_at(racer.curve, fastest)
        print(f"  {racer.name:<28} {'-' if loss is None else f'{loss:.4f}'}")
    print(f"\ntime to reach val loss {target:.4f} (periodic subset), and speed-up over {first.name}:")
    base = seconds_to(first.curve, target)
    for racer in racers:
        seconds = seconds_to(racer.curve, target)
        if seconds is None:
            print(f"  {racer.name:<28} not reached")
            continue
        ratio = f"{base / seconds:.2f}x" if base else "-"
        print(f"  {racer.name:<28} {seconds:>8.1f} s  {ratio}")


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m gpt bench race",
        description="Train a config under several variants in turns; compare val loss per token and "
        "per second. Any --section.key=value override applies to every variant.", allow_abbrev=False)
    parser.add_argument("--config", help="YAML config: a path or a file name in configs/")
    parser.add_argument("--variants", default="adamw,muon",
                        help="comma-separated OPTIMIZER[+section.key=value...], e.g. adamw,muon+train.muon_lr=0.04")
    parser.add_argument("--seconds", type=float, help="train each variant for this many seconds of its own "
                        "clock (default: train.max_iters steps each)")
    parser.add_argument("--eval-every", type=int, help="steps between evaluations (default: train.eval_interval)")
    parser.add_argument("--target", type=float, help="val loss to time (default: the first variant's final one)")
    parser.add_argument("--device", default="auto", help="auto, cpu, mps or cuda[:N]")
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)

    def work() -> None:
        variants = [parse_variant(v) for v in args.variants.split(",") if v]
        if len(variants) < 1 or (args.seconds is not None and args.seconds <= 0):
            raise UserError("race needs at least one variant, and --seconds must be above 0")
        device = pick_device(args.device, option="--device")
        setup_device(device)
        configs = [(name, load_config(args.config, [*overrides, *extra])) for name, extra in variants]
        eval_every = args.eval_every or configs[0][1].train.eval_interval
        if eval_every < 1:
            raise UserError("--eval-every must be at least 1")
        racers = [build_racer(name, cfg, device) for name, cfg in configs]
        print(f"race on {device}, {torch.get_num_threads()} threads: "
              + ", ".join(f"{r.name} ({r.cfg.train.max_iters} steps of {r.tokens_per_step:,} tokens)" for r in racers)
              + (f"; {args.seconds:g} s each" if args.seconds else ""), flush=True)
        race(racers, device, eval_every, args.seconds)
        target = args.target if args.target is not None else racers[0].curve[-1][3]
        report(racers, target)

    return run_cli(work)


if __name__ == "__main__":
    sys.exit(main())
