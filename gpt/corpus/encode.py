"""Documents -> GPT-2 token ids on every core, in order, in bounded memory.

The calling process reads the documents (`gpt.corpus.sources` blocks) and cuts them into tasks of about
`CHUNK_CHARS` characters: a long document is cut only where the tokens cannot change
(`safe_cut`), short ones travel several to a task. Tokenising, the slow part (~6.5 MB/s on one
core), runs in `num_proc` worker processes (`concurrent.futures.ProcessPoolExecutor`, which,
unlike `multiprocessing.Pool`, reports a worker killed by the system instead of waiting for it
forever); each task comes back as uint16 token ids, with `<|endoftext|>` before every document
but the first.

The tasks depend on the text only, never on `num_proc`, and results are taken back in task
order, so the token stream is the same, byte for byte, with any number of processes (and equals
tokenising each document whole). At most `2 * num_proc` tasks are in flight: `Pool.imap` (or
`Executor.map`) would read the whole corpus ahead of the workers, into memory, whenever reading
is faster than tokenising (it always is). A corpus of one task is tokenised in the calling
process, with no workers to start.

Workers are forked on Linux: they start in milliseconds and share the parent's tokenizer and
imports; elsewhere the platform's default start method is used.
"""

import itertools
import multiprocessing
import re
import signal
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

import numpy as np

from gpt.corpus import Block
from gpt.errors import UserError
from gpt.tokenizer import EOT_ID, get_tokenizer

CHUNK_CHARS = 1 << 20  # characters per task: ~0.15 s of tokenising, a few MB of memory

# After a non-space character and before a space or a newline, the GPT-2 pre-tokeniser always
# starts a new piece: a piece holding a non-space character can hold a space only as its first
# character and never a newline, and no pattern looks behind. So pieces encoded apart give the
# tokens of the whole. (Python's \S is narrower than the tokenizer's: its cuts are all safe.)
_SAFE_CUT = re.compile(r"\S(?=[ \n])")


def safe_cut(text: str, start: int) -> int | None:
    """The first place at or after `start` where `text` can be cut without changing its tokens."""
    match = _SAFE_CUT.search(text, max(0, start - 1))
    return match.end() if match else None


@dataclass
class Task:
    """Text to tokenise in one go: pieces of documents, and what finishing it accounts for."""

    pieces: list[tuple[str, bool]] = field(default_factory=list)  # (text, <|endoftext|> before it)
    chars: int = 0
    documents: int = 0  # documents that start in this task
    advance: int = 0  # the source's progress (gpt.corpus.sources.Block.advance) once this task is done

    def add(self, text: str, starts_document: bool, first_document: bool) -> None:
        self.pieces.append((text, starts_document and not first_document))
        self.chars += len(text)
        self.documents += starts_document


@dataclass(frozen=True)
class Encoded:
    """A task's tokens (uint16 ids as bytes), and the documents, characters and progress it holds."""

    tokens: bytes
    documents: int
    chars: int
    advance: int


def make_tasks(blocks: Iterable[Block]) -> Iterator[Task]:
    """Cut documents into tasks of about CHUNK_CHARS characters; blank documents are dropped.

    A document's text is held until it can be cut (`safe_cut`) or it ends. A cut needs a
    non-space character before it, so a document that has been cut is not blank; one that
    ends uncut is kept only if it holds a non-space character.
    """
    task, pending, cut_before, documents = Task(), "", False, 0
    for block in blocks:
        if block.starts_document:
            if pending and (cut_before or not pending.isspace()):  # the rest of the document before
                task.add(pending, not cut_before, documents == 0)
                documents += not cut_before
            pending, cut_before = "", False
        pending += block.text
        start = 0  # (cut by offset: slicing the rest off each time would copy a long text again and again)
        while len(pending) - start > CHUNK_CHARS and (cut := safe_cut(pending, start + CHUNK_CHARS)) is not None:
            task.add(pending[start:cut], not cut_before, documents == 0)
            documents += not cut_before
            start, cut_before = cut, True
            if task.chars >= CHUNK_CHARS:
                yield task
                task = Task()
        pending = pending[start:]
        task.advance += block.advance
        if task.chars >= CHUNK_CHARS:
            yield task
            task = Task()
    if pending and (cut_before or not pending.isspace()):
        task.add(pending, not cut_before, documents == 0)
    if task.pieces or task.advance:
        yield task


def encode_pieces(pieces: list[tuple[str, bool]]) -> bytes:
    """The uint16 token ids of a task's pieces, `<|endoftext|>` where marked (runs in a worker)."""
    enc = get_tokenizer()
    ids: list[int] = []
    for text, eot_before in pieces:
        if eot_before:
            ids.append(EOT_ID)
        ids += enc.encode_ordinary(text)
    return np.array(ids, dtype=np.uint16).tobytes()


def _ignore_sigint() -> None:
    # Ctrl-C is for the parent, which stops the workers itself; otherwise every worker would
    # print its own KeyboardInterrupt traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _workers(num_proc: int) -> ProcessPoolExecutor:
    """`num_proc` tokenising processes, forked on Linux."""
    method = "fork" if sys.platform == "linux" else None
    return ProcessPoolExecutor(num_proc, mp_context=multiprocessing.get_context(method), initializer=_ignore_sigint)


def _collect(future: Future, task: Task) -> Encoded:
    """A task's result, once its worker is done with it."""
    try:
        tokens = future.result()
    except BrokenProcessPool:
        raise UserError("a process tokenising the corpus was killed (by the system, if it ran out of memory); "
                        "set data.num_proc lower and prepare again") from None
    return Encoded(tokens, task.documents, task.chars, task.advance)


def encode_documents(blocks: Iterable[Block], num_proc: int) -> Iterator[Encoded]:
    """The token ids of `blocks`' documents, joined by <|endoftext|>, task by task, in order.

    Close the iterator (or let it finish) to stop the workers; reading errors raise here.
    """
    get_tokenizer()  # built (and its files fetched) once, here, before any worker starts
    tasks = make_tasks(blocks)
    head = list(itertools.islice(tasks, 2))
    if num_proc == 1 or len(head) < 2:
        for task in itertools.chain(head, tasks):
            yield Encoded(encode_pieces(task.pieces), task.documents, task.chars, task.advance)
        return
    with _workers(num_proc) as workers:
        in_flight: deque[tuple[Future, Task]] = deque()
        try:
            for task in itertools.chain(head, tasks):
                in_flight.append((workers.submit(encode_pieces, task.pieces), task))
                if len(in_flight) >= 2 * num_proc:
                    yield _collect(*in_flight.popleft())
            while in_flight:
                yield _collect(*in_flight.popleft())
        finally:  # stopped early (data.max_tokens, an error, Ctrl-C): drop what has not started
            for future, _ in in_flight:
                future.cancel()
