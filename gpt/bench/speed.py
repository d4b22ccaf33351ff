"""Measure training and sampling speed: `python -m gpt bench --config small.yaml [options]`.

(`python -m gpt bench race ...` races optimizers and settings for loss per second: gpt/bench/race.py;
`python -m gpt bench memory ...` measures peak memory with and without activation checkpointing:
gpt/bench/memory.py; `python -m gpt bench prep ...` measures corpus preparation on 1 and N
processes: gpt/bench/prep.py.)

Every figure is measured against a baseline in the same run, because absolute speed on a shared
machine drifts: the baseline is the plain path (explicit attention, float32, no compile,
per-tensor AdamW, vocabulary not padded), the default is what `train.py` does with the config,
and `--variants` adds others (each with the config's other settings and fused AdamW; `:ckpt` adds
activation checkpointing); `--ddp` adds
the default path inside DistributedDataParallel in a group of one process, which is what the
wrapper costs a multi-GPU run beyond the gradient exchange itself. Variants are
timed in turns (round-robin, `--rounds` times) and the median is reported, so a slow spell on
the machine hits all of them alike.

First the settings a matched comparison needs (micro-batch, accumulation, dropout, clipping,
optimizer, dtype, compile) and the command that repeats them. Printed per variant: milliseconds
per optimizer step, training tokens/s, achieved FLOP/s, MFU (model FLOPs utilisation: achieved /
peak) and peak memory; then sampling tokens/s in the steady state with and without the KV cache,
and on CUDA (or with `--sample.compile=true`) with the one-token step compiled, CUDA graphs on
CUDA, with the first two calls' time apart. `--optimizer-steps` adds the optimizer step (the
plain `step()` and the skip path training runs, each with its aten ops) and clipping alone, each
as a share of a training step. FLOPs per token follow the PaLM paper's estimate used by nanoGPT:
6 * N for the matmuls (N = parameters, embedding excluded, LM head included) plus
12 * n_layers * context_length * emb_dim for attention. The peak is measured here on a CPU (a
large matmul in the variant's dtype); on a GPU it comes from the table of datasheet peaks below.
The input is random token ids: speed does not depend on the text.
"""

import copy
import dataclasses
import functools
import resource
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from gpt.compiled import compile_model
from gpt.config import Config, load_config
from gpt.device import pick_device, setup_device
from gpt.distributed import Distributed, SINGLE, single_process_group
from gpt.errors import ArgumentParser, UserError, run_cli
from gpt.model import GPTModel, ModelConfig
from gpt.optim import build_optimizer, muon_parameters, steps_unless
from gpt.precision import DTYPES, Precision, dtype_name, pick_dtype
from gpt.sampling import decoding_dtype, for_decoding, generate
from gpt.training import train_step

# Dense (no sparsity) tensor-core peaks from NVIDIA's datasheets, in TFLOP/s: bf16/fp16, and
# tf32 (what float32 matmuls run as here). Matched against the device name, first match wins.
GPU_PEAK_TFLOPS = [
    ("H200", {"bf16": 989.0, "tf32": 494.0}),
    ("H100 PCIe", {"bf16": 756.0, "tf32": 378.0}),
    ("H100 NVL", {"bf16": 835.0, "tf32": 418.0}),
    ("H100", {"bf16": 989.0, "tf32": 494.0}),  # SXM
    ("GH200", {"bf16": 989.0, "tf32": 494.0}),
    ("A100", {"bf16": 312.0, "tf32": 156.0}),
    ("L40S", {"bf16": 362.0, "tf32": 183.0}),
    ("L4", {"bf16": 121.0, "tf32": 60.0}),
    ("A10G", {"bf16": 70.0, "tf32": 35.0}),
    ("A10", {"bf16": 125.0, "tf32": 62.5}),
    ("RTX 4090", {"bf16": 165.2, "tf32": 82.6}),
    ("RTX 3090", {"bf16": 71.0, "tf32": 35.6}),
    ("V100", {"bf16": 125.0, "tf32": 15.7}),  # fp16 tensor cores; no tf32 (fp32 peak given)
    ("T4", {"bf16": 65.0, "tf32": 8.1}),  # fp16; no bf16 or tf32 (fp32 peak given)
]


@dataclass
class Variant:
    """One way of running the same model: attention path, autocast dtype, compile or not."""

    name: str
    attn_impl: str
    dtype: str  # a train.dtype value
    compile: bool | str
    fused_adamw: bool = True
    vocab_pad_multiple: int | None = None  # None: the config's
    ddp: bool = False  # inside DistributedDataParallel (needs a process group)
    activation_checkpointing: bool = False  # or the config's train.activation_checkpointing


def parse_variant(text: str) -> Variant:
    """`sdpa:bfloat16:on[:ckpt]` -> Variant (attention impl : dtype : compile [: activation checkpointing])."""
    parts = text.split(":")
    compile_values = {"on": True, "off": False, "auto": "auto"}
    if (len(parts) not in (3, 4) or parts[0] not in ("sdpa", "explicit") or parts[1] not in (*DTYPES, "auto")
            or parts[2] not in compile_values or parts[3:] not in ([], ["ckpt"])):
        raise UserError(f"cannot read variant {text!r}; write it as IMPL:DTYPE:COMPILE[:ckpt], "
                        "e.g. sdpa:bfloat16:on (impl sdpa|explicit, dtype auto|float32|bfloat16|float16, "
                        "compile on|off|auto; ckpt: with activation checkpointing)")
    return Variant(text, parts[0], parts[1], compile_values[parts[2]], activation_checkpointing=parts[3:] == ["ckpt"])


def flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token (forward + backward), the PaLM / nanoGPT estimate."""
    d, n_layers = cfg.emb_dim, cfg.n_layers
    per_block = 12 * d * d  # qkv (3d^2), out projection (d^2), MLP (8d^2); biases ignored
    matmul_params = n_layers * per_block + cfg.vocab_size * d  # the head, over the real vocabulary
    return 6 * matmul_params + 12 * n_layers * cfg.context_length * d


def gpu_peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float | None, str]:
    """Datasheet peak for this GPU and dtype, or None with the reason."""
    name = torch.cuda.get_device_name(device)
    for key, peaks in GPU_PEAK_TFLOPS:
        if key in name:
            kind = "tf32" if dtype == torch.float32 else "bf16"
            return peaks[kind] * 1e12, f"{name}, datasheet {kind} peak {peaks[kind]:g} TFLOP/s"
    return None, f"{name}: peak unknown (not in gpt/bench/speed.py's table), so no MFU"


def cpu_peak_flops(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of a (size x size) @ (size x size) matmul in `dtype` on this CPU."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    a @ b  # warm up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TrainBench:
    """A model, optimizer and precision for one variant, ready to time optimizer steps."""

    def __init__(self, variant: Variant, cfg: Config, device: torch.device, batches: list):
        self.variant = variant
        model_cfg = dataclasses.replace(cfg.model,
                                        vocab_pad_multiple=variant.vocab_pad_multiple or cfg.model.vocab_pad_multiple)
        self.train_cfg = dataclasses.replace(
            cfg.train, dtype=variant.dtype, compile=variant.compile,
            activation_checkpointing=variant.activation_checkpointing or cfg.train.activation_checkpointing)
        torch.manual_seed(cfg.train.seed)
        self.model = GPTModel(model_cfg).use_attention(variant.attn_impl).to(device).train()
        self.dist = Distributed(launched=True) if variant.ddp else SINGLE
        wrapped = self.dist.wrap(self.model, device)
        self.net = compile_model(wrapped, variant.compile, device)
        self.compiled = self.net is not wrapped
        self.optimizer = build_optimizer(self.model, self.train_cfg, device, fused=variant.fused_adamw)
        self.dtype = pick_dtype(variant.dtype, device)
        self.precision = Precision(self.dtype, device)
        self.device = device
        self.batches = batches
        self.times: list[float] = []  # seconds per step, one entry per timed round
        self.peak_memory = 0

    def steps(self, count: int) -> float:
        """Run `count` optimizer steps; return seconds per step (0 for no steps)."""
        if count == 0:
            return 0.0
        batches = iter(self.batches * (count * self.train_cfg.grad_accum_steps // len(self.batches) + 1))
        synchronize(self.device)
        started = time.perf_counter()
        for _ in range(count):
            train_step(self.net, batches, self.optimizer, self.precision, self.train_cfg, dist=self.dist)
        synchronize(self.device)
        return (time.perf_counter() - started) / count


def bench_training(cfg: Config, device: torch.device, variants: list[Variant], steps: int,
                   warmup: int, rounds: int) -> list[TrainBench]:
    """Time every variant in turns; returns them with their per-round step times."""
    generator = torch.Generator().manual_seed(0)
    shape = (cfg.data.batch_size, cfg.model.context_length)
    batches = [tuple(torch.randint(0, cfg.model.vocab_size, shape, generator=generator).to(torch.uint16)
                     for _ in range(2)) for _ in range(4)]
    if device.type == "cuda":
        batches = [(x.pin_memory(), y.pin_memory()) for x, y in batches]
    benches = []
    for variant in variants:
        bench = TrainBench(variant, cfg, device, batches)
        started = time.perf_counter()
        bench.steps(warmup)  # allocations, autotuning and compilation happen here
        print(f"  {variant.name}: set up and warmed up in {time.perf_counter() - started:.1f} s "
              f"({bench.dtype}, compile {'on' if bench.compiled else 'off'})", flush=True)
        benches.append(bench)
    for _ in range(rounds):
        for bench in benches:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            bench.times.append(bench.steps(steps))
            if device.type == "cuda":
                bench.peak_memory = max(bench.peak_memory, torch.cuda.max_memory_allocated(device))
    return benches


def bench_sampling(cfg: Config, device: torch.device, new_tokens: int, prompt_tokens: int,
                   rounds: int) -> dict[str, list[float]]:
    """Greedy decoding of one sequence, in the precision generate.py decodes in: the seconds of each
    of `rounds` + 1 calls, by path (the first call of the compiled step includes its compile).

    Paths: the KV cache, recomputing the window, and where `sample.compile` is true (or auto, on
    CUDA) the compiled one-token step. The paths take turns, so a slow spell hits all of them.
    """
    torch.manual_seed(cfg.train.seed)
    model = for_decoding(GPTModel(cfg.model).to(device), device)
    prompt = torch.randint(0, cfg.model.vocab_size, (1, prompt_tokens), device=device)
    paths = {"kv cache": {"compile": False}, "recompute": {"kv_cache": False}}
    if cfg.sample.compile is True or (cfg.sample.compile == "auto" and device.type == "cuda"):
        paths["compiled step" + (" (CUDA graphs)" if device.type == "cuda" else "")] = {"compile": True}
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    outputs = {}
    for _ in range(rounds + 1):
        for name, options in paths.items():
            synchronize(device)
            started = time.perf_counter()
            outputs[name] = generate(model, prompt, new_tokens, temperature=0, **options)
            synchronize(device)
            seconds[name].append(time.perf_counter() - started)
    if any(not torch.equal(out, outputs["recompute"]) for out in outputs.values()):
        print("  note: greedy tokens differ between the paths (numerical near-tie)")
    return seconds


def sampling_report(seconds: dict[str, list[float]], new_tokens: int) -> list[str]:
    """One line per path: tokens/s in the steady state (the median of the calls after the first),
    against recomputing, and the first and second calls' overhead over the steady state."""
    steady = {name: statistics.median(times[1:]) for name, times in seconds.items()}
    lines = []
    for name, times in seconds.items():
        rate = new_tokens / steady[name]
        over = [f"{t - steady[name]:+.2f} s" for t in times[:2]]
        lines.append(f"  {name + ':':<34} {rate:>8,.0f} tokens/s  {steady['recompute'] / steady[name]:>6.2f}x "
                     f"recompute   first call {over[0]}, second {over[1]}")
    return lines


def peak_for(device: torch.device, dtype: torch.dtype, cpu_peaks: dict) -> tuple[float | None, str]:
    """Peak FLOP/s to compare against, and where it comes from."""
    if device.type == "cuda":
        return gpu_peak_flops(device, dtype)
    if device.type == "cpu":
        if dtype not in cpu_peaks:
            cpu_peaks[dtype] = cpu_peak_flops(dtype)
        return cpu_peaks[dtype], f"CPU {dtype} matmul measured now: {cpu_peaks[dtype] / 1e9:.1f} GFLOP/s"
    return None, f"{device.type}: peak unknown, so no MFU"


def report(cfg: Config, device: torch.device, benches: list[TrainBench]) -> None:
    """Print the training table: one row per variant, speed relative to the baseline."""
    tokens_per_step = cfg.data.batch_size * cfg.model.context_length * cfg.train.grad_accum_steps
    per_token = flops_per_token(cfg.model)
    cpu_peaks: dict = {}
    baseline = statistics.median(benches[0].times)
    print(f"\ntraining: {tokens_per_step:,} tokens per step, {per_token / 1e6:.1f} MFLOP per token; "
          f"median of {len(benches[0].times)} rounds")
    header = f"{'variant':<34} {'ms/step':>9} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak mem':>9} {'speed-up':>8}"
    print(header)
    print("-" * len(header))
    notes = []
    for bench in benches:
        seconds = statistics.median(bench.times)
        achieved = per_token * tokens_per_step / seconds
        peak, source = peak_for(device, bench.dtype, cpu_peaks)
        mfu = f"{achieved / peak:.1%}" if peak else "n/a"
        memory = f"{bench.peak_memory / 2**30:.2f}G" if bench.peak_memory else "-"
        print(f"{bench.variant.name:<34} {seconds * 1e3:>9.1f} {tokens_per_step / seconds:>10,.0f} "
              f"{achieved / 1e12:>8.3f} {mfu:>6} {memory:>9} {baseline / seconds:>7.2f}x")
        if source not in notes:
            notes.append(source)
    for note in notes:
        print(f"  peak: {note}")
    in_ddp = [bench for bench in benches if bench.variant.ddp]
    if in_ddp:  # benches[1] is the default path, the same variant without the wrapper
        ratio = statistics.median(benches[1].times) / statistics.median(in_ddp[0].times)
        print(f"  DDP wrapper: the default path inside DDP runs at {ratio:.3f}x its speed without it")
    if device.type == "cpu":
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        print(f"  peak memory (whole process, all variants): {rss:.2f} GiB resident")


def bench_optimizer_steps(cfg: Config, device: torch.device, step_seconds: float, rounds: int) -> None:
    """Time the optimizer step alone for AdamW, Muon as chosen here, and torch's Muon (bf16 inside), each as
    a share of `step_seconds` (the default path's whole training step): the plain `step()`, and beside it
    `steps_unless` as `train_step` runs it (the non-finite skip decided on the device, nothing to skip).
    Each with its aten ops per step: the top-level calls torch.profiler records (views included)."""
    torch.manual_seed(cfg.train.seed)
    model = GPTModel(cfg.model).to(device)
    inputs = torch.randint(0, cfg.model.vocab_size, (cfg.data.batch_size, cfg.model.context_length), device=device)
    model(inputs, targets=inputs.roll(-1, 1)).backward()  # gradients to step with
    muon_matrices = muon_parameters(model)
    options = {"lr": cfg.train.muon_lr, "momentum": cfg.train.muon_momentum, "weight_decay": 0.0}
    candidates = [
        ("adamw (fused)", build_optimizer(model, dataclasses.replace(cfg.train, optimizer="adamw"), device)),
        ("muon + adamw, as train.py builds it", build_optimizer(model, dataclasses.replace(cfg.train, optimizer="muon"), device)),
        ("  its muon part alone", build_optimizer(model, dataclasses.replace(cfg.train, optimizer="muon"), device).muon),
        ("  torch.optim.Muon (bf16 inside)", torch.optim.Muon(muon_matrices, **options)),
    ]
    nothing_to_skip = torch.zeros((), dtype=torch.bool, device=device)  # train_step's ~finite, all finite

    def aten_ops(step) -> int:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            step()

        def top_level(event) -> bool:  # not called from inside another aten op
            parent = event.cpu_parent
            while parent is not None and not parent.name.startswith("aten::"):
                parent = parent.cpu_parent
            return parent is None

        return sum(event.name.startswith("aten::") and top_level(event) for event in profiler.events())

    print(f"\noptimizer step alone (median of {rounds}), as a share of the default path's "
          f"{step_seconds * 1e3:.1f} ms training step:\n"
          "  step() is the plain step; steps_unless is train_step's (the non-finite skip, decided on the device);\n"
          "  aten ops: the top-level aten calls of one step, counted with torch.profiler")
    print(f"  {'':<38}" + "   ".join(f"{path + ' ms':>15} {'share':>7} {'aten ops':>9}"
                                     for path in ("step()", "steps_unless")))
    if cfg.train.grad_clip > 0:  # what train_step adds to the step when clipping is on
        times = []
        for _ in range(rounds):
            synchronize(device)
            started = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            synchronize(device)
            times.append(time.perf_counter() - started)
        seconds = statistics.median(times)
        print(f"  {'clip_grad_norm_ (train.grad_clip)':<38}{seconds * 1e3:>12.1f} ms {seconds / step_seconds:>7.1%}")
    for name, optimizer in candidates:
        state = copy.deepcopy(model.state_dict())
        paths = {"step()": optimizer.step}
        if steps_unless(optimizer, nothing_to_skip):  # first step: creates the state
            paths["steps_unless"] = functools.partial(steps_unless, optimizer, nothing_to_skip)
        else:  # it cannot skip on the device: train_step syncs, then calls step()
            optimizer.step()
        ops = {path: aten_ops(step) for path, step in paths.items()}
        times = {path: [] for path in paths}
        for _ in range(rounds):  # in turns, so a slow spell on the machine hits both
            for path, step in paths.items():
                synchronize(device)
                started = time.perf_counter()
                step()
                synchronize(device)
                times[path].append(time.perf_counter() - started)
        model.load_state_dict(state)
        cells = [f"{statistics.median(t) * 1e3:>12.1f} ms {statistics.median(t) / step_seconds:>7.1%} {ops[path]:>9}"
                 for path, t in times.items()]
        print(f"  {name:<38}" + "   ".join(cells))


def matched_settings(cfg: Config, config_name: str | None) -> str:
    """The settings a comparison with another trainer must match, and the command that repeats them."""
    m, t = cfg.model, cfg.train
    settings = {"data.batch_size": cfg.data.batch_size, "train.grad_accum_steps": t.grad_accum_steps,
                **{f"model.{key}": rate for key, rate in m.dropout_settings().items()},
                "train.grad_clip": t.grad_clip, "train.optimizer": t.optimizer,
                "train.dtype": t.dtype, "train.compile": str(t.compile).lower()}
    return (f"settings (the default row): micro-batch {cfg.data.batch_size} x {m.context_length} tokens, "
            f"{t.grad_accum_steps} accumulation step(s), dropout {m.dropout_text()}, grad clip "
            f"{t.grad_clip or 'off'}, optimizer {t.optimizer}, dtype {t.dtype}, compile {t.compile}\n"
            f"  to repeat: python -m gpt bench --config {config_name or '<defaults>'} "
            + " ".join(f"--{key}={value}" for key, value in settings.items()))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = ArgumentParser(prog="python -m gpt bench",
        description="Benchmark training and sampling speed for a config (any --section.key=value "
        "override applies, e.g. --data.batch_size=8).", allow_abbrev=False)
    parser.add_argument("--config", help="YAML config: a path or a file name in configs/")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per timed round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile happens here)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per variant, taken in turns")
    parser.add_argument("--variants", default="",
                        help="extra comma-separated IMPL:DTYPE:COMPILE[:ckpt] variants, e.g. sdpa:float32:off or "
                        "sdpa:auto:auto:ckpt (with activation checkpointing)")
    parser.add_argument("--ddp", action="store_true",
                        help="also time the default path inside DistributedDataParallel (one process)")
    parser.add_argument("--optimizer-steps", action="store_true",
                        help="also time the optimizer step alone (step(), and steps_unless as train_step runs it, "
                        "with aten ops per step): AdamW, Muon, and torch's Muon in bf16")
    parser.add_argument("--sample-tokens", type=int, default=200, help="new tokens per sampling run (0: skip)")
    parser.add_argument("--prompt-tokens", type=int, default=8, help="prompt length for the sampling runs")
    parser.add_argument("--device", default="auto", help="auto, cpu, mps or cuda[:N]")
    args, overrides = parser.parse_known_args(argv)

    def work() -> None:
        if min(args.steps, args.rounds) < 1 or args.warmup < 0 or args.sample_tokens < 0 or args.prompt_tokens < 1:
            raise UserError("--steps, --rounds and --prompt-tokens must be at least 1; --warmup, --sample-tokens 0 or more")
        cfg = load_config(args.config, overrides)
        device = pick_device(args.device, option="--device")
        setup_device(device)
        variants = [Variant("baseline (plain path)", "explicit", "float32", False, fused_adamw=False,
                            vocab_pad_multiple=1),
                    Variant(f"default ({cfg.train.attn_impl} {cfg.train.dtype} compile={cfg.train.compile})",
                            cfg.train.attn_impl, cfg.train.dtype, cfg.train.compile)]
        variants += [parse_variant(v) for v in args.variants.split(",") if v]
        if args.ddp:
            variants.append(dataclasses.replace(variants[1], name="default in DDP (1 process)", ddp=True))
        m = cfg.model
        print(f"device: {device}; torch {torch.__version__}; {torch.get_num_threads()} threads")
        print(f"model: {m.n_layers} layers, {m.n_heads} heads, {m.emb_dim} wide, context {m.context_length}; "
              f"batch {cfg.data.batch_size} x {cfg.train.grad_accum_steps} accumulation")
        print(matched_settings(cfg, args.config))
        group = single_process_group(device) if args.ddp else SINGLE
        try:
            benches = bench_training(cfg, device, variants, args.steps, args.warmup, args.rounds)
        finally:
            group.close()
        report(cfg, device, benches)
        if args.optimizer_steps:
            bench_optimizer_steps(cfg, device, statistics.median(benches[1].times), args.rounds)
        if args.sample_tokens:
            seconds = bench_sampling(cfg, device, args.sample_tokens, args.prompt_tokens, max(args.rounds, 2))
            fits = args.prompt_tokens + args.sample_tokens <= m.context_length
            print(f"\nsampling: {args.sample_tokens} new tokens after a {args.prompt_tokens}-token prompt, "
                  f"batch 1, greedy, context {m.context_length}, weights in {dtype_name(decoding_dtype(device))}"
                  + ("" if fits else " (the cache fills up; the rest is recomputed)"))
            print("  tokens/s in the steady state (the median of the calls after the first); each of the first "
                  "two calls' time over it (the first includes any compile)")
            for line in sampling_report(seconds, args.sample_tokens):
                print(line)

    return run_cli(work)


if __name__ == "__main__":
    sys.exit(main())
