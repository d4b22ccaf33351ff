"""Multiple-choice scoring speed, and its cost inside a run: `python -m gpt bench tasks --config X`.

Builds the config's model (random weights: speed does not depend on them), then in turns, in one
process, `--rounds` times each:
- scores `--limit` items of `--task` as the loop does (`train.eval_tasks`), in the run's precision
  and compiled where the run compiles;
- runs `--steps` training steps of the config on random token ids.

It prints items/s and the tokens/s the scoring runs (each shared context once, padded, then its
endings' rows, padded), the time of a training step, and the share of a run that scoring at every
evaluation would take: evaluations x one scoring, over that plus max_iters training steps (the
run's own periodic loss estimates and saves left out: the share is an upper bound).
"""

import math
import statistics
import sys
import time

import torch

from gpt.compiled import compile_model
from gpt.config import load_config
from gpt.device import pick_device, setup_device
from gpt.errors import ArgumentParser, run_cli
from gpt.model import GPTModel
from gpt.optim import build_optimizer
from gpt.precision import Precision, dtype_name, pick_dtype
from gpt.tools.multiple_choice import (Prompts, Scoring, batches_of, cache_rows, item_rows, load_task, padded_batch,
                                       score_task, shared_contexts, subset)
from gpt.tools.next_words import NEXT_WORDS
from gpt.training import train_step


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m gpt bench tasks", allow_abbrev=False, description=(
        "Items/s of multiple-choice scoring for a config's model (random weights), beside its training "
        "step, and the share of a run that scoring at every evaluation takes."))
    parser.add_argument("--config", help="YAML config: a path or a file name in configs/")
    parser.add_argument("--task", default=NEXT_WORDS, help="hellaswag, shakespeare-next-words or a JSONL file")
    parser.add_argument("--limit", type=int, help="items to score (default: the config's train.eval_task_items, "
                        "else all)")
    parser.add_argument("--steps", type=int, default=5, help="training steps timed per round (0: scoring only)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of both, taken in turns (the first warms up)")
    parser.add_argument("--device", default="auto", help="auto, cpu, mps or cuda[:N]")
    args, overrides = parser.parse_known_args(argv)

    def work() -> None:
        cfg = load_config(args.config, overrides)
        device = pick_device(args.device, option="--device")
        setup_device(device)
        torch.manual_seed(cfg.train.seed)
        model = GPTModel(cfg.model).to(device)
        net = compile_model(model, cfg.train.compile, device)  # training's
        precision = Precision(pick_dtype(cfg.train.dtype, device), device)
        task = subset(load_task(args.task), args.limit or cfg.train.eval_task_items)
        context = cfg.model.context_length
        budget = cfg.data.batch_size * context
        prompts = Prompts.for_model(cfg.data.format == "chat")
        scoring = Scoring(prompts, context, budget, device, precision, cfg.train.compile)
        groups = shared_contexts([item_rows(item, prompts, context) for item in task.items])
        padded = sum(contexts.numel() + wide.numel() + narrow.numel()  # the tokens run: each context, then the endings
                     for contexts, _, _, wide, narrow, *_ in (padded_batch([groups[g] for g in batch]) for batch in
                                                              batches_of(groups, budget, context, cache_rows(model, budget))))
        optimizer = build_optimizer(model, cfg.train, device)
        shape = (cfg.data.batch_size, context)
        generator = torch.Generator().manual_seed(0)
        scored, stepping = [], []
        for _ in range(args.rounds):
            scored.append(score_task(model, task, scoring).seconds)
            if args.steps < 1:
                continue
            batches = iter([tuple(torch.randint(0, cfg.model.vocab_size, shape, generator=generator).to(torch.uint16)
                                  for _ in range(2)) for _ in range(args.steps * cfg.train.grad_accum_steps)])
            model.train()
            started = time.perf_counter()
            for _ in range(args.steps):
                train_step(net, batches, optimizer, precision, cfg.train)  # syncs: it reads the loss
            stepping.append((time.perf_counter() - started) / args.steps)
        score_s = statistics.median(scored[1:] or scored)
        m = cfg.model
        print(f"{task.name}, {len(task.items):,} items: {device}, {m.n_layers} layers, {m.emb_dim} wide, context "
              f"{context}, {dtype_name(precision.dtype)}, compile {cfg.train.compile}; median of rounds 2.. of "
              f"{args.rounds}")
        print(f"scoring: {score_s:.2f} s, {len(task.items) / score_s:,.1f} items/s, {padded / score_s:,.0f} tokens/s "
              f"({padded:,} tokens run: each context once, then its endings, padded)")
        if not stepping:
            return
        step_s = statistics.median(stepping[1:] or stepping)
        evaluations = math.ceil(cfg.train.max_iters / cfg.train.eval_interval)
        share = evaluations * score_s / (evaluations * score_s + cfg.train.max_iters * step_s)
        print(f"training step: {step_s:.3f} s ({cfg.data.batch_size * context * cfg.train.grad_accum_steps:,} tokens)"
              f"; one scoring = {score_s / step_s:.1f} steps")
        print(f"in a run of {cfg.train.max_iters} steps with {evaluations} evaluations: scoring at each takes "
              f"{100 * share:.1f}% of the time (steps and scoring only)")

    return run_cli(work)


if __name__ == "__main__":
    sys.exit(main())
