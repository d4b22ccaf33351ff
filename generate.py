"""Continue a prompt with a trained GPT: `python generate.py "Your journey" [options]`."""

import argparse
import dataclasses
import sys

from gpt.errors import ArgumentParser, UserError, run_cli
from gpt.pretrained import DEFAULT_RUN_CONFIG, default_checkpoint, load_for_sampling
from gpt.sampling import SampleConfig, print_samples
from gpt.training import pick_device


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description="Sample from a trained run. Options left out take the run's sample settings "
        "(the `sample:` section of its config).",
        allow_abbrev=False,
    )
    parser.add_argument("prompt", help="text to continue")
    parser.add_argument("--checkpoint", help="run folder (its best.pt, else latest.pt) or checkpoint file "
                        f"(default: the run configs/{DEFAULT_RUN_CONFIG} writes); or GPT-2's weights: gpt2, "
                        "gpt2-medium, gpt2-large, gpt2-xl or a Hugging Face GPT-2 folder")
    parser.add_argument("--max-new-tokens", type=int, help="tokens to generate per sample")
    parser.add_argument("--temperature", type=float, help="0 is greedy; higher is more random")
    parser.add_argument("--top-k", type=int, help="sample among the k most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, help="sample among the most likely tokens holding "
                        "this probability (1: all)")
    parser.add_argument("--seed", type=int, help="random seed; the same seed gives the same text")
    parser.add_argument("--num-samples", type=int, help="independent continuations, sampled as a batch")
    parser.add_argument("--stop-at-eot", action=argparse.BooleanOptionalAction,
                        help="end a sample at <|endoftext|>")
    parser.add_argument("--kv-cache", action=argparse.BooleanOptionalAction,
                        help="reuse earlier tokens' keys and values (faster; same tokens)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction,
                        help="decode with a static KV cache and a compiled step in CUDA graphs "
                        "(default: on CUDA; the first token waits for the compile)")
    parser.add_argument("--device", default="auto", help="auto, cpu, mps or cuda[:N]")
    return parser


def sample_config(base: SampleConfig, args: argparse.Namespace) -> SampleConfig:
    """The run's sample settings with the options given on the command line applied."""
    given = {
        "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
        "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed,
        "num_samples": args.num_samples, "stop_at_eot": args.stop_at_eot,
        "kv_cache": args.kv_cache, "compile": args.compile,
    }
    changes = {k: v for k, v in given.items() if v is not None}
    if changes.get("top_k") == 0:
        changes["top_k"] = None  # 0 means no top-k filter
    try:
        return dataclasses.replace(base, **changes)
    except ValueError as e:
        option = str(e).split()[0].replace("sample.", "--").replace("_", "-")
        raise UserError(f"{option}: {e}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def work() -> None:
        if not args.prompt:
            raise UserError('the prompt is empty; give some text to continue, e.g. "Your journey"')
        device = pick_device(args.device, option="--device")
        location = args.checkpoint or default_checkpoint()
        model, run_sample, source = load_for_sampling(location, device)  # GPT-2 weights get the defaults
        cfg = sample_config(run_sample, args)
        print(f"sampling from {source}", file=sys.stderr)
        print_samples(model, args.prompt, cfg, device)

    return run_cli(work)


if __name__ == "__main__":
    sys.exit(main())
