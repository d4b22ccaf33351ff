"""Text -> GPT-2 tokens on disk -> sliding-window batches.

`prepare` tokenises the corpus once (`gpt.corpus`: text, JSONL, Parquet, folders, Hugging Face
datasets, the built-in Shakespeare; on every core, streaming, so a corpus need not fit in RAM) into
`train.bin` and `val.bin`, uint16 arrays, beside the `meta.json` that says what they were made from;
a later run with the same sources and settings reuses them. A failure leaves the previous files as
they were: new files are published whole, meta.json last. `TokenWindows` is the sliding window of
"LLMs from scratch" (window i starts at `i * stride`; its target is the window shifted one token),
and `TrainBatches` the endless, resumable, seeded shuffle over them.
"""

import contextlib
import functools
import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from gpt.corpus.downloads import DATA_DIR
from gpt.corpus.encode import encode_documents
from gpt.corpus.shakespeare_chat import ShakespeareChatSource
from gpt.corpus.sources import HF_PREFIX, SHAKESPEARE, SHAKESPEARE_CHAT, FileSource, HFSource, ShakespeareSource, Source
from gpt.distributed import SINGLE, BatchShare, Distributed
from gpt.errors import UserError
from gpt.model import IGNORE_INDEX

FORMATS = ("text", "chat")
COPY_BYTES = 1 << 20  # moving the val tail of a token file, 1 MiB at a time
PAD_INPUT_ID = 0  # the inputs of an eval batch's padding rows (`full_batch`): an id in every vocabulary


@dataclass
class DataConfig:
    """Which corpus to train on, how to prepare it and how to batch it."""

    format: str = "text"  # text (documents to continue) or chat (conversations: gpt/chat/template.py, gpt/chat/data.py)
    corpus: str = SHAKESPEARE  # "shakespeare", "shakespeare-chat" (format: chat), a .txt/.md/.jsonl/.jsonl.gz/.parquet file, a folder of them, or hf:NAME[:CONFIG]
    val_corpus: str | None = None  # a validation source of its own (any kind above), used whole; None: val_fraction of corpus
    text_field: str = "text"  # the field (JSONL, hf:) or column (Parquet) that holds each record's text
    hf_split: str = "train"  # the split an hf: source is read from
    max_tokens: int | None = None  # prepare at most this many tokens of corpus (its first ones); None: all
    num_proc: int | None = None  # processes that tokenise; None: one per core
    prepared_dir: str | None = None  # token files go here; default data/<corpus name>[-<hash>]/
    val_fraction: float = 0.1  # the last 10% of the tokens are the validation split (without val_corpus)
    stride: int | None = None  # window step in tokens; default: the context length (no overlap)
    batch_size: int = 16  # windows per micro-batch
    num_workers: int = 0  # DataLoader worker processes
    pack: bool = True  # chat: several conversations a window, each attending only to itself (gpt/chat/data.py)

    def __post_init__(self):
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be between 0 and 1, got {self.val_fraction}")
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"data.stride must be at least 1, got {self.stride}")
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be at least 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be 0 or more, got {self.num_workers}")
        for name in ("max_tokens", "num_proc"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be at least 1 (or null), got {getattr(self, name)}")
        if self.format not in FORMATS:
            raise ValueError(f"data.format must be {' or '.join(FORMATS)}, got {self.format!r}")
        if not self.text_field or not self.hf_split:
            raise ValueError("data.text_field and data.hf_split must not be empty")


# --------------------------------------------------------------------------- preparation

def open_corpus(spec: str, cfg: DataConfig, option: str = "data.corpus") -> Source:
    """The source `spec` names ('shakespeare', a path or hf:NAME[:CONFIG]), read with `cfg`'s settings;
    `option` is where it was given."""
    if spec == SHAKESPEARE:
        return ShakespeareSource()
    if spec == SHAKESPEARE_CHAT:
        return ShakespeareChatSource()
    if spec.startswith(HF_PREFIX):
        return HFSource(spec, cfg.text_field, cfg.hf_split, option)
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"{option} {spec!r} does not exist; give a text, JSONL or Parquet file, a folder "
                        "of them, hf:NAME for a Hugging Face dataset, or 'shakespeare'")
    return FileSource(path, cfg.text_field, spec)


def default_num_proc() -> int:
    """The cores this process may run on (its CPU affinity where the platform says)."""
    if hasattr(os, "process_cpu_count"):  # Python 3.13+
        return os.process_cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


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


def _cannot_write(prepared: Path, e: OSError) -> UserError:
    return UserError(f"cannot write the prepared corpus in {prepared} ({e.strerror or e}); free some "
                     "disk space or set data.prepared_dir to a folder you can write to")


@contextlib.contextmanager
def preparing(prepared: Path, names: Iterable[str]) -> Iterator[dict[str, Path]]:
    """A temporary file in `prepared` for each of `names`, removed (with the folder, if made for it) unless published.

    An OSError inside becomes a UserError saying that `prepared` cannot be written.
    """
    existed = prepared.is_dir()
    try:
        prepared.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _cannot_write(prepared, e) from None
    temporary = {name: prepared / f"{name}.tmp" for name in names}
    try:
        yield temporary
    except OSError as e:
        raise _cannot_write(prepared, e) from None
    finally:
        for path in temporary.values():
            path.unlink(missing_ok=True)
        if not existed:
            with contextlib.suppress(OSError):  # only if empty: nothing was published
                prepared.rmdir()


def publish(prepared: Path, temporary: dict[str, Path], meta: dict) -> None:
    """Move the finished files of `preparing` into place; meta.json last: its presence means they are complete."""
    meta_path = prepared / "meta.json"
    meta_path.unlink(missing_ok=True)  # until the new meta is written, nothing here is valid
    for name, path in temporary.items():
        os.replace(path, prepared / name)
    tmp = meta_path.with_name("meta.json.tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, meta_path)


@dataclass
class Written:
    """What tokenising a source into a file gave."""

    tokens: int = 0
    documents: int = 0
    characters: int = 0


def write_tokens(source: Source, path: Path, num_proc: int | None, max_tokens: int | None = None) -> Written:
    """Tokenise `source` (its first `max_tokens` tokens, if set) into the uint16 file `path`."""
    written, started = Written(), time.perf_counter()
    processes = num_proc or default_num_proc()
    with (open(path, "wb") as f,
          tqdm(total=source.total, unit=source.unit, unit_scale=True, disable=None, dynamic_ncols=True,
               desc=f"tokenising {source.label} ({processes} {'process' if processes == 1 else 'processes'})") as bar,
          contextlib.closing(encode_documents(source.blocks(), processes)) as chunks):
        for chunk in chunks:
            tokens = chunk.tokens
            if max_tokens is not None and written.tokens + len(tokens) // 2 >= max_tokens:
                tokens = tokens[:2 * (max_tokens - written.tokens)]  # the first max_tokens exactly
            f.write(tokens)
            written.tokens += len(tokens) // 2
            written.documents += chunk.documents
            written.characters += chunk.chars
            bar.update(chunk.advance)
            bar.set_postfix(docs=f"{written.documents:,}", tokens=f"{written.tokens:,}",
                            tok_s=f"{written.tokens / (time.perf_counter() - started):,.0f}", refresh=False)
            if written.tokens == max_tokens:
                break
    if written.documents == 0:
        blank = f" (every record's {source.text_field!r} is blank)" if source.text_field else ""
        raise UserError(f"corpus {source.label!r} is empty{blank}; give it some text")
    return written


def _split_off_tail(path: Path, tail: Path, keep_tokens: int) -> None:
    """Move the tokens of `path` after the first `keep_tokens` into the file `tail`."""
    with open(path, "r+b") as f, open(tail, "wb") as out:
        f.seek(2 * keep_tokens)
        shutil.copyfileobj(f, out, COPY_BYTES)
        f.truncate(2 * keep_tokens)


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
    with preparing(prepared, ("train.bin", "val.bin")) as temporary:
        train = write_tokens(source, temporary["train.bin"], cfg.num_proc, cfg.max_tokens)
        if val_source is not None:
            n_val = write_tokens(val_source, temporary["val.bin"], cfg.num_proc).tokens
        else:
            n_val = val_token_count(train.tokens, cfg.val_fraction)
            _split_off_tail(temporary["train.bin"], temporary["val.bin"], train.tokens - n_val)
            train.tokens -= n_val
        if isinstance(source, ShakespeareSource):  # the plain text too, so a reader can see what the model learns
            (prepared / "input.txt").write_text("\n<|endoftext|>\n".join(source.texts), encoding="utf-8")
        publish(prepared, temporary, {**wanted, "documents": train.documents, "characters": train.characters,
                                      "train_tokens": train.tokens, "val_tokens": n_val})
    print(f"prepared {source.name}: {train.tokens:,} train and {n_val:,} val tokens "
          f"from {train.documents:,} documents in {prepared}")
    return prepared


def prepare_whole(cfg: DataConfig, spec: str, prepared_dir: str | None = None, max_tokens: int | None = None,
                  option: str = "--corpus") -> Path:
    """Tokenise all of the corpus `spec` (its first `max_tokens`) into whole.bin, once; return the dir.

    The dir is `prepared_dir`, or data/<name>-whole/ (cfg.prepared_dir belongs to cfg.corpus).
    """
    source = open_corpus(spec, cfg, option)
    prepared = Path(prepared_dir) if prepared_dir else DATA_DIR / f"{source.name}-whole"
    wanted = {"corpus": source.name, "source": source.fingerprint(), "tokenizer": "gpt2", "split": "whole",
              "max_tokens": max_tokens}
    if not reusable(prepared, wanted, {"whole.bin": "whole_tokens"}):
        with preparing(prepared, ("whole.bin",)) as temporary:
            written = write_tokens(source, temporary["whole.bin"], cfg.num_proc, max_tokens)
            publish(prepared, temporary, {**wanted, "documents": written.documents,
                                          "characters": written.characters, "whole_tokens": written.tokens})
    return prepared


# --------------------------------------------------------------------------- dataset

class TokenWindows(Dataset):
    """Sliding windows over a token file: item i is (x, y) with y = x shifted by one token."""

    def __init__(self, tokens: np.ndarray, max_length: int, stride: int):
        if max_length < 1 or stride < 1:
            raise ValueError("max_length and stride must be at least 1")
        self.tokens = tokens
        self.max_length = max_length
        self.stride = stride

    def __len__(self) -> int:
        # Window i needs tokens [i*stride, i*stride + max_length] inclusive (the +1 target).
        usable = len(self.tokens) - self.max_length - 1
        return usable // self.stride + 1 if usable >= 0 else 0

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} windows")
        start = i * self.stride
        # Kept as uint16 (as stored): a quarter of int64's bytes to collate, pin and copy to the
        # device; training widens the ids to int64 there (`gpt.training.to_device`).
        chunk = torch.from_numpy(np.array(self.tokens[start:start + self.max_length + 1]))
        return chunk[:-1], chunk[1:]


def load_split(prepared: Path, split: str, max_length: int, stride: int) -> TokenWindows:
    """The windows of `split` ("train" or "val") of a prepared corpus, read through a memmap."""
    tokens = np.memmap(prepared / f"{split}.bin", dtype=np.uint16, mode="r")
    windows = TokenWindows(tokens, max_length, stride)
    if len(windows) == 0:
        raise UserError(
            f"the {split} split of {prepared} has {len(tokens):,} tokens, fewer than one window of "
            f"{max_length + 1}; use more text or a smaller model.context_length"
        )
    return windows


def load_text_splits(cfg: DataConfig, context: int, dist: Distributed = SINGLE) -> tuple[TokenWindows, TokenWindows]:
    """The train and val windows of the configured corpus, prepared first where needed (rank 0 first)."""
    check_max_tokens(cfg, context + 1)  # before any reading: each split needs a window and its target
    prepared = dist.in_turn(lambda: prepare(cfg))  # rank 0 writes the token files, the rest read them
    train = load_split(prepared, "train", context, cfg.stride or context)
    return train, load_split(prepared, "val", context, context)


class TrainBatches:
    """Endless shuffled train batches; epoch e is shuffled by seed + e, so runs repeat exactly.

    `epoch` and `batch_in_epoch` say where the stream is; they are all the state it has, so
    `state_dict` / `load_state_dict` put a resumed run on the very next batch.

    With several training processes (`gpt.distributed`), each one is given its `share`: they all follow
    the same stream, and batch i of it (counted from where they start) goes to process i mod
    `world_size`. Together they read what one process would have read, in the same steps, and the
    position a checkpoint records (that of the whole group) means the same for any number of
    processes. With `shares` > 1, `shares` consecutive ranks take each batch together: batch i goes to
    the i mod (world_size / shares)-th of them, and each process yields its 1/shares slice of the
    batch's windows (in rank order).
    """

    def __init__(self, dataset: TokenWindows, batch_size: int, seed: int, num_workers: int = 0,
                 pin_memory: bool = False, share: BatchShare = BatchShare()):
        if len(dataset) < batch_size:
            raise UserError(
                f"the train split has {len(dataset)} windows, fewer than data.batch_size "
                f"{batch_size}; use more text, a smaller batch_size or a smaller stride"
            )
        if share.world_size % share.shares or batch_size % share.shares:
            raise ValueError(f"{share.shares} processes cannot share batches of {batch_size} among {share.world_size}")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.group, self.part = divmod(share.rank, share.shares)  # which ranks take a batch together; our slice of it
        self.groups = share.world_size // share.shares
        self.shares = share.shares
        self.epoch = 0
        self.batch_in_epoch = 0

    @property
    def batches_per_epoch(self) -> int:
        return len(self.dataset) // self.batch_size  # the last partial batch is dropped

    def state_dict(self) -> dict:
        """Where the stream is: the epoch and the batches of it already yielded (by all processes)."""
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict`: the next batch is the one that would have come next."""
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])

    def __iter__(self):
        per_epoch = self.batches_per_epoch
        mine = self.epoch * per_epoch + self.batch_in_epoch + self.group  # the stream position of our next batch
        while True:
            epoch, first = divmod(mine, per_epoch)
            positions = range(first, per_epoch, self.groups)
            # The epoch's own generator, never the global RNG (dropout's): a resumed run's masks match an
            # unbroken one's. The loader draws its workers' seed from it, then the shuffle is drawn.
            generator = torch.Generator().manual_seed(self.seed + epoch)
            loader = DataLoader(self.dataset, batch_sampler=self._our_batches(positions, generator), generator=generator,
                                num_workers=self.num_workers, pin_memory=self.pin_memory)
            for position, batch in zip(positions, loader):
                # Once every process has taken its batch of this round, the stream is past it.
                done = epoch * per_epoch + position - self.group + self.groups
                self.epoch, self.batch_in_epoch = divmod(done, per_epoch)
                yield batch
            mine = epoch * per_epoch + positions[-1] + self.groups

    def _our_batches(self, positions: range, generator: torch.Generator) -> Iterator[list[int]]:
        """The window indices of this process's slice of the epoch's batches at `positions`.

        Shuffled at the first batch, when the loader starts, after it has drawn its workers' seed from
        `generator`: the order a shuffling DataLoader seeded with it gives.
        """
        order = torch.randperm(len(self.dataset), generator=generator)
        piece = self.batch_size // self.shares  # windows of each batch this process takes
        for j in positions:
            start = j * self.batch_size + self.part * piece
            yield order[start:start + piece].tolist()


def full_batch(items: list[tuple[torch.Tensor, ...]], batch_size: int) -> tuple[torch.Tensor, ...]:
    """Stack eval windows into a (batch_size, T) batch: a short one gets padding rows that count nowhere.

    Every batch then has one shape, so a compiled model never compiles again for the last one.
    A padding row's inputs are id 0 (in every vocabulary; rows do not see each other, so it moves
    nothing) and its targets IGNORE_INDEX, which the loss skips. Targets come out int64 whatever
    the windows held (the token files' uint16 cannot hold -100; a chat window's already are).
    Packed chat windows' positions (a third tensor) get a padding row of 0..T-1: one span.
    """
    inputs, targets, *positions = (torch.stack(column) for column in zip(*items))  # each (n, T), as stored
    targets = targets.long()
    missing = batch_size - len(items)
    if missing > 0:
        width = inputs.shape[1]
        inputs = torch.cat([inputs, inputs.new_full((missing, width), PAD_INPUT_ID)])
        targets = torch.cat([targets, targets.new_full((missing, width), IGNORE_INDEX)])
        positions = [torch.cat([p, torch.arange(width, dtype=p.dtype).expand(missing, width)]) for p in positions]
    return inputs, targets, *positions


def eval_loader(dataset: Dataset, batch_size: int, max_batches: int | None, rank: int = 0,
                world_size: int = 1) -> DataLoader:
    """A fixed, evenly spread subset of at most `max_batches` batches (None: every window).

    Every batch is (batch_size, T): a short last one is padded with rows whose targets are
    IGNORE_INDEX (`full_batch`), so its mean is that of its windows. `loader.batch_sampler` lists
    the windows of each batch (padding rows are none of them). With several processes, batch i
    goes to process i mod `world_size` (their loss sums are then added up: `gpt.distributed`).
    """
    if max_batches is None or batch_size * max_batches >= len(dataset):
        indices = list(range(len(dataset)))
    else:
        count = batch_size * max_batches
        indices = torch.linspace(0, len(dataset) - 1, count).round().long().unique().tolist()
    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    # Its own generator: a DataLoader without one draws a seed from the global RNG each time it
    # is iterated, and evaluation must not move the RNG that training's dropout uses.
    return DataLoader(dataset, batch_sampler=batches[rank::world_size], generator=torch.Generator(),
                      collate_fn=functools.partial(full_batch, batch_size=batch_size))
