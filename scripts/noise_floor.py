"""The noise floor of the equivalence tests: how far two runs that add the same numbers in another
order drift apart, in float32 and in bf16 (autocast, and Muon's bf16 Newton-Schulz).

    python scripts/noise_floor.py [--seeds 1 2 3] [--dtypes float32 bfloat16] [--optimizers muon adamw]

Each row trains tests/test_distributed.py's tiny run (6 Muon steps of 8 windows, no dropout) and
compares it with the reference run, one process taking 4 micro-batches of 2 windows a step:
- "1 x (4 x 2)" again: run-to-run determinism (0 expected);
- "1 x (2 x 4)": one process, the same 8 windows a step in 2 micro-batches of 4: only the order
  of the additions changes. This is the noise floor;
- "2 x (2 x 2)", "4 x (1 x 2)": what the tests compare, 2 and 4 processes under torchrun.
It prints the largest difference in any loss of metrics.csv and in any weight of the final
checkpoint. tests/test_distributed.py takes its bounds from these figures (docs/precision.md).
bfloat16 forces `train.dtype: auto` to bf16 with GPT_CPU_BF16=1; where the CPU has no native bf16
it is emulated and slow, but the model is tiny.
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
STEPS = 6
# (processes, micro-batch, micro-steps): 8 windows a step in each
LAYOUTS = [(1, 2, 4), (1, 4, 2), (2, 2, 4), (4, 4, 2)]


def run(folder: Path, corpus: Path, processes: int, batch: int, accum: int, dtype: str, optimizer: str,
        seed: int) -> Path:
    out = folder / f"{processes}-{batch}-{accum}-{dtype}-{optimizer}-{seed}-{len(list(folder.iterdir()))}"
    args = ["--config", "tiny.yaml", f"--data.corpus={corpus}", f"--data.prepared_dir={folder / 'prepared'}",
            "--model.context_length=16", "--model.drop_rate=0", f"--data.batch_size={batch}",
            f"--train.grad_accum_steps={accum}", f"--train.eval_iters={4 // batch}", "--train.eval_interval=1",
            "--train.warmup_iters=0", "--train.learning_rate=1e-3", "--train.min_lr=1e-3",
            "--sample.max_new_tokens=1", f"--train.max_iters={STEPS}", f"--train.out_dir={out}",
            f"--train.optimizer={optimizer}", f"--train.seed={seed}", "--train.dtype=auto"]
    script = str(ROOT / "train.py")
    command = ([sys.executable, script] if processes == 1 else
               [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", script])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GPT_CPU_BF16": "1" if dtype == "bfloat16" else "0"}
    done = subprocess.run([*command, *args], cwd=folder, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"run failed: {' '.join(args)}\n{done.stderr[-2000:]}")
    return out


def losses(out: Path) -> np.ndarray:
    rows = (out / "metrics.csv").read_text().splitlines()[1:]
    return np.array([[float(v) for v in row.split(",")[2:4]] for row in rows])


def weight_difference(a: Path, b: Path) -> float:
    first, second = (torch.load(p / "latest.pt", weights_only=True)["model"] for p in (a, b))
    return max((first[k] - second[k]).abs().max().item() for k in first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 1, 2])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--optimizers", nargs="+", default=["muon", "adamw"])
    args = parser.parse_args()
    print(f"torch {torch.__version__}; CPU native bf16: {torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
    print("| dtype | optimizer | seed | run | largest loss difference | largest weight difference |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        corpus = folder / "lines.txt"  # tests/test_distributed.py's corpus
        corpus.write_text("\n".join(f"Line {i}: the quick brown fox, number {i * 7 % 13}, jumps over the dog."
                                    for i in range(60)), encoding="utf-8")
        for dtype in args.dtypes:
            for optimizer in args.optimizers:
                for seed in args.seeds:
                    reference = run(folder, corpus, *LAYOUTS[0], dtype, optimizer, seed)
                    for layout in LAYOUTS:
                        other = run(folder, corpus, *layout, dtype, optimizer, seed)
                        loss = np.abs(losses(other) - losses(reference)).max()
                        print(f"| {dtype} | {optimizer} | {seed} | {layout[0]} x ({layout[2]} x {layout[1]}) "
                              f"| {loss:.2e} | {weight_difference(other, reference):.2e} |", flush=True)


if __name__ == "__main__":
    main()
