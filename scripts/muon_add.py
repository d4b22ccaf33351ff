"""What Muon's last op costs: adding the orthogonalised updates to the weights, as gpt/optim.py does
and as torch's foreach fast path would take it.

    python scripts/muon_add.py [--config gpt2-124m.yaml] [--rounds 50]

`Muon.step` ends with `torch._foreach_add_(weights, updates, alpha=...)`: float32 weights, bf16
updates (where the iteration runs in bf16), a tall matrix's update a transposed view. Mixed dtypes
and strides miss the foreach fast path on CUDA, so it runs as one `add_` per matrix. The other row
gives the fast path what it needs first (the updates cast to float32 and made contiguous, one stack
per shape, the cast counted) and then adds each shape's list at once. Printed: milliseconds per
step for each, over the config's matrices (GPT-2 small: 72), the median of `--rounds`.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpt.bench.speed import synchronize  # noqa: E402
from gpt.config import load_config  # noqa: E402
from gpt.device import pick_device  # noqa: E402
from gpt.model import GPTModel  # noqa: E402
from gpt.optim import indices_by, muon_parameters  # noqa: E402


def median_ms(step, device: torch.device, rounds: int) -> float:
    times = []
    for _ in range(rounds + 3):  # 3 to warm up
        synchronize(device)
        started = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times[3:]) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="gpt2-124m.yaml")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    device = pick_device(args.device, option="--device")
    weights = [p.detach() for p in muon_parameters(GPTModel(load_config(args.config).model).to(device))]
    groups = indices_by([(min(w.shape), max(w.shape)) for w in weights])  # as Muon stacks them
    # each shape's orthogonalised stack in bf16, the tall ones transposed back to views, as Muon has them
    stacks = [torch.randn(len(g), *sorted(weights[g[0]].shape), device=device, dtype=torch.bfloat16) for g in groups]
    views = [[s.mT if weights[i].shape[0] > weights[i].shape[1] else s for s, i in zip(stack.unbind(0), g)]
             for stack, g in zip(stacks, groups)]

    def as_today() -> None:  # gpt/optim.py: mixed dtypes and strides
        for g, updates in zip(groups, views):
            torch._foreach_add_([weights[i] for i in g], updates, alpha=-1e-9)

    def fast_path() -> None:  # float32 and contiguous first, then one foreach add per shape
        for g, updates in zip(groups, views):
            for same in indices_by([weights[i].shape for i in g]):
                ready = torch.stack([updates[j] for j in same]).float()  # one copy: cast and layout
                torch._foreach_add_([weights[g[j]] for j in same], list(ready.unbind(0)), alpha=-1e-9)

    today, fast = median_ms(as_today, device, args.rounds), median_ms(fast_path, device, args.rounds)
    print(f"Muon's update add over {len(weights)} matrices on {device}, median of {args.rounds}: "
          f"as gpt/optim.py does it {today:.3f} ms; through the foreach fast path (cast included) {fast:.3f} ms "
          f"({today / fast:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
