"""What `python -m gpt evaluate --checkpoint RUN` measures on a chat run, for it and for its base.

- loss on replies: the mean next-token loss over the held-out conversations' assistant tokens
  (each reply's text and its `<|end|>`), every conversation of the val split, one per window
  (`gpt.tools.evaluate.score` over `gpt.chat.data.ChatWindows`);
- accuracy: the held-out questions that have one right answer (a record's `answer`; in
  `shakespeare-chat`, the play of a speech and its speaker), asked with the chat template and
  answered greedily; a reply is right when it equals the answer (case, spaces and a final
  full stop aside). Beside it, the majority-answer baseline: the accuracy of always giving the
  answer the train split gives most often for that task;
- ended: the share of greedy replies (to every asked conversation, checkable or not) that end
  with `<|end|>` within `limit` tokens.

The base is the model the fine-tuning started from (`model.init_from`) with the template's new
token rows as fine-tuning initialises them (`gpt.gpt2.pretrained.add_token_rows`): exactly step 0.
"""

import json
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from gpt.chat.template import reply
from gpt.chat.data import VAL_RECORDS
from gpt.errors import UserError
from gpt.sampling import SampleConfig

REPLIES = 100  # held-out conversations replied to (--replies)
REPLY_LIMIT = 64  # tokens a reply may take (--max-new-tokens): the longest shakespeare-chat reply fits


@dataclass
class Answers:
    """What greedy replies to the held-out conversations gave."""

    asked: int = 0  # conversations replied to
    skipped: int = 0  # conversations whose prompt cannot fit the context with room for a reply
    ended: int = 0  # replies that ended with <|end|> within the limit
    right: Counter = field(default_factory=Counter)  # per task: replies equal to the answer
    questions: Counter = field(default_factory=Counter)  # per task: checkable conversations asked


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().rstrip(".!").strip().lower()


def held_out(prepared: Path, count: int) -> list[dict]:
    """The first `count` held-out records (their order is already shuffled)."""
    with open(prepared / VAL_RECORDS, encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    return records[:count]


@torch.no_grad()
def ask(model: nn.Module, records: list[dict], limit: int, device: torch.device) -> Answers:
    """Greedy replies to each record's conversation up to its last reply; what they got right."""
    greedy = replace(SampleConfig(), temperature=0.0, max_new_tokens=limit)
    answers = Answers()
    for record in records:
        messages = record["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        try:
            text, ended, _ = reply(model, messages[:last], greedy, device)
        except UserError:  # its system prompt alone leaves no room for a reply in this context
            answers.skipped += 1
            continue
        answers.asked += 1
        answers.ended += ended
        if "answer" in record:
            task = str(record.get("task", "answer"))
            answers.questions[task] += 1
            answers.right[task] += normalise(text) == normalise(str(record["answer"]))
    return answers


def majority(records: list[dict], train_answers: dict[str, dict[str, int]]) -> dict[str, tuple[str, int]]:
    """Per task: (the train split's most frequent answer, how many asked questions it answers)."""
    result = {}
    for task, counts in train_answers.items():
        top = max(counts, key=counts.get)
        hits = sum(1 for r in records if str(r.get("task", "answer")) == task and "answer" in r
                   and normalise(str(r["answer"])) == normalise(top))
        result[task] = (top, hits)
    return result


def percent(right: int, total: int) -> str:
    return f"{100 * right / total:.1f}%" if total else "-"
