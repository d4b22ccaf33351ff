"""What the commands that sample share: the run they read, and the options over its sample settings.

generate.py, chat.py and `python -m gpt attention-map` read a run trained here (its folder or a
checkpoint file; by default the quick start's, `configs/small.yaml`'s) or, for generate.py and the
attention map, GPT-2's weights (`gpt.gpt2`, imported only for them); options left out take the run's
`sample:` settings.
"""

import argparse
import dataclasses

import torch

from gpt.checkpoint import build_model, checkpoint_path, load_model, resolve_model_config, run_checkpoint
from gpt.config import SCRATCH, load_config
from gpt.errors import UserError
from gpt.model import GPTModel, ModelConfig
from gpt.sampling import SampleConfig

DEFAULT_RUN_CONFIG = "small.yaml"  # with no --checkpoint, read the run this config writes (the quick start's)


def default_checkpoint() -> str:
    """The run folder generate.py and python -m gpt attention-map read when given no --checkpoint."""
    return load_config(DEFAULT_RUN_CONFIG).train.out_dir


def load_for_sampling(location: str, device: torch.device) -> tuple[GPTModel, SampleConfig, str]:
    """A model in eval mode on `device`, its sample settings (a run's, or defaults for GPT-2's weights)
    and what it was read from."""
    if run_checkpoint(location) is None and location != SCRATCH:
        from gpt.gpt2.pretrained import is_pretrained_source
        if is_pretrained_source(location):
            cfg = resolve_model_config(ModelConfig(), location)
            return build_model(cfg, location).to(device).eval(), SampleConfig(), location
    path = checkpoint_path(location)
    model, config = load_model(path, device)
    return model, config.sample, str(path)


def add_sample_options(parser: argparse.ArgumentParser, chat: bool = False) -> None:
    """The sampling options of generate.py (and chat.py, which has no --num-samples or --stop-at-eot:
    a reply is one, and ends at its end-of-turn token). Defaults: the run's `sample` section."""
    parser.add_argument("--max-new-tokens", type=int, help="tokens to generate per sample")
    parser.add_argument("--temperature", type=float, help="0 is greedy; higher is more random")
    parser.add_argument("--top-k", type=int, help="sample among the k most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, help="sample among the most likely tokens holding "
                        "this probability (1: all)")
    parser.add_argument("--seed", type=int, help="random seed; the same seed gives the same text")
    if not chat:
        parser.add_argument("--num-samples", type=int, help="independent continuations, sampled as a batch")
        parser.add_argument("--stop-at-eot", action=argparse.BooleanOptionalAction,
                            help="end a sample at <|endoftext|>")
    parser.add_argument("--kv-cache", action=argparse.BooleanOptionalAction,
                        help="reuse earlier tokens' keys and values (faster; same tokens)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction,
                        help="compile the one-token step (CUDA graphs on CUDA); the first token waits for "
                        "the compile (default: where it pays, docs/generating.md)")


def sample_config(base: SampleConfig, args: argparse.Namespace) -> SampleConfig:
    """The run's sample settings with the options given on the command line applied."""
    given = {
        "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
        "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed,
        "num_samples": getattr(args, "num_samples", None), "stop_at_eot": getattr(args, "stop_at_eot", None),
        "kv_cache": args.kv_cache, "compile": getattr(args, "compile", None),
    }
    changes = {k: v for k, v in given.items() if v is not None}
    if changes.get("top_k") == 0:
        changes["top_k"] = None  # 0 means no top-k filter
    try:
        return dataclasses.replace(base, **changes)
    except ValueError as e:
        option = str(e).split()[0].replace("sample.", "--").replace("_", "-")
        raise UserError(f"{option}: {e}") from None
