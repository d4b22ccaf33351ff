"""`python -m gpt`: every command of the project, one line each, with the guide that explains it.

`python -m gpt COMMAND [arguments]` runs one of the commands below; `python -m gpt COMMAND --help`
gives its options. The scripts at the top of the repository are listed too, as they are run.
A command's module is imported only when it runs, so the list prints at once.
"""

import importlib
import sys

# (how it is run, what it does, its guide): the scripts at the top of the repository.
SCRIPTS = [
    ("python train.py --config small.yaml", "train, resume or fine-tune a model from a YAML config",
     "docs/training.md"),
    ("python generate.py PROMPT", "continue a prompt with a trained run or GPT-2's weights", "docs/generating.md"),
    ("python chat.py --checkpoint RUN", "talk to a chat-tuned run", "docs/chat.md"),
    ("bash scripts/gpu_check.sh", "check a GPU box: tests, speed, memory, a short run", "docs/gpus.md"),
]

# name: (module with `main(argv)`, its arguments, what it does, its guide).
COMMANDS = {
    "prepare": ("gpt.tools.prepare", "--config X", "tokenise a config's corpus ahead of training, on every core",
                "docs/data.md"),
    "evaluate": ("gpt.tools.evaluate", "--checkpoint RUN",
                 "loss and bits per byte over a whole split; --task: HellaSwag, multiple choice",
                 "docs/evaluation.md"),
    "export": ("gpt.gpt2.export", "RUN OUT_DIR | OUT.gguf",
               "write a run as a Hugging Face GPT-2 model folder, or one GGUF file for llama.cpp", "docs/gpt2.md"),
    "attention-map": ("gpt.tools.attention_map", "PROMPT --checkpoint RUN",
                      "draw every head's attention weights on a prompt", "docs/generating.md"),
    "plot": ("gpt.tools.plot", "RUN", "draw a run's train and val loss as loss.png", "docs/training.md"),
    "bench": ("gpt.bench", "[race | memory | prep | tasks] --config X",
              "speed against a baseline; races, memory, preparation, task scoring",
              "docs/performance.md"),
}


def listing() -> str:
    """The commands, one line each, and their guides."""
    rows = [(usage, what, guide) for usage, what, guide in SCRIPTS]
    rows += [(f"python -m gpt {name} {args}", what, guide) for name, (_, args, what, guide) in COMMANDS.items()]
    width = max(len(usage) for usage, _, _ in rows)
    lines = ["usage: python -m gpt COMMAND [arguments]   (python -m gpt COMMAND --help for its options)", ""]
    lines += [f"  {usage:<{width}}  {what}  ({guide})" for usage, what, guide in rows]
    return "\n".join([*lines, "", "Start with README.md; the guides are in docs/."])


def main(argv: list[str] | None = None) -> int:
    """Print the listing, or run the command the first argument names; the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(listing())
        return 0
    if argv[0] not in COMMANDS:
        print(f"error: no command {argv[0]!r} (the commands: {', '.join(COMMANDS)}); "
              "python -m gpt lists them", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
