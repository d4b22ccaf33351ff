"""The sweep behind configs/small.yaml: train it under each setting, report the whole-val loss.

    python scripts/sweep_small.py                      # every row, one run at a time
    python scripts/sweep_small.py --rows muon,adamw    # just these rows
    python scripts/sweep_small.py --jobs 2             # two at a time (one thread each)

Each row is `python train.py --config small.yaml` with BASE (small.yaml's settings before this
sweep, so that a row means the same whatever small.yaml holds now) and then the row's own
overrides, written to runs/sweep/<row>. The loss that counts is the one train.py prints at the end over every window
of the val split. Rows run side by side (--jobs 2) give the same losses but slower, unequal wall
times, so wall times are only comparable between rows run alone, one after another; each row's
seconds per step relative to small.yaml come from `python -m gpt bench` instead.
Results are appended to runs/sweep/results.jsonl and printed as a Markdown table (docs/tuning.md).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "runs" / "sweep"

# (name, overrides). Stage 1: the optimizer at small.yaml's model and step count (700 steps of
# 8 x 128 tokens). Stage 2: the model's shape and the batch, with the step count set so that the
# training time stays within small.yaml's (its ratio measured with gpt.bench).
BASE = ["--model.n_layers=4", "--model.emb_dim=128", "--model.n_heads=4", "--model.context_length=128",
        "--data.batch_size=8", "--train.max_iters=700", "--train.warmup_iters=40", "--train.optimizer=adamw",
        "--train.learning_rate=2e-3", "--train.min_lr=2e-4", "--train.grad_accum_steps=1",
        "--train.eval_interval=100", "--train.eval_iters=10"]
TUNED = ["--train.optimizer=muon", "--train.learning_rate=6e-3", "--train.min_lr=6e-4"]  # stage 1's best
ROWS = [
    ("adamw", ["--train.optimizer=adamw"]),
    ("muon", ["--train.optimizer=muon"]),
    ("muon-lr0.01", ["--train.optimizer=muon", "--train.muon_lr=0.01"]),
    ("muon-lr0.04", ["--train.optimizer=muon", "--train.muon_lr=0.04"]),
    ("muon-adamlr6e-3", TUNED),
    ("adamw-lr6e-3", ["--train.optimizer=adamw", "--train.learning_rate=6e-3", "--train.min_lr=6e-4"]),  # control
    # Stage 2, at equal training time: per-step cost relative to BASE measured by
    # `python -m gpt bench race` (the command is in docs/tuning.md)
    # (8 layers 1.17x, 6 layers 1.07x, 192 wide 1.47x, context 256 x batch 4 1.00x; Muon 0.98x AdamW).
    ("muon-adamlr6e-3-muonlr0.01", [*TUNED, "--train.muon_lr=0.01"]),
    ("muon-adamlr6e-3-8layers", [*TUNED, "--model.n_layers=8", "--train.max_iters=600"]),
    ("muon-adamlr6e-3-warmup10", [*TUNED, "--train.warmup_iters=10"]),
    ("muon-adamlr6e-3-warmup100", [*TUNED, "--train.warmup_iters=100"]),
    # The same tokens (and so about the same time): twice the batch for half the steps, and back.
    ("muon-adamlr6e-3-batch16", [*TUNED, "--data.batch_size=16", "--train.max_iters=350", "--train.warmup_iters=20"]),
    ("muon-adamlr6e-3-batch32", [*TUNED, "--data.batch_size=32", "--train.max_iters=175", "--train.warmup_iters=10"]),
    ("muon-adamlr6e-3-batch4", [*TUNED, "--data.batch_size=4", "--train.max_iters=1400", "--train.warmup_iters=80"]),
]

FINAL_LOSS = re.compile(r"val loss over all ([\d,]+) windows of the val split: ([\d.]+)")


def run_row(name: str, overrides: list[str], threads: int | None) -> dict:
    """Train one row; return its settings, whole-val loss and wall time."""
    command = [sys.executable, "train.py", "--config", "small.yaml", f"--train.out_dir=runs/sweep/{name}",
               "--overwrite", *BASE, *overrides]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    log = OUT / f"{name}.log"
    started = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - started
    found = FINAL_LOSS.search(log.read_text())
    return {"name": name, "overrides": overrides, "exit": code, "seconds": round(seconds, 1),
            "val_loss": float(found.group(2)) if found else None, "threads": threads,
            "command": "python scripts/sweep_small.py --rows " + name}


def table(results: list[dict]) -> str:
    lines = ["| row | overrides (on BASE) | whole-val loss | wall s | threads |", "| --- | --- | --- | --- | --- |"]
    for r in results:
        loss = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else f"failed (exit {r['exit']})"
        lines.append(f"| {r['name']} | `{' '.join(r['overrides'])}` | {loss} | {r['seconds']:.0f} | "
                     f"{r['threads'] or 'all'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="", help="comma-separated row names to run (default: all)")
    parser.add_argument("--jobs", type=int, default=1, help="rows trained at the same time")
    args = parser.parse_args(argv)
    names = [name for name in args.rows.split(",") if name]
    unknown = [name for name in names if name not in dict(ROWS)]
    if unknown:
        print(f"unknown row {unknown[0]!r}; rows: {', '.join(name for name, _ in ROWS)}")
        return 2
    rows = [row for row in ROWS if not names or row[0] in names]
    OUT.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda row: run_row(*row, threads), rows))
    with open(OUT / "results.jsonl", "a") as out:
        for result in results:
            out.write(json.dumps(result) + "\n")
    print(table(results))
    return 0 if all(r["exit"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
