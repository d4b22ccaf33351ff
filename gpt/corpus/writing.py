"""Writing prepared token files: tokenising a source into a uint16 file on every core, and publishing
files whole.

A failure leaves the previous files as they were: new files are written beside them as `.tmp`
(`preparing`) and moved into place together, `meta.json` last (`publish`), whose presence says the
files are complete. Imported only when something must be tokenised (`gpt.corpus.prepare`).
"""

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from gpt.corpus import Source
from gpt.corpus.encode import encode_documents
from gpt.errors import UserError

COPY_BYTES = 1 << 20  # moving the val tail of a token file, 1 MiB at a time


def default_num_proc() -> int:
    """The cores this process may run on (its CPU affinity where the platform says)."""
    if hasattr(os, "process_cpu_count"):  # Python 3.13+
        return os.process_cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1



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



def split_off_tail(path: Path, tail: Path, keep_tokens: int) -> None:
    """Move the tokens of `path` after the first `keep_tokens` into the file `tail`."""
    with open(path, "r+b") as f, open(tail, "wb") as out:
        f.seek(2 * keep_tokens)
        shutil.copyfileobj(f, out, COPY_BYTES)
        f.truncate(2 * keep_tokens)
