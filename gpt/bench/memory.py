"""Peak training memory with and without activation checkpointing: `python -m gpt bench memory`.

`python -m gpt bench memory --config X [--section.key=value ...]` trains the config's model
for a few steps (random token ids: memory does not depend on the text) twice, with
`train.activation_checkpointing` off and on, each in a fresh Python process, and prints the
peak memory of each and their ratio:

- on a GPU, `torch.cuda.max_memory_allocated` over the steps: the tensors themselves, the
  number that decides whether a run fits;
- on a CPU, the process's peak resident memory (`resident_peak`), which a process can only read
  for itself, hence one process per setting. It includes what importing torch and building the
  model take, printed apart as "before training", and glibc's default allocation is kept (see
  `measure`), so it follows the tensors alive at once rather than train.py's retained heap.

The training steps are `train_step` on the model `train.py` builds, with the config's dtype,
compile setting and optimizer, so the optimizer state (created at the first step) is counted.
What the recomputation costs in time is for `gpt.bench` to measure, with both settings timed in
turns in one process: `python -m gpt bench --config X --variants sdpa:auto:auto:ckpt`.
`--only off|on` measures one setting in this process and prints it as one JSON line (what
each child runs).
"""

import dataclasses
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

from gpt.config import Config, load_config
from gpt.errors import ArgumentParser, UserError, run_cli
from gpt.model import GPTModel
from gpt.optim import build_optimizer
from gpt.precision import Precision, pick_dtype
from gpt.training import compile_model, pick_device, setup_device, train_step

SETTINGS = {"off": False, "on": True}
GIB = 2**30


def resident_peak() -> int:
    """This process's peak resident memory so far, in bytes.

    Linux: VmHWM, the high-water mark of this program's own memory. (`ru_maxrss` would do on a
    process of its own, but a child started from a larger process, as pytest is, inherits the
    parent's figure across exec.) Elsewhere `ru_maxrss` (bytes on macOS).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def measure(cfg: Config, device: torch.device, steps: int) -> dict:
    """Train `steps` steps of `cfg` here -> {"before": bytes, "peak": bytes, "kind": what was measured}."""
    if device.type == "cuda":
        setup_device(device)  # TF32, as train.py
    # Not on a CPU: train.py's keep_freed_memory keeps every freed block in the process, so its
    # RSS is a high-water mark of the heap that depends on the order of frees (it varied by half a
    # GB from run to run). glibc's default returns large blocks when they are freed, so the peak
    # follows the tensors alive at once.
    torch.manual_seed(cfg.train.seed)
    model = GPTModel(cfg.model).to(device).train()
    net = compile_model(model, cfg.train.compile, device)
    optimizer = build_optimizer(model, cfg.train, device)
    precision = Precision(pick_dtype(cfg.train.dtype, device), device)
    shape = (cfg.data.batch_size, cfg.model.context_length)
    generator = torch.Generator().manual_seed(0)
    batches = iter([tuple(torch.randint(0, cfg.model.vocab_size, shape, generator=generator).to(torch.uint16)
                          for _ in range(2)) for _ in range(steps * cfg.train.grad_accum_steps)])
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if cuda else resident_peak()
    for _ in range(steps):
        train_step(net, batches, optimizer, precision, cfg.train, device)  # syncs: it reads the loss
    peak = torch.cuda.max_memory_allocated(device) if cuda else resident_peak()
    return {"before": before, "peak": peak, "kind": "CUDA max allocated" if cuda else "peak resident (RSS)"}


def child(argv: list[str], setting: str) -> dict:
    """`measure` for `setting` in a fresh Python process: its JSON line, read back."""
    package_root = str(Path(__file__).resolve().parents[2])  # the folder holding gpt/
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "gpt.bench", "memory", *argv, "--only", setting],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        lines = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()
        raise UserError(f"the child measuring activation checkpointing {setting} failed: {lines[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(cfg: Config, device: torch.device, steps: int, results: dict[str, dict]) -> None:
    """The two settings side by side, and on / off."""
    m, off, on = cfg.model, results["off"], results["on"]
    print(f"peak memory over {steps} training step{'s' if steps > 1 else ''}, each setting in a fresh process: "
          f"{device}, "
          f"{m.n_layers} layers, {m.emb_dim} wide, context {m.context_length}, dropout {m.drop_rate}, "
          f"batch {cfg.data.batch_size} x {cfg.train.grad_accum_steps} accumulation, dtype {cfg.train.dtype}, "
          f"compile {cfg.train.compile}; {off['kind']}")
    print(f"{'activation checkpointing':<26} {'peak':>10} {'before training':>16} {'training':>10}")
    for name, r in (("off", off), ("on", on)):
        print(f"{name:<26} {r['peak'] / GIB:>8.2f} G {r['before'] / GIB:>14.2f} G "
              f"{(r['peak'] - r['before']) / GIB:>8.2f} G")
    training = (on["peak"] - on["before"]) / max(off["peak"] - off["before"], 1)
    print(f"{'on / off':<26} {on['peak'] / off['peak']:>9.2f}x {'':>16} {training:>9.2f}x")
    print("(training: the peak less what the process held before the first step)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = ArgumentParser(
        prog="python -m gpt bench memory",
        description="Peak training memory with activation checkpointing off and on, each in a fresh "
        "process. Any --section.key=value override applies to both.", allow_abbrev=False)
    parser.add_argument("--config", help="YAML config: a path or a file name in configs/")
    parser.add_argument("--steps", type=int, default=2, help="training steps per setting (the first "
                        "creates the optimizer state)")
    parser.add_argument("--device", default="auto", help="auto, cpu, mps or cuda[:N]")
    parser.add_argument("--only", choices=list(SETTINGS), help="measure this setting in this process "
                        "and print it as JSON (what each child runs)")
    args, overrides = parser.parse_known_args(argv)

    def work() -> None:
        if args.steps < 1:
            raise UserError("--steps must be at least 1")
        cfg = load_config(args.config, overrides)
        device = pick_device(args.device, option="--device")
        if args.only is not None:
            cfg.train = dataclasses.replace(cfg.train, activation_checkpointing=SETTINGS[args.only])
            print(json.dumps(measure(cfg, device, args.steps)))
            return
        results = {setting: child(argv, setting) for setting in SETTINGS}
        report(cfg, device, args.steps, results)

    return run_cli(work)


if __name__ == "__main__":
    sys.exit(main())
