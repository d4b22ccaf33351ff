"""Benchmarks: figures measured against a baseline in the same run, never timed tests.

    python -m gpt bench --config X      training and sampling speed (speed.py)
    python -m gpt bench race ...        settings raced for loss per second (race.py)
    python -m gpt bench memory ...      peak memory with and without activation checkpointing (memory.py)
    python -m gpt bench prep ...        corpus preparation on 1 and N processes (prep.py)
    python -m gpt bench tasks ...       multiple-choice scoring's items/s and its share of a run (tasks.py)

`python -m gpt.bench ...` is the same command. Every figure, its command and its machine: docs/performance.md.
"""

import importlib
import sys

SUBCOMMANDS = {"race": "gpt.bench.race", "memory": "gpt.bench.memory", "prep": "gpt.bench.prep", "tasks": "gpt.bench.tasks"}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark the first argument names (speed when it names none); the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in SUBCOMMANDS:
        return importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
    return importlib.import_module("gpt.bench.speed").main(argv)
