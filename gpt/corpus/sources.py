"""Corpus files and datasets: what `data.corpus` names besides the built-in corpora.

- a text file (`.txt`, `.md`, or any other name given directly): one document;
- a JSONL file (`.jsonl`, `.jsonl.gz`): one JSON object a line, each one document, its text in
  the field `data.text_field`;
- a Parquet file (`.parquet`): each row one document, its text in the column `data.text_field`,
  read a batch of rows at a time with pyarrow (the file never has to fit in memory);
- a folder: every file of those kinds under it, in sorted path order;
- `hf:NAME` or `hf:NAME:CONFIG`: a Hugging Face dataset (a hub name, or a local folder of data
  files), split `data.hf_split`, streamed with `datasets`, so it is never downloaded whole.

A source yields `Block`s (`gpt.corpus`): a document's text in one or more pieces (a text file comes
in ~1 MiB blocks), in order. Reading checks as it goes: a line that is not JSON, a record without the
text field and a file that is not UTF-8 are `UserError`s naming the file and the line or row.
Nothing here tokenises (`gpt.tokenizer`) or writes (`gpt.corpus.writing`).

`fingerprint()` is what `gpt.corpus.prepare` stores beside prepared token files to decide whether they
can be reused: file paths, sizes and modification times, or a dataset's name, config and split
(reading no data and using no network), and the text field where there is one.

`pyarrow` and `datasets` are optional (`pip install -e ".[datasets]"`); without them, naming a
Parquet file or an `hf:` source is an error that says what to install.
"""

import codecs
import gzip
import hashlib
import json
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

from gpt.corpus import Block, HF_PREFIX, Source
from gpt.errors import UserError, first_line

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
PARQUET_SUFFIXES = (".parquet",)
BLOCK_BYTES = 1 << 20  # read text files in 1 MiB blocks
PARQUET_BATCH_ROWS = 1024  # rows per batch read from a Parquet file
HF_BATCH_ROWS = 1024  # records per batch read from a Hugging Face dataset
KINDS = ".txt, .md, .jsonl, .jsonl.gz or .parquet"
EXTRA = 'pip install pyarrow datasets, or pip install -e ".[datasets]"'


def _slug(text: str) -> str:
    """A folder-name-safe version of `text`."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "corpus"


def _kind(path: Path) -> str:
    """text, jsonl or parquet, by the file's name."""
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "text"


def _stem(path: Path) -> str:
    """The name without its corpus suffixes: notes.jsonl.gz -> notes."""
    name = path.name
    for suffix in (*JSONL_SUFFIXES, *PARQUET_SUFFIXES, *TEXT_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


class FileSource(Source):
    """A file, or every corpus file under a folder (sorted by path)."""

    unit = "B"

    def __init__(self, path: Path, text_field: str, label: str):
        self.path, self.label = path, label
        if path.is_file():
            self.files = [path]
        else:
            self.files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(
                (*TEXT_SUFFIXES, *JSONL_SUFFIXES, *PARQUET_SUFFIXES)))
            if not self.files:
                raise UserError(f"corpus folder {path} holds no {KINDS} files; add some or name a file")
        # The stem names the folder; a hash of the full path keeps two notes.txt apart.
        resolved = str(path.resolve())
        self.name = f"{_stem(path.resolve()) or 'corpus'}-{hashlib.sha256(resolved.encode()).hexdigest()[:8]}"
        self.stats = [(f, f.stat()) for f in self.files]
        self.total = sum(st.st_size for _, st in self.stats)
        self.text_field = text_field if any(_kind(f) != "text" for f in self.files) else None
        parquet = [f for f in self.files if _kind(f) == "parquet"]
        if parquet:
            import_pyarrow(parquet[0])  # say what to install before anything else happens

    def fingerprint(self) -> dict:
        files = [[str(f), st.st_size, st.st_mtime_ns] for f, st in self.stats]
        fingerprint = {"path": str(self.path.resolve()), "files": files}
        if self.text_field:  # (corpora of text files only keep the fingerprint they had before records)
            fingerprint["text_field"] = self.text_field
        return fingerprint

    def blocks(self) -> Iterator[Block]:
        for file in self.files:
            kind = _kind(file)
            if kind == "text":
                yield from text_file_blocks(file)
            else:
                yield from (jsonl_blocks if kind == "jsonl" else parquet_blocks)(file, self.text_field)

    def records(self) -> Iterator[tuple[dict, str]]:
        for file in self.files:
            kind = _kind(file)
            if kind == "text":
                raise UserError(f"{file} is plain text; a chat corpus (data.format: chat) is JSONL, Parquet or hf: "
                                "records of conversations")
            yield from (jsonl_records if kind == "jsonl" else parquet_records)(file)


class HFSource(Source):
    """A Hugging Face dataset, streamed: `hf:NAME` or `hf:NAME:CONFIG`, split `hf_split`."""

    unit = "doc"
    total = None  # a streamed dataset need not know its size

    def __init__(self, spec: str, text_field: str, split: str, option: str):
        self.label, self.text_field, self.split = spec, text_field, split
        self.dataset, _, config = spec[len(HF_PREFIX):].partition(":")
        self.config = config or None
        if not self.dataset:
            raise UserError(f"{spec!r} names no dataset; write hf:NAME or hf:NAME:CONFIG, e.g. "
                            "hf:HuggingFaceFW/fineweb-edu:sample-10BT")
        digest = hashlib.sha256(f"{self.dataset}:{self.config}:{split}".encode()).hexdigest()[:8]
        self.name = f"hf-{_slug(self.dataset.rstrip('/').split('/')[-1])}-{digest}"
        import_datasets(f"{option} {spec!r}")  # say what to install before anything else happens

    def fingerprint(self) -> dict:
        return {"hf": self.dataset, "config": self.config, "split": self.split, "text_field": self.text_field}

    def blocks(self) -> Iterator[Block]:
        datasets = import_datasets(repr(self.label))
        what = f"Hugging Face dataset {self.dataset!r}" + (f" (config {self.config!r})" if self.config else "")
        try:
            stream = datasets.load_dataset(self.dataset, self.config, split=self.split, streaming=True)
        except Exception as e:  # offline, unknown name, config or split: datasets raises many types
            raise UserError(f"cannot open {what}, split {self.split!r} ({first_line(e)}); check the name, "
                            "config and split, and the connection, or download its files and set "
                            "data.corpus to their folder") from None
        number = 0
        try:
            for batch in stream.iter(batch_size=HF_BATCH_ROWS):  # a dict of columns
                if self.text_field not in batch:
                    raise UserError(f"{what} has no field {self.text_field!r} (its fields: "
                                    f"{', '.join(batch)}); set data.text_field to the one that holds the text")
                for text in batch[self.text_field]:
                    number += 1
                    yield Block(_checked_text(text, self.text_field, f"{what}, record {number},"), True, 1)
        except UserError:
            raise
        except Exception as e:  # the connection dropped, a shard is damaged, ...
            raise UserError(f"reading {what} failed after record {number} ({first_line(e)}); "
                            "check the connection and run again") from None

    def records(self) -> Iterator[tuple[dict, str]]:
        datasets = import_datasets(repr(self.label))
        what = f"Hugging Face dataset {self.dataset!r}" + (f" (config {self.config!r})" if self.config else "")
        try:
            stream = datasets.load_dataset(self.dataset, self.config, split=self.split, streaming=True)
        except Exception as e:
            raise UserError(f"cannot open {what}, split {self.split!r} ({first_line(e)}); check the name, "
                            "config and split, and the connection") from None
        number = 0
        try:
            for record in stream:
                number += 1
                yield dict(record), f"{what}, record {number},"
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"reading {what} failed after record {number} ({first_line(e)}); "
                            "check the connection and run again") from None


# --------------------------------------------------------------------------- Shakespeare


# --------------------------------------------------------------------------- readers

def _checked_text(value: object, field: str, where: str) -> str:
    """`value` if it is a string, else a UserError naming `where` and what the field holds."""
    if isinstance(value, str):
        return value
    held = "null" if value is None else type(value).__name__
    raise UserError(f"{where} field {field!r} is {held}, not a string; set data.text_field to a field "
                    "that holds text")


def _cannot_read(path: Path, e: Exception) -> UserError:
    return UserError(f"cannot read {path} ({getattr(e, 'strerror', None) or first_line(e)}); check the file")


def read_text_blocks(path: Path) -> Iterator[str]:
    """The UTF-8 text of `path` in blocks of about 1 MiB; a UserError names the first bad byte."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # bytes read before this block
    try:
        f = open(path, "rb")
    except OSError as e:
        raise _cannot_read(path, e) from None
    with f:
        while True:
            try:
                data = f.read(BLOCK_BYTES)
            except OSError as e:
                raise _cannot_read(path, e) from None
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


def text_file_blocks(path: Path) -> Iterator[Block]:
    """A text file as one document, in blocks; each block's advance is the bytes it was read from."""
    for i, text in enumerate(read_text_blocks(path)):
        # (A character split across blocks counts where it ends.)
        yield Block(text, i == 0, len(text.encode("utf-8")))


def _record(line: bytes, where: str, field: str = "text") -> dict:
    """One JSONL line as a JSON object, checked; `where` names the file and line."""
    try:
        record = json.loads(line)
    except UnicodeDecodeError:
        raise UserError(f"{where} is not UTF-8 text; convert the file to UTF-8") from None
    except ValueError as e:
        detail = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else first_line(e)
        raise UserError(f"{where} is not JSON ({detail}); each line must be one JSON object, e.g. "
                        f'{{"{field}": "..."}}') from None
    if not isinstance(record, dict):
        raise UserError(f"{where} is a JSON {type(record).__name__}, not an object; each line must be one "
                        f'JSON object, e.g. {{"{field}": "..."}}')
    return record


def _record_text(line: bytes, field: str, where: str) -> str:
    """The text of one JSONL line, checked; `where` names the file and line."""
    record = _record(line, where, field)
    if field not in record:
        fields = ", ".join(list(record)[:10]) or "none"
        raise UserError(f"{where} has no field {field!r} (its fields: {fields}); set data.text_field to the "
                        "one that holds the text")
    return _checked_text(record[field], field, f"{where}:")


def jsonl_lines(path: Path) -> Iterator[tuple[int, bytes, int]]:
    """(line number, line, bytes read of the file so far) for each non-blank line of a JSONL (or
    .jsonl.gz) file; for .gz the bytes are compressed ones, what the progress total counts."""
    compressed = path.name.lower().endswith(".gz")
    try:
        raw = open(path, "rb")
    except OSError as e:
        raise _cannot_read(path, e) from None
    with raw, (gzip.open(raw, "rb") if compressed else raw) as lines:
        number = 0
        while True:
            try:
                line = lines.readline()
            except (OSError, EOFError, zlib.error) as e:  # not gzip, truncated, or a read error
                raise _cannot_read(path, e) from None
            if not line:
                return
            number += 1
            if line.strip():
                yield number, line, raw.tell()


def jsonl_blocks(path: Path, field: str) -> Iterator[Block]:
    """Each line of a JSONL (or .jsonl.gz) file as a document; blank lines are skipped."""
    done = 0
    for number, line, position in jsonl_lines(path):
        yield Block(_record_text(line, field, f"{path} line {number}"), True, position - done)
        done = position


def jsonl_records(path: Path) -> Iterator[tuple[dict, str]]:
    """Each non-blank line of a JSONL (or .jsonl.gz) file as a JSON object, with its place."""
    for number, line, _ in jsonl_lines(path):
        where = f"{path} line {number}"
        yield _record(line, where, "messages"), where


def parquet_records(path: Path) -> Iterator[tuple[dict, str]]:
    """Each row of a Parquet file as a dict of its columns, with its place."""
    import pyarrow as pa

    pq = import_pyarrow(path)
    try:
        with pq.ParquetFile(path) as parquet:
            row = 0
            for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS):
                for record in batch.to_pylist():
                    yield record, f"{path} row {row}"
                    row += 1
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"cannot read {path} as Parquet ({first_line(e)}); check the file") from None


def import_pyarrow(path: Path):
    """pyarrow.parquet, or a UserError that says how to install it."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"reading {path} needs pyarrow: {EXTRA}") from None
    return pq


def import_datasets(what: str):
    """The datasets module, or a UserError (saying `what` needs it) that says how to install it."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"{what} needs the datasets library: {EXTRA}") from None
    return datasets


def _is_text_type(arrow_type) -> bool:
    import pyarrow as pa

    checks = (pa.types.is_string, pa.types.is_large_string, getattr(pa.types, "is_string_view", None))
    return any(check is not None and check(arrow_type) for check in checks)


def parquet_blocks(path: Path, field: str) -> Iterator[Block]:
    """Each row of a Parquet file as a document: the `field` column, a batch of rows at a time."""
    import pyarrow as pa

    pq = import_pyarrow(path)
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"cannot read {path} as Parquet ({first_line(e)}); check the file") from None
    with parquet:
        schema = parquet.schema_arrow
        if field not in schema.names:
            raise UserError(f"{path} has no column {field!r} (its columns: {', '.join(schema.names[:10])}); "
                            "set data.text_field to the column that holds the text")
        if not _is_text_type(schema.field(field).type):
            raise UserError(f"{path} column {field!r} holds {schema.field(field).type}, not strings; set "
                            "data.text_field to the column that holds the text")
        size, rows, row = path.stat().st_size, max(1, parquet.metadata.num_rows), 0
        try:
            for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[field]):
                texts = batch.column(0).to_pylist()
                # The file's bytes, in proportion to rows, move the progress at the batch's last row.
                advance = size * (row + len(texts)) // rows - size * row // rows
                for i, text in enumerate(texts):
                    where = f"{path} row {row + i}:"
                    yield Block(_checked_text(text, field, where), True, advance if i == len(texts) - 1 else 0)
                row += len(texts)
        except (OSError, pa.ArrowException) as e:
            raise UserError(f"cannot read {path} as Parquet ({first_line(e)}); check the file") from None
