"""Talk to a chat-tuned run: `python chat.py [--checkpoint RUN] [--system TEXT] [--prompt TEXT]` (chat.py at
the top of the clone runs this module's `main`, so a text run's reader never reads it).

Interactive by default: each line you type is a user turn, and the reply streams as it is
sampled. The history goes back into every prompt, cropped from its oldest turns (the system
prompt kept) to fit the context (`gpt.chat.template.crop_history`). Ctrl-D or Ctrl-C ends it. With
`--prompt`, it prints one reply and exits (for scripts). A run that was never chat-tuned is
refused in one line (`gpt.chat.template.check_template`).
"""

import argparse
import dataclasses
import math
import sys

import torch

from gpt.chat.template import load_chat_model, reply
from gpt.cli import add_sample_options, sample_config
from gpt.config import load_config
from gpt.device import pick_device, setup_device
from gpt.errors import ArgumentParser, run_cli
from gpt.sampling import check_prompt, compile_pays, for_decoding

DEFAULT_CHAT_CONFIG = "shakespeare-chat.yaml"  # with no --checkpoint, talk to the run this config writes


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description="Chat with a chat-tuned run. Sampling options left out take the run's sample settings.",
        allow_abbrev=False,
    )
    parser.add_argument("--checkpoint", help="a chat run's folder (its best.pt, else latest.pt) or checkpoint "
                        f"file (default: the run configs/{DEFAULT_CHAT_CONFIG} writes)")
    parser.add_argument("--system", help="a system prompt, kept at the start of every prompt")
    parser.add_argument("--prompt", help="one user message: print the reply and exit")
    add_sample_options(parser, chat=True)
    parser.add_argument("--device", default="auto", help="auto, cpu, mps or cuda[:N]")
    return parser


def write_now(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def work() -> int:
        check_prompt(args.prompt, "--prompt", 'a message, e.g. --prompt "Which play is this from? ..."')
        device = pick_device(args.device, option="--device")
        setup_device(device)
        location = args.checkpoint or load_config(DEFAULT_CHAT_CONFIG).train.out_dir
        model, config, path = load_chat_model(location, device)
        model = for_decoding(model, device)
        cfg = sample_config(config.sample, args)
        if args.prompt is None:  # a conversation: the process stays, so a compiled step pays where it can
            cfg = dataclasses.replace(cfg, compile=compile_pays(cfg.compile, device, math.inf))
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
        history = [{"role": "system", "content": args.system}] if args.system else []
        if args.prompt is not None:
            history.append({"role": "user", "content": args.prompt})
            reply(model, history, cfg, device, generator, write=write_now)
            print()
            return 0
        print(f"chatting with {path} (Ctrl-D or Ctrl-C ends)", file=sys.stderr)
        while True:
            try:
                message = input("> ")
            except (EOFError, KeyboardInterrupt):  # Ctrl-D, Ctrl-C at the prompt: a clean end
                print()
                return 0
            if not message.strip():
                continue
            history.append({"role": "user", "content": message})
            try:
                text, _, _ = reply(model, history, cfg, device, generator, write=write_now)
            except KeyboardInterrupt:  # Ctrl-C while it answers: stop the reply and the chat
                print()
                return 0
            print()
            history.append({"role": "assistant", "content": text})

    return run_cli(work)


if __name__ == "__main__":
    sys.exit(main())
