"""Which attention kernel training and one-token decoding get, and what cuDNN's kernel costs decoding.

    python scripts/sdpa_decoding.py kernels                    # versions, and the kernel each call gets
    python scripts/sdpa_decoding.py time --cudnn avoided       # what generate.py does
    python scripts/sdpa_decoding.py time --cudnn allowed       # with cuDNN back among the kernels

`kernels` prints torch's and cuDNN's versions, then the kernel `torch._fused_sdp_choice` picks for
the model's shapes in the precision it decodes in (bf16 on a GPU with it): a training call (a batch
of full windows, causal) and a one-token decoding call after half a window of cached keys, the
latter with torch's kernels and with the ones decoding allows (`gpt.sampling.DECODING_KERNELS`).

`time` decodes 200 greedy tokens with the KV cache, uncompiled (generate.py's path; `--compile`:
the one-token step compiled, CUDA graphs on CUDA), after an 8-token prompt, from a randomly
initialised model: the first call (cuDNN builds its graphs here), then the median of 3 more. Run each setting in a process of its own, so that neither finds the
other's graphs in cuDNN's cache. `--config` picks the shape (default: GPT-2 small, gpt2-124m.yaml).
scripts/gpu_check.sh runs all three.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpt import sampling  # noqa: E402
from gpt.bench.speed import synchronize  # noqa: E402
from gpt.config import load_config  # noqa: E402
from gpt.device import pick_device, setup_device  # noqa: E402
from gpt.model import GPTModel, ModelConfig  # noqa: E402
from gpt.precision import dtype_name  # noqa: E402
from gpt.sampling import decoding_dtype, for_decoding, generate  # noqa: E402

BACKEND_NAMES = {int(backend): name for name, backend in SDPBackend.__members__.items()}
ALL_KERNELS = [backend for backend in SDPBackend.__members__.values() if backend != SDPBackend.ERROR]


def kernel_choice(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, causal: bool) -> str:
    """The SDPA kernel torch picks for this call under the kernels enabled now."""
    return BACKEND_NAMES[torch._fused_sdp_choice(queries, keys, values, is_causal=causal)]


def kernels(cfg: ModelConfig, batch_size: int, device: torch.device) -> None:
    dtype = decoding_dtype(device)
    heads, head_dim, context = cfg.n_heads, cfg.emb_dim // cfg.n_heads, cfg.context_length
    cudnn = torch.backends.cudnn.version() if device.type == "cuda" else None
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(f"torch {torch.__version__}, cuDNN {cudnn or 'none'} on {device}{gpu}; attention in {dtype_name(dtype)}")
    window = torch.randn(batch_size, heads, context, head_dim, device=device, dtype=dtype)
    print(f"  training call, {batch_size} windows of {context}, causal: {kernel_choice(window, window, window, True)}")
    # generate.py's one-token step: one query against the filled slots of the kept cache
    cached = context // 2
    slots = torch.randn(1, heads, context, head_dim, device=device, dtype=dtype)[:, :, :cached + 1]
    query = torch.randn(1, heads, 1, head_dim, device=device, dtype=dtype)
    print(f"  one-token decoding call after {cached} cached tokens, torch's kernels: "
          f"{kernel_choice(query, slots, slots, False)}")
    with sdpa_kernel(sampling.DECODING_KERNELS):
        print(f"  the same call in DECODING_KERNELS (generate.py's): {kernel_choice(query, slots, slots, False)}")


def timed(cfg: ModelConfig, device: torch.device, tokens: int, calls: int, compile: bool) -> list[float]:
    """Seconds of each of `calls` greedy decodings of `tokens` tokens with the KV cache, the one-token step
    compiled or not."""
    torch.manual_seed(0)
    model = for_decoding(GPTModel(cfg).to(device), device)
    prompt = torch.randint(0, cfg.vocab_size, (1, 8), device=device)
    seconds = []
    for _ in range(calls):
        synchronize(device)
        started = time.perf_counter()
        generate(model, prompt, tokens, temperature=0, compile=compile)
        synchronize(device)
        seconds.append(time.perf_counter() - started)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["kernels", "time"])
    parser.add_argument("--cudnn", choices=["avoided", "allowed"], default="avoided",
                        help="time: decode in DECODING_KERNELS (avoided, generate.py's), or with cuDNN's too")
    parser.add_argument("--config", default="gpt2-124m.yaml", help="the model's shape (a config in configs/)")
    parser.add_argument("--tokens", type=int, default=200, help="time: greedy tokens per call")
    parser.add_argument("--compile", action="store_true",
                        help="time: the one-token step compiled (CUDA graphs on CUDA): one shape, so one cuDNN graph")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    device = pick_device(args.device, option="--device")
    setup_device(device)
    if args.what == "kernels":
        kernels(cfg.model, cfg.data.batch_size, device)
        return 0
    if args.cudnn == "allowed":
        sampling.DECODING_KERNELS = ALL_KERNELS
    seconds = timed(cfg.model, device, args.tokens, calls=4, compile=args.compile)
    steady = statistics.median(seconds[1:])
    step = "compiled" if args.compile else "uncompiled"
    print(f"cuDNN {args.cudnn} in decoding ({len(sampling.DECODING_KERNELS)} kernels enabled, {step}), {args.tokens} greedy "
          f"tokens in {dtype_name(decoding_dtype(device))}: first call {seconds[0]:.2f} s ({args.tokens / seconds[0]:,.0f} tokens/s), "
          f"then {args.tokens / steady:,.0f} tokens/s (median of {len(seconds) - 1})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
