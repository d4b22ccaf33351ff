"""`shakespeare-next-words`: an offline multiple-choice task made from the built-in corpus's val split.

Each item gives the speaker, up to `CONTEXT_LINES` lines of a speech and the start of its next line,
cut between two words. Its 4 endings are the `WORDS` words that truly follow and `WORDS` words
that follow such a cut in 3 lines of other speeches of the same split: every ending starts in the
middle of a line and has as many words, so that neither position nor length tells them apart;
the model has to know what may follow the context. (Whole next lines, tried first, were too
hard: small.yaml's model scored chance on them, as did the untrained one.) The items are drawn
with a fixed seed from the val split of `data.corpus: shakespeare` at its default settings (the
split `small.yaml` is evaluated on and no run trains on), and written once to `data/tasks/`, as
the corpus itself is prepared on demand.
"""

import json
import os
import random
import re
from pathlib import Path

import numpy as np

from gpt.config import DataConfig
from gpt.corpus.prepare import prepare
from gpt.downloads import DATA_DIR
from gpt.tokenizer import get_tokenizer

NEXT_WORDS = "shakespeare-next-words"
VERSION = 1  # in the file's name: a change to how items are made must change it
ITEMS = 1000
ENDINGS = 4
WORDS = 3  # words in each ending
CONTEXT_LINES = 3  # whole lines of the speech before the cut one
SEED = 1601  # Hamlet's year
_SPEAKER = re.compile(r"^[A-Z][A-Z0-9 .,'&-]*:$")


def speeches(text: str) -> list[tuple[str, list[str]]]:
    """(speaker, spoken lines) of each speech in `text`; stage directions and headings left out."""
    found, speaker, lines = [], None, []
    for line in text.splitlines():
        line = line.strip()
        if _SPEAKER.match(line):
            speaker, lines = line, []
            found.append((speaker, lines))
        elif not line:
            speaker = None  # a blank line ends the speech
        elif speaker is not None and not line.startswith("["):
            lines.append(line)
    return found


def cut(line: str, rng: random.Random) -> tuple[str, str]:
    """(the line's first words, the `WORDS` after them): cut after at least one word."""
    words = line.split(" ")
    k = rng.randint(1, len(words) - WORDS)
    return " ".join(words[:k]), " ".join(words[k:k + WORDS])


def make_items(text: str, count: int = ITEMS, seed: int = SEED) -> list[dict]:
    """`count` items (or as many as `text` allows) as JSONL records: context, endings, label."""
    spoken = speeches(text)
    usable = [(s, j) for s, (_, lines) in enumerate(spoken) for j in range(len(lines))
              if len(lines[j].split(" ")) > WORDS]
    rng = random.Random(seed)
    items = []
    for s, j in rng.sample(usable, min(count, len(usable))):
        speaker, lines = spoken[s]
        start, true = cut(lines[j], rng)
        endings = [true]
        for other, k in (rng.choice(usable) for _ in range(100)):  # a few draws: other speeches, other words
            ending = cut(spoken[other][1][k], rng)[1]
            if other != s and ending not in endings:
                endings.append(ending)
            if len(endings) == ENDINGS:
                break
        else:
            continue  # a text of one speech, or of too few words
        rng.shuffle(endings)
        context = "\n".join([speaker, *lines[max(0, j - CONTEXT_LINES):j], start])
        items.append({"context": context, "endings": endings, "label": endings.index(true)})
    return items


def val_text() -> str:
    """The text of the built-in corpus's val split (prepared first if need be)."""
    prepared = prepare(DataConfig())
    tokens = np.memmap(prepared / "val.bin", dtype=np.uint16, mode="r")
    text = get_tokenizer().decode(tokens.tolist())
    return text[text.index("\n") + 1:]  # the split starts inside a line: from the next whole one


def next_words_task(folder: Path | None = None) -> Path:
    """The task's JSONL file in `folder` (default data/tasks/), written first if it is not there."""
    path = (folder or DATA_DIR / "tasks") / f"{NEXT_WORDS}-v{VERSION}.jsonl"
    if path.is_file():
        return path
    items = make_items(val_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    with open(partial, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(item, ensure_ascii=False) + "\n" for item in items)
    os.replace(partial, path)  # a reader never sees half a file
    return path
