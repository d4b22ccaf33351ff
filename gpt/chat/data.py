"""Conversations on disk and in batches: what `data.format: chat` trains on.

Preparation (`prepare_chat`, once per corpus, like `gpt.data.prepare`) reads the records of
`data.corpus` (`Source.records`: JSONL, Parquet, hf:, or the built-in `shakespeare-chat`),
checks each one (`gpt.chat.template.conversation_from_record`: a bad one is an error naming its file and
line or row) and renders it with the chat template into three files per split:

- `<split>.bin`: the token ids, uint16 (the template's ids, 50257..50260, fit too);
- `<split>.mask`: one byte per token, 1 where the token is a target the loss counts;
- `<split>.idx`: int64 offsets, conversation i being tokens [idx[i], idx[i+1]).

The held-out split is the last `data.val_fraction` of the conversations (or all of
`data.val_corpus`); its records are also kept in `val.jsonl` (the messages and `VAL_FIELDS`),
which `gpt.tools.evaluate` asks the questions of. `meta.json` records the template, the counts,
and how many answers of each checkable task the train split holds (the majority-answer baseline).

Batches (`ChatWindows`): one conversation per window of `context_length` tokens, padded with
`<|endoftext|>` whose targets are ignored, so no conversation ever attends to another. A
conversation longer than the window is cut to its first `context_length + 1` tokens when a
target the loss counts is left in them, and dropped otherwise; `describe` says how many.
"""

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from gpt.chat.template import IGNORE, TEMPLATE, conversation_from_record, render, spells_marker
from gpt.data import DataConfig, _cannot_write, open_corpus
from gpt.corpus.downloads import DATA_DIR
from gpt.distributed import SINGLE, Distributed
from gpt.errors import UserError
from gpt.tokenizer import EOT_ID

SPLITS = ("train", "val")
VAL_RECORDS = "val.jsonl"
VAL_FIELDS = ("task", "answer", "choices")  # what val.jsonl keeps beside the messages; in meta.json, so that
# files prepared before a field was kept are prepared again


def chat_dir(cfg: DataConfig, source_name: str) -> Path:
    return Path(cfg.prepared_dir) if cfg.prepared_dir else DATA_DIR / f"{source_name}-chat"


def prepare_chat(cfg: DataConfig) -> Path:
    """Render the configured conversations into train/val token and mask files (once); return the dir."""
    source = open_corpus(cfg.corpus, cfg)
    val_source = open_corpus(cfg.val_corpus, cfg, "data.val_corpus") if cfg.val_corpus else None
    prepared = chat_dir(cfg, source.name)
    wanted = {"corpus": source.name, "source": source.fingerprint(), "tokenizer": "gpt2", "format": "chat",
              "template": TEMPLATE, "val_fraction": None if val_source else cfg.val_fraction,
              "val_corpus": val_source.fingerprint() if val_source else None, "max_tokens": cfg.max_tokens,
              "val_fields": list(VAL_FIELDS)}
    meta_path = prepared / "meta.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError:
            meta = {}
        if {k: meta.get(k) for k in wanted} == wanted and all((prepared / f"{s}.idx").is_file() for s in SPLITS):
            return prepared
        print(f"{meta_path} was made from other data or settings; preparing again")
    records = list(_conversations(source, cfg.max_tokens))
    if val_source is not None:
        train, val = records, list(_conversations(val_source, None))
    else:
        n_val = max(1, int(len(records) * cfg.val_fraction))
        if n_val >= len(records):
            raise UserError(f"corpus {source.label!r} holds {len(records)} conversation(s): too few to hold "
                            f"{n_val} out at data.val_fraction {cfg.val_fraction}; add conversations")
        train, val = records[:-n_val], records[-n_val:]
    try:
        prepared.mkdir(parents=True, exist_ok=True)
        meta_path.unlink(missing_ok=True)  # until the new meta is written, nothing here is valid
        counts = {split: _write_split(prepared, split, rows) for split, rows in (("train", train), ("val", val))}
        with open(prepared / f"{VAL_RECORDS}.tmp", "w", encoding="utf-8") as f:
            for messages, record in val:
                extra = {k: record[k] for k in VAL_FIELDS if k in record}
                f.write(json.dumps({"messages": messages, **extra}) + "\n")
        os.replace(prepared / f"{VAL_RECORDS}.tmp", prepared / VAL_RECORDS)
        answers: dict[str, Counter] = {}
        for _, record in train:
            if "answer" in record:
                answers.setdefault(str(record.get("task", "answer")), Counter())[str(record["answer"])] += 1
        markers = sum(spells_marker(messages) for messages, _ in records)
        meta = {**wanted, **{f"{s}_{k}": v for s, c in counts.items() for k, v in c.items()},
                "spelt_markers": markers, "train_answers": {t: dict(c) for t, c in answers.items()}}
        tmp = meta_path.with_name("meta.json.tmp")
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, meta_path)
    except OSError as e:
        raise _cannot_write(prepared, e) from None
    note = f"; {markers:,} spell a template marker in their text, kept as plain text" if markers else ""
    print(f"prepared {source.name} as chat: {len(train):,} train and {len(val):,} val conversations "
          f"({counts['train']['tokens']:,} and {counts['val']['tokens']:,} tokens) in {prepared}{note}")
    return prepared


def _conversations(source, max_tokens: int | None):
    """(messages, record) for each record of `source`, checked; stops after `max_tokens` tokens."""
    tokens = 0
    for record, where in source.records():
        messages = conversation_from_record(record, where)
        yield messages, record
        if max_tokens is not None:
            tokens += len(render(messages)[0])
            if tokens >= max_tokens:
                return


def _write_split(prepared: Path, split: str, rows: list) -> dict:
    """<split>.bin, .mask and .idx for `rows`; returns the counts."""
    if not rows:
        raise UserError(f"the {split} split holds no conversation; add some")
    offsets, ids_all, mask_all = [0], [], []
    for messages, _ in rows:
        ids, trained = render(messages)
        ids_all += ids
        mask_all += trained
        offsets.append(len(ids_all))
    files = {"bin": np.array(ids_all, dtype=np.uint16), "mask": np.array(mask_all, dtype=np.uint8),
             "idx": np.array(offsets, dtype=np.int64)}
    for suffix, array in files.items():
        tmp = prepared / f"{split}.{suffix}.tmp"
        array.tofile(tmp)
        os.replace(tmp, prepared / f"{split}.{suffix}")
    return {"conversations": len(rows), "tokens": len(ids_all), "targets": int(sum(mask_all))}


class ChatWindows(Dataset):
    """One conversation per item: (inputs, targets) of `max_length` tokens, targets IGNORE outside
    the assistant's tokens and in the padding."""

    def __init__(self, prepared: Path, split: str, max_length: int):
        self.max_length = max_length
        self.ids = np.memmap(prepared / f"{split}.bin", dtype=np.uint16, mode="r")
        self.mask = np.memmap(prepared / f"{split}.mask", dtype=np.uint8, mode="r")
        offsets = np.fromfile(prepared / f"{split}.idx", dtype=np.int64)
        self.spans, self.cut, self.dropped = [], 0, 0
        for start, end in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
            if end - start > max_length + 1:
                end = start + max_length + 1
                if not self.mask[start + 1:end].any():  # nothing left to learn from
                    self.dropped += 1
                    continue
                self.cut += 1
            self.spans.append((start, end))

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.spans[i]
        n = end - start
        ids = np.full(self.max_length + 1, EOT_ID, dtype=np.int64)
        ids[:n] = self.ids[start:end]
        targets = ids[1:].copy()
        counted = np.zeros(self.max_length, dtype=bool)
        counted[:n - 1] = self.mask[start + 1:end].astype(bool)
        targets[~counted] = IGNORE
        # inputs as uint16, like TokenWindows (training widens them on the device); targets hold IGNORE
        return torch.from_numpy(ids[:-1].astype(np.uint16)), torch.from_numpy(targets)

    def describe(self, split: str) -> str:
        total = len(self.spans) + self.dropped
        return (f"{split}: {len(self.spans):,} of {total:,} conversations in windows of {self.max_length}; "
                f"{self.cut:,} cut to fit, {self.dropped:,} dropped (no reply within the window)")


def load_chat_split(prepared: Path, split: str, max_length: int) -> ChatWindows:
    """The conversations of `split`, one per window; a UserError if none fits."""
    windows = ChatWindows(prepared, split, max_length)
    if len(windows) == 0:
        raise UserError(f"no conversation of the {split} split of {prepared} has a reply within the first "
                        f"{max_length} tokens: each of the {windows.dropped:,} is longer than any window; "
                        "shorten the conversations or use a model with a longer model.context_length")
    return windows


def load_chat_splits(cfg: DataConfig, context: int, dist: Distributed = SINGLE) -> tuple[ChatWindows, ChatWindows]:
    """The train and val conversations, prepared first where needed (rank 0 first), one per window."""
    prepared = dist.in_turn(lambda: prepare_chat(cfg))
    return load_chat_split(prepared, "train", context), load_chat_split(prepared, "val", context)


def read_meta(prepared: Path) -> dict:
    return json.loads((prepared / "meta.json").read_text())
