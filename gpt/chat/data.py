"""Conversations on disk and in batches: what `data.format: chat` trains on.

Preparation (`prepare_chat`, once per corpus, like `gpt.corpus.prepare.prepare`) reads the records of
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

Batches (`ChatWindows`): with `data.pack` (the default), as many conversations per window of
`context_length` tokens as fit (best-fit), each attending only to itself, its positions counted
from 0; without, one per window. The rest of a window is `<|endoftext|>` padding whose targets
are ignored. A conversation longer than the window is cut to its first `context_length + 1`
tokens when a target the loss counts is left in them, and dropped otherwise; `describe` says how
many.
"""

import bisect
import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from gpt.chat.template import TEMPLATE, conversation_from_record, render, spells_marker
from gpt.config import DataConfig
from gpt.corpus.prepare import open_corpus, reusable
from gpt.corpus.writing import preparing, publish
from gpt.distributed import Distributed, SINGLE
from gpt.downloads import DATA_DIR
from gpt.errors import UserError
from gpt.model import IGNORE_INDEX
from gpt.tokenizer import EOT_ID

SPLITS = ("train", "val")
SPLIT_FILES = ("bin", "mask", "idx")  # the suffixes of each split's files
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
    if reusable(prepared, wanted, {f"{split}.idx": None for split in SPLITS}):
        return prepared
    records = list(_conversations(source, cfg.max_tokens))
    if val_source is not None:
        train, val = records, list(_conversations(val_source, None))
    else:
        n_val = max(1, int(len(records) * cfg.val_fraction))
        if n_val >= len(records):
            raise UserError(f"corpus {source.label!r} holds {len(records)} conversation(s): too few to hold "
                            f"{n_val} out at data.val_fraction {cfg.val_fraction}; add conversations")
        train, val = records[:-n_val], records[-n_val:]
    names = [f"{split}.{suffix}" for split in SPLITS for suffix in SPLIT_FILES] + [VAL_RECORDS]
    with preparing(prepared, names) as temporary:
        counts = {split: _write_split(temporary, split, rows) for split, rows in (("train", train), ("val", val))}
        with open(temporary[VAL_RECORDS], "w", encoding="utf-8") as f:
            for messages, record in val:
                extra = {k: record[k] for k in VAL_FIELDS if k in record}
                f.write(json.dumps({"messages": messages, **extra}) + "\n")
        answers: dict[str, Counter] = {}
        for _, record in train:
            if "answer" in record:
                answers.setdefault(str(record.get("task", "answer")), Counter())[str(record["answer"])] += 1
        markers = sum(spells_marker(messages) for messages, _ in records)
        publish(prepared, temporary, {**wanted, **{f"{s}_{k}": v for s, c in counts.items() for k, v in c.items()},
                                      "spelt_markers": markers,
                                      "train_answers": {t: dict(c) for t, c in answers.items()}})
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


def _write_split(temporary: dict[str, Path], split: str, rows: list) -> dict:
    """<split>.bin, .mask and .idx for `rows`, into their files of `temporary`; returns the counts."""
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
        array.tofile(temporary[f"{split}.{suffix}"])
    return {"conversations": len(rows), "tokens": len(ids_all), "targets": int(sum(mask_all))}


class ChatWindows(Dataset):
    """The conversations of a split in windows of `max_length` inputs: (inputs, targets) per window,
    and packed, (inputs, targets, positions).

    A conversation of n tokens takes n - 1 positions of a window (its inputs; its targets are its
    tokens shifted by one), targets IGNORE_INDEX outside the assistant's tokens. The rest of a
    window is `<|endoftext|>` padding whose targets are ignored.
    - `pack` False: one conversation per window, at positions 0..n-2;
    - `pack` True: as many as fit, placed best-fit (`best_fit`), and `positions` restart at 0 at
      each conversation (and at the padding). The model reads a 0 as the start of a conversation
      that attends only to itself (`gpt.model.conversations_apart`), so each one is computed as it
      would be alone in a window.
    """

    def __init__(self, prepared: Path, split: str, max_length: int, pack: bool = False):
        self.max_length, self.pack = max_length, pack
        self.ids = np.memmap(prepared / f"{split}.bin", dtype=np.uint16, mode="r")
        self.mask = np.memmap(prepared / f"{split}.mask", dtype=np.uint8, mode="r")
        offsets = np.fromfile(prepared / f"{split}.idx", dtype=np.int64)
        spans, self.cut, self.dropped = [], 0, 0
        for start, end in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
            if end - start > max_length + 1:
                end = start + max_length + 1
                if not self.mask[start + 1:end].any():  # nothing left to learn from
                    self.dropped += 1
                    continue
                self.cut += 1
            spans.append((start, end))
        self.conversations = len(spans)
        sizes = [end - start - 1 for start, end in spans]
        self.windows = [[spans[i] for i in window] for window in best_fit(sizes, max_length)] if pack \
            else [[span] for span in spans]

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        inputs = np.full(self.max_length, EOT_ID, dtype=np.uint16)  # uint16, like TokenWindows': widened on the device
        targets = np.full(self.max_length, IGNORE_INDEX, dtype=np.int64)
        positions = np.zeros(self.max_length, dtype=np.int16)
        at = 0  # where the next conversation starts in the window
        for start, end in self.windows[i]:
            n = end - start - 1  # its inputs are tokens start..end-2, its targets start+1..end-1
            inputs[at:at + n] = self.ids[start:end - 1]
            targets[at:at + n] = np.where(self.mask[start + 1:end], self.ids[start + 1:end].astype(np.int64),
                                          IGNORE_INDEX)
            positions[at:at + n] = np.arange(n)
            at += n
        positions[at:] = np.arange(self.max_length - at)  # the padding: one more span of its own
        window = torch.from_numpy(inputs), torch.from_numpy(targets)
        return (*window, torch.from_numpy(positions)) if self.pack else window

    def targets_per_window(self) -> float:
        """The mean count of targets the loss counts in a window (the rest is prompt or padding)."""
        return sum(int(self.mask[start + 1:end].sum()) for window in self.windows for start, end in window) \
            / len(self.windows)

    def describe(self, split: str) -> str:
        total = self.conversations + self.dropped
        packed = f", packed into {len(self.windows):,} windows" if self.pack else " in windows"
        return (f"{split}: {self.conversations:,} of {total:,} conversations{packed} of {self.max_length} "
                f"({self.targets_per_window():.1f} reply tokens a window); {self.cut:,} cut to fit, "
                f"{self.dropped:,} dropped (no reply within the window)")


def best_fit(sizes: list[int], capacity: int) -> list[list[int]]:
    """Indices of `sizes` grouped into bins of `capacity`: best-fit decreasing.

    Longest first, each goes to the bin it leaves least room in (a new bin when none has room),
    which packs within a few percent of the fewest bins possible. Deterministic: the same sizes
    give the same bins, so a resumed run reads the same windows.
    """
    bins: list[list[int]] = []
    rooms: list[tuple[int, int]] = []  # (room left, bin), sorted: the open bins
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        k = bisect.bisect_left(rooms, (sizes[i], -1))  # the first bin with room enough
        if k < len(rooms):
            room, b = rooms.pop(k)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if room > sizes[i]:
            bisect.insort(rooms, (room - sizes[i], b))
    return bins


def load_chat_split(prepared: Path, split: str, max_length: int, pack: bool = False) -> ChatWindows:
    """The conversations of `split` in windows (packed or one per window); a UserError if none fits."""
    windows = ChatWindows(prepared, split, max_length, pack)
    if len(windows) == 0:
        raise UserError(f"no conversation of the {split} split of {prepared} has a reply within the first "
                        f"{max_length} tokens: each of the {windows.dropped:,} is longer than any window; "
                        "shorten the conversations or use a model with a longer model.context_length")
    return windows


def load_chat_splits(cfg: DataConfig, context: int, dist: Distributed = SINGLE) -> tuple[ChatWindows, ChatWindows]:
    """The train and val conversations, prepared first where needed (rank 0 first), packed as `cfg.pack` says."""
    prepared = dist.in_turn(lambda: prepare_chat(cfg))
    train, val = (load_chat_split(prepared, split, context, cfg.pack) for split in SPLITS)
    if cfg.pack and len(train) < cfg.batch_size:  # packing leaves fewer windows than conversations
        raise UserError(f"the train split's {train.conversations:,} conversations pack into {len(train):,} windows of "
                        f"{context}, fewer than data.batch_size {cfg.batch_size}; add conversations, lower "
                        "data.batch_size, or set data.pack: false for one conversation a window")
    return train, val


def read_meta(prepared: Path) -> dict:
    return json.loads((prepared / "meta.json").read_text())
