"""Prepare a corpus for training: its text once tokenised into `train.bin` and `val.bin` (uint16 GPT-2
token ids) beside the `meta.json` that says what they were made from; a later run with the same
sources and settings reuses them, opening only the source to fingerprint it.

`open_corpus` imports the reader of the one kind a config names (`gpt.corpus`). Tokenising and
writing (`gpt.corpus.writing`) load only when there is something to write. `python -m gpt prepare`
(`gpt.tools.prepare`) makes the token files ahead of training.
"""

import json
from pathlib import Path

from gpt.config import DataConfig
from gpt.corpus import HF_PREFIX, SHAKESPEARE, SHAKESPEARE_CHAT, Source
from gpt.downloads import DATA_DIR
from gpt.errors import UserError

def open_corpus(spec: str, cfg: DataConfig, option: str = "data.corpus") -> Source:
    """The source `spec` names ('shakespeare', a path or hf:NAME[:CONFIG]), read with `cfg`'s settings;
    `option` is where it was given."""
    if spec == SHAKESPEARE:
        from gpt.corpus.shakespeare import ShakespeareSource
        return ShakespeareSource()
    if spec == SHAKESPEARE_CHAT:
        from gpt.corpus.shakespeare_chat import ShakespeareChatSource
        return ShakespeareChatSource()
    from gpt.corpus.sources import FileSource, HFSource
    if spec.startswith(HF_PREFIX):
        return HFSource(spec, cfg.text_field, cfg.hf_split, option)
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"{option} {spec!r} does not exist; give a text, JSONL or Parquet file, a folder "
                        "of them, hf:NAME for a Hugging Face dataset, or 'shakespeare'")
    return FileSource(path, cfg.text_field, spec)


def val_token_count(total: int, val_fraction: float) -> int:
    """How many of `total` tokens the val split takes: the last `val_fraction`, at least one."""
    return max(1, int(total * val_fraction))


def check_max_tokens(cfg: DataConfig, window: int) -> None:
    """A UserError, before anything is read, if data.max_tokens leaves a split shorter than `window`."""
    if cfg.max_tokens is None:
        return
    val = 0 if cfg.val_corpus else val_token_count(cfg.max_tokens, cfg.val_fraction)
    splits = {"train": cfg.max_tokens - val, **({} if cfg.val_corpus else {"val": val})}
    for split, tokens in splits.items():
        if tokens < window:
            share = "" if cfg.val_corpus else f" at data.val_fraction {cfg.val_fraction}"
            raise UserError(f"data.max_tokens {cfg.max_tokens:,} leaves the {split} split {tokens:,} tokens{share}, "
                            f"fewer than one window of {window}; raise data.max_tokens or leave it unset")


def _token_count(path: Path) -> int | None:
    """Tokens in a uint16 token file, or None if it is missing."""
    return path.stat().st_size // 2 if path.exists() else None


def reusable(prepared: Path, wanted: dict, files: dict[str, str | None]) -> bool:
    """True if `prepared` holds a meta.json made from exactly `wanted`, and complete `files`.

    `files` maps each file that must be there to the meta.json key of its count of uint16 tokens,
    or to None where being there is enough.
    """
    meta_path = prepared / "meta.json"
    if not meta_path.exists():
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        meta = {}
    # A key meta.json lacks reads as None: what `wanted` holds for a setting left unset.
    if {k: meta.get(k) for k in wanted} == wanted and all(
        (prepared / name).is_file() and (key is None or _token_count(prepared / name) == meta.get(key))
        for name, key in files.items()
    ):
        return True
    print(f"{meta_path} was made from other data or settings; preparing again")
    return False


def prepare(cfg: DataConfig) -> Path:
    """Tokenise the configured corpus into train.bin/val.bin/meta.json (once); return the dir."""
    source = open_corpus(cfg.corpus, cfg)
    val_source = open_corpus(cfg.val_corpus, cfg, "data.val_corpus") if cfg.val_corpus else None
    prepared = Path(cfg.prepared_dir) if cfg.prepared_dir else DATA_DIR / source.name
    wanted = {"corpus": source.name, "source": source.fingerprint(), "tokenizer": "gpt2",
              "val_fraction": None if val_source else cfg.val_fraction,
              "val_corpus": val_source.fingerprint() if val_source else None, "max_tokens": cfg.max_tokens}
    if reusable(prepared, wanted, {"train.bin": "train_tokens", "val.bin": "val_tokens"}):
        return prepared
    from gpt.corpus.writing import preparing, publish, split_off_tail, write_tokens
    with preparing(prepared, ("train.bin", "val.bin")) as temporary:
        train = write_tokens(source, temporary["train.bin"], cfg.num_proc, cfg.max_tokens)
        if val_source is not None:
            n_val = write_tokens(val_source, temporary["val.bin"], cfg.num_proc).tokens
        else:
            n_val = val_token_count(train.tokens, cfg.val_fraction)
            split_off_tail(temporary["train.bin"], temporary["val.bin"], train.tokens - n_val)
            train.tokens -= n_val
        if source.name == SHAKESPEARE:  # the plain text too, so a reader can see what the model learns
            (prepared / "input.txt").write_text("\n<|endoftext|>\n".join(source.texts), encoding="utf-8")
        publish(prepared, temporary, {**wanted, "documents": train.documents, "characters": train.characters,
                                      "train_tokens": train.tokens, "val_tokens": n_val})
    print(f"prepared {source.name}: {train.tokens:,} train and {n_val:,} val tokens "
          f"from {train.documents:,} documents in {prepared}")
    return prepared
