"""Continue a prompt with a trained GPT: `python generate.py "Your journey" [options]`."""

import argparse
import sys

from gpt.cli import DEFAULT_RUN_CONFIG, add_sample_options, default_checkpoint, load_for_sampling, sample_config
from gpt.device import pick_device, setup_device
from gpt.errors import ArgumentParser, run_cli
from gpt.sampling import check_prompt, for_decoding, print_samples


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
    add_sample_options(parser)
    parser.add_argument("--device", default="auto", help="auto, cpu, mps or cuda[:N]")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def work() -> None:
        check_prompt(args.prompt, "the prompt", 'some text to continue, e.g. "Your journey"')
        device = pick_device(args.device, option="--device")
        setup_device(device)
        location = args.checkpoint or default_checkpoint()
        model, run_sample, source = load_for_sampling(location, device)  # GPT-2 weights get the defaults
        cfg = sample_config(run_sample, args)
        print(f"sampling from {source}", file=sys.stderr)
        print_samples(for_decoding(model, device), args.prompt, cfg, device)

    return run_cli(work)


if __name__ == "__main__":
    sys.exit(main())
