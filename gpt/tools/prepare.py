"""Prepare a config's corpus and nothing else: `python -m gpt prepare --config X [--section.key=value ...]`.

The token files train.py would make (`gpt.corpus.prepare`, on every core), made ahead of training:
on a GPU box, a corpus of billions of tokens is then prepared once, before `torchrun` starts,
rather than by rank 0 while the other processes wait for it. Settings are read as train.py
reads them, so the training run that follows finds the files ready.
"""

import sys

from gpt.config import load_config
from gpt.corpus.prepare import check_max_tokens, prepare
from gpt.errors import ArgumentParser, UserError, run_cli


def main(argv: list[str] | None = None) -> int:
    """Prepare the corpus of the command line's config; the exit code."""
    parser = ArgumentParser(prog="python -m gpt prepare", allow_abbrev=False,
                            description="Tokenise a config's corpus into its token files, as train.py would.")
    parser.add_argument("--config", help="YAML config: a path, or a file name in configs/ (e.g. gpt2-124m.yaml)")
    args, overrides = parser.parse_known_args(argv)

    def work() -> None:
        bad = [o for o in overrides if o.startswith("-") and "." not in o.split("=")[0]]
        if bad:
            raise UserError(f"unknown option {bad[0]}; use --config FILE and --section.key=value overrides")
        cfg = load_config(args.config, overrides)
        if cfg.data.format == "chat":  # conversations: token, mask and offset files (gpt.chat.data)
            from gpt.chat.data import prepare_chat
            print(f"token files ready in {prepare_chat(cfg.data)}")
            return
        check_max_tokens(cfg.data, cfg.model.context_length + 1)
        print(f"token files ready in {prepare(cfg.data)}")

    return run_cli(work)


if __name__ == "__main__":
    sys.exit(main())
