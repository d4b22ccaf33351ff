"""Peak training memory of two settings side by side: `python -m gpt bench memory`.

`python -m gpt bench memory --config X [--compare WHAT] [--section.key=value ...]` trains the
config's model for a few steps (random token ids: memory does not depend on the text) in two
settings, each in a fresh Python process, and prints the peak memory of each, its step time, its
trainable parameters and the ratios. `--compare` picks the two:

- `activation-checkpointing` (the default): `train.activation_checkpointing` off and on;
- `lora`: full fine-tuning against LoRA (`gpt.lora`, with the config's `train.lora` or the
  defaults), both with AdamW. The base is random weights of the config's shape: what LoRA costs
  does not depend on what the weights are, and a bench needs no download (the training CLI, which
  does care, refuses LoRA on random weights).

Memory is:
- on a GPU, `torch.cuda.max_memory_allocated` over the steps: the tensors themselves, the
  number that decides whether a run fits;
- on a CPU, the process's peak resident memory (`resident_peak`), which a process can only read
  for itself, hence one process per setting. It includes what importing torch and building the
  model take, printed apart as "before training", and glibc's default allocation is kept (see
  `measure`), so it follows the tensors alive at once rather than train.py's retained heap.

The training steps are `train_step` on the model `train.py` builds, with the config's dtype,
compile setting and optimizer, so the optimizer state (created at the first step) is counted.
The step time is the mean over the steps after the first (which creates that state, and compiles
when compiling), or the first alone with `--steps 1`: a rough figure, one setting per process; for
a careful comparison of speed, `python -m gpt bench --config X --variants sdpa:auto:auto:ckpt`
times settings in turns in one process. `--only SETTING` measures one setting in this process and
prints it as one JSON line (what each child runs).
"""

import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from gpt.compiled import compile_model
from gpt.config import Config, LoRAConfig, load_config
from gpt.device import pick_device, setup_device
from gpt.errors import ArgumentParser, UserError, run_cli
from gpt.lora import add_adapters
from gpt.model import GPTModel
from gpt.optim import build_optimizer
from gpt.precision import Precision, pick_dtype
from gpt.training import train_step

# --compare: the two settings, by name, as the changes each makes to train's section.
COMPARISONS = {
    "activation-checkpointing": {"off": {"activation_checkpointing": False}, "on": {"activation_checkpointing": True}},
    "lora": {"full": {"lora": None}, "lora": {}},  # lora: the config's train.lora, or the defaults (`setting_config`)
}
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


def setting_config(cfg: Config, compare: str, setting: str) -> Config:
    """`cfg` in `setting` of the `compare` comparison."""
    changes = dict(COMPARISONS[compare][setting])
    if compare == "lora" and setting == "lora":
        changes["lora"] = cfg.train.lora or LoRAConfig()
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))


def measure(cfg: Config, device: torch.device, steps: int) -> dict:
    """Train `steps` steps of `cfg` here -> {"before": bytes, "peak": bytes, "kind": what was measured,
    "trainable": parameters that train, "step_s": seconds a step}."""
    if device.type == "cuda":
        setup_device(device)  # TF32, as train.py
    # Not on a CPU: train.py's keep_freed_memory keeps every freed block in the process, so its
    # RSS is a high-water mark of the heap that depends on the order of frees (it varied by half a
    # GB from run to run). glibc's default returns large blocks when they are freed, so the peak
    # follows the tensors alive at once.
    torch.manual_seed(cfg.train.seed)
    model = GPTModel(cfg.model)
    if cfg.train.lora is not None:  # on random weights: a bench-only base (see the module's docstring)
        add_adapters(model, cfg.train.lora)
    model = model.to(device).train()
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
    seconds = []
    for _ in range(steps):
        started = time.perf_counter()
        train_step(net, batches, optimizer, precision, cfg.train)  # syncs: it reads the loss
        seconds.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated(device) if cuda else resident_peak()
    timed = seconds[1:] or seconds
    return {"before": before, "peak": peak, "kind": "CUDA max allocated" if cuda else "peak resident (RSS)",
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "step_s": sum(timed) / len(timed)}


def child(argv: list[str], setting: str) -> dict:
    """`measure` for `setting` in a fresh Python process: its JSON line, read back."""
    package_root = str(Path(__file__).resolve().parents[2])  # the folder holding gpt/
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "gpt.bench", "memory", *argv, "--only", setting],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        lines = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()
        raise UserError(f"the child measuring {setting} failed: {lines[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(cfg: Config, device: torch.device, steps: int, compare: str, results: dict[str, dict]) -> None:
    """The two settings side by side, and the second / the first."""
    m = cfg.model
    first, second = COMPARISONS[compare]
    adapters = setting_config(cfg, compare, second).train.lora if compare == "lora" else None
    lora = (f"; LoRA rank {adapters.rank}, alpha {adapters.alpha:g} on {', '.join(adapters.targets)}"
            if adapters else "")
    print(f"peak memory over {steps} training step{'s' if steps > 1 else ''}, each setting in a fresh process: "
          f"{device}, "
          f"{m.n_layers} layers, {m.emb_dim} wide, context {m.context_length}, dropout {m.dropout_text()}, "
          f"batch {cfg.data.batch_size} x {cfg.train.grad_accum_steps} accumulation, dtype {cfg.train.dtype}, "
          f"compile {cfg.train.compile}, optimizer {cfg.train.optimizer}{lora}; {results[first]['kind']}")
    print(f"{compare:<26} {'peak':>10} {'before training':>16} {'training':>10} {'trainable':>12} {'step':>9}")
    for name in (first, second):
        r = results[name]
        print(f"{name:<26} {r['peak'] / GIB:>8.2f} G {r['before'] / GIB:>14.2f} G "
              f"{(r['peak'] - r['before']) / GIB:>8.2f} G {r['trainable'] / 1e6:>11.2f}M {r['step_s']:>8.2f}s")
    a, b = results[first], results[second]
    training = (b["peak"] - b["before"]) / max(a["peak"] - a["before"], 1)
    print(f"{second + ' / ' + first:<26} {b['peak'] / a['peak']:>9.2f}x {'':>16} {training:>9.2f}x "
          f"{b['trainable'] / a['trainable']:>11.4f}x {b['step_s'] / a['step_s']:>8.2f}x")
    print("(training: the peak less what the process held before the first step; step: the mean after the first)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = ArgumentParser(
        prog="python -m gpt bench memory",
        description="Peak training memory and step time of two settings, each in a fresh process: activation "
        "checkpointing off and on, or full fine-tuning and LoRA. Any --section.key=value override applies to both.",
        allow_abbrev=False)
    parser.add_argument("--config", help="YAML config: a path or a file name in configs/")
    parser.add_argument("--compare", choices=list(COMPARISONS), default="activation-checkpointing",
                        help="the two settings to measure")
    parser.add_argument("--steps", type=int, default=2, help="training steps per setting (the first "
                        "creates the optimizer state)")
    parser.add_argument("--device", default="auto", help="auto, cpu, mps or cuda[:N]")
    parser.add_argument("--only", help="measure this setting of --compare in this process and print it as JSON "
                        "(what each child runs)")
    args, overrides = parser.parse_known_args(argv)

    def work() -> None:
        if args.steps < 1:
            raise UserError("--steps must be at least 1")
        cfg = load_config(args.config, overrides)
        device = pick_device(args.device, option="--device")
        settings = COMPARISONS[args.compare]
        if args.compare == "lora" and cfg.train.optimizer != "adamw":
            raise UserError(f"--compare lora: LoRA trains with AdamW and train.optimizer is {cfg.train.optimizer}; "
                            "add --train.optimizer=adamw so that both settings use it")
        if args.only is not None:
            if args.only not in settings:
                raise UserError(f"--only {args.only}: --compare {args.compare} has {' and '.join(settings)}")
            print(json.dumps(measure(setting_config(cfg, args.compare, args.only), device, args.steps)))
            return
        results = {setting: child(argv, setting) for setting in settings}
        report(cfg, device, args.steps, args.compare, results)

    return run_cli(work)


if __name__ == "__main__":
    sys.exit(main())
