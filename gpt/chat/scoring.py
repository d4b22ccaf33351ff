"""What `python -m gpt evaluate --checkpoint RUN` measures on a chat run, for it and for its base.

- loss on replies: the mean next-token loss over the held-out conversations' assistant tokens
  (each reply's text and its `<|end|>`), every conversation of the val split, in the windows
  training evaluates on (`gpt.tools.evaluate.score_replies` over `gpt.chat.data.ChatWindows`);
- accuracy: the held-out questions that have one right answer (a record's `answer`; in
  `shakespeare-chat`, the play of a speech and its speaker), asked with the chat template and
  answered greedily, every conversation in one batch (`ask`: the replies `chat.py` gives one at a
  time, tested); a reply is right when it equals the answer (case, spaces and a final
  full stop aside). Beside it, the majority-answer baseline: the accuracy of always giving the
  answer the train split gives most often for that task;
- likelihood: every held-out question that has `choices` (all of them, not the `--replies`
  sample), as a multiple-choice item (`choice_tasks`): the conversation up to its last reply
  (system prompt and earlier turns included) is the context and each choice a candidate reply
  followed by `<|end|>`, ranked by the model's summed loss over the reply (acc) and its mean per
  token (acc_norm), as `gpt.tools.multiple_choice` scores any task. Chance is the mean of
  1 / choices. It credits what the model prefers among the candidates even where its greedy reply
  is none of them (or not yet an answer at all, as the base model's). A conversation too long for
  the context loses its first tokens, as any task's context does. The majority answer's accuracy
  is given on these questions too;
- ended: the share of greedy replies (to every asked conversation, checkable or not) that end
  with `<|end|>` within `limit` tokens.

The base is the model the fine-tuning started from (`train.init_from`) with the template's new
token rows as fine-tuning initialises them (`gpt.gpt2.pretrained.add_token_rows`): exactly step 0.
"""

import json
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from gpt.chat.data import VAL_RECORDS
from gpt.chat.template import END_ID, reply_prompt
from gpt.errors import UserError
from gpt.sampling import SampleConfig
from gpt.tokenizer import EOT_ID, TextStream
from gpt.tools.batched import generate_rows
from gpt.tools.multiple_choice import Item, Scoring, Task, TaskScore, score_task

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


def held_out(prepared: Path, count: int | None = None) -> list[dict]:
    """The first `count` held-out records (their order is already shuffled); all of them for None."""
    with open(prepared / VAL_RECORDS, encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    return records[:count]


def task_of(record: dict) -> str:
    """The task a record's question counts under ("answer" when it names none)."""
    return str(record.get("task", "answer"))


def before_last_reply(messages: list[dict]) -> list[dict]:
    """The conversation up to its last assistant turn: what that reply answers."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last]


def choice_tasks(records: list[dict], source: str) -> list[Task]:
    """Per task, in the order tasks first appear, its records that have `choices` as a multiple-choice task.

    An item's context is the conversation before the record's last reply, its endings the choices
    and its label the answer's place among them (checked when the records were prepared:
    `gpt.chat.template.check_choices`). `records` are `source`'s lines in order (an item's `where`)."""
    items: dict[str, list[Item]] = {}
    for number, record in enumerate(records, start=1):
        if "choices" in record:
            choices = tuple(record["choices"])
            items.setdefault(task_of(record), []).append(Item(
                tuple(before_last_reply(record["messages"])), choices, choices.index(record["answer"]),
                f"{source} line {number}"))
    return [Task(task, task_items, source) for task, task_items in items.items()]


def rank_choices(model: nn.Module, tasks: list[Task], scoring: Scoring, label: str | None = None
                 ) -> dict[str, TaskScore]:
    """Each task's acc and acc_norm for `model`: its choices ranked by their likelihood as the reply.

    `scoring.prompts` must be the chat run's (`Prompts.for_model(chat=True)`). With `label` (the
    model's name), a line on stderr and a progress bar per task."""
    return {task.name: score_task(model, task, scoring, announce=None if label is None else
                                  f"{label}: ranking the choices of {len(task.items):,} {task.name} questions")
            for task in tasks}


def choice_counts(task: Task) -> str:
    """How many choices the task's questions have: "38", or a range such as "7-22"."""
    counts = {len(item.endings) for item in task.items}
    return f"{min(counts)}" if len(counts) == 1 else f"{min(counts)}-{max(counts)}"


def reply_text(ids: list[int]) -> tuple[str, bool]:
    """(text, ended with <|end|>) of a reply's ids, as `gpt.chat.template.reply` reads them as they come: up to
    <|end|>, or to another marker or <|endoftext|>, which ends the reply too (and is not text)."""
    stream, text = TextStream(), ""
    for token in ids:
        if token >= EOT_ID:  # <|end|>, another marker or <|endoftext|>
            return text + stream.end(), token == END_ID
        text += stream.piece(token)
    return text + stream.end(), False


@torch.no_grad()
def ask(model: nn.Module, records: list[dict], limit: int) -> Answers:
    """Greedy replies to each record's conversation up to its last reply, all of them decoded as one batch
    (`gpt.tools.batched.generate_rows`: the replies `gpt.chat.template.reply` gives one at a time); what they got right."""
    answers = Answers()
    asked, prompts, rooms = [], [], []
    for record in records:
        try:
            prompt = reply_prompt(before_last_reply(record["messages"]), limit, model.cfg.context_length)
        except UserError:  # its system prompt alone leaves no room for a reply in this context
            answers.skipped += 1
            continue
        asked.append(record)
        prompts.append(prompt)
        rooms.append(min(limit, model.cfg.context_length - len(prompt)))  # as much as the reply may take
    was_training = model.training
    model.eval()
    # a reply ends at <|end|>, at another marker or at <|endoftext|>: any id from EOT_ID on
    replies = generate_rows(model, prompts, rooms, replace(SampleConfig(), temperature=0.0),
                            stop=range(EOT_ID, model.cfg.vocab_size))
    model.train(was_training)
    for record, ids in zip(asked, replies):
        text, ended = reply_text(ids)
        answers.asked += 1
        answers.ended += ended
        if "answer" in record:
            task = task_of(record)
            answers.questions[task] += 1
            answers.right[task] += normalise(text) == normalise(str(record["answer"]))
    return answers


def majority(records: list[dict], train_answers: dict[str, dict[str, int]]) -> dict[str, tuple[str, int]]:
    """Per task: (the train split's most frequent answer, how many asked questions it answers)."""
    result = {}
    for task, counts in train_answers.items():
        top = max(counts, key=counts.get)
        hits = sum(1 for r in records if task_of(r) == task and "answer" in r
                   and normalise(str(r["answer"])) == normalise(top))
        result[task] = (top, hits)
    return result


def percent(right: int, total: int) -> str:
    return f"{100 * right / total:.1f}%" if total else "-"
