"""Zero-shot multiple choice, scored as llm.c and build-nanogpt score HellaSwag.

A task is a list of items: a context, two or more endings and the index of the right one. Each
ending is scored after its context by the model's summed next-token loss over the ending's tokens
only; `acc` picks the ending with the lowest sum, `acc_norm` the one with the lowest mean per
token (which does not favour short endings). Chance is the mean of 1 / endings over the items.

Tasks (`load_task`):
- `hellaswag`: the official validation file (10,042 items), downloaded once into `data/tasks/`
  from the authors' repository at a pinned commit and checked against its git blob id;
- `shakespeare-next-words`: made here from the val split of the built-in corpus (`gpt.tools.next_words`);
- a JSONL file, one item per line: `{"context": ..., "endings": [...], "label": i}`, or
  HellaSwag's own `ctx` / `endings` / `label`.

The ending follows its context with one space between them unless either side already has
whitespace there (HellaSwag's contexts end in a word and its endings start with one). A chat-tuned
run is asked as it is talked to: the context is a user turn, each ending the assistant's reply
followed by `<|end|>`, so that an ending which is only the start of another scores as unfinished.
An item's context may also be a whole conversation (its messages, a system prompt and earlier
turns included), rendered with the chat template up to the reply: `gpt.chat.scoring` asks a chat
run's held-out questions this way.

Scoring (`score_task`) runs a context once for all the endings that share it, where llm.c runs it
again in each ending's row: an item's endings that keep the same context (`shared_contexts`) go
into a batch as one context row, run into a KV cache (`gpt.tools.batched.RowCache`, each row at its own
length), which each ending's row then continues, so a chat question's 7 to 38 candidate replies
cost one pass over the conversation and a few tokens each. A context too long for the model loses
its first tokens, and endings of different lengths keep different crops of it: those share only
with the endings that keep the same crop, so every ending is scored after exactly its own row's
context. The output head runs only where an ending's token is predicted, once per distinct
(context, ending start), over the real vocabulary (`ending_states`, `target_nats`), and in
float32 only as far as the picks need: a cheap lower bound of every ending's loss first, then
the exact loss of each ending that could still be its item's pick (`picking_nats`). A batch holds as
many whole groups, longest contexts first (right-padded to the longest, their endings to theirs),
as keep the head's positions within the token budget of an eval batch (`data.batch_size` x
`context_length`: no more logits than that batch's) and the cache within as many numbers. With
several processes each scores every world_size-th item and the counts are summed.
"""

import contextlib
import hashlib
import json
import math
import os
import random
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from gpt.chat.template import END_ID, encode_content, render_prompt
from gpt.compiled import compile_model
from gpt.config import TrainConfig
from gpt.distributed import Distributed, SINGLE
from gpt.downloads import DATA_DIR
from gpt.errors import UserError
from gpt.metrics import Figures
from gpt.model import IGNORE_INDEX
from gpt.precision import Precision
from gpt.tokenizer import get_tokenizer
from gpt.tools.batched import RowCache
from gpt.tools.next_words import NEXT_WORDS, next_words_task

TASK_DIR = DATA_DIR / "tasks"
HELLASWAG = "hellaswag"
HELLASWAG_FILE = "hellaswag_val.jsonl"
HELLASWAG_COMMIT = "a29ff8e9a04bba4bd6588223785ce105328adc57"  # rowanz/hellaswag, the file's last change (May 2019)
HELLASWAG_URL = f"https://raw.githubusercontent.com/rowanz/hellaswag/{HELLASWAG_COMMIT}/data/{HELLASWAG_FILE}"
HELLASWAG_BLOB = "0f5ee25d72216f12317d5d8a7b92deafa423d81e"  # its git blob id at that commit (git ls-tree)
# acc_norm that GPT-2's own weights reach on HellaSwag's val split, scored this way (llm.c's dev/data/hellaswag.py)
GPT2_HELLASWAG = {"gpt2": 0.2955, "gpt2-xl": 0.4893}
ALIGN = 16  # a batch's rows are padded to a multiple of this many tokens: few distinct shapes to compile
SUBSET_SEED = 0  # the fixed subset `--limit` and `train.eval_task_items` take, the same for every run
Z95 = 1.959964  # the normal quantile of a two-sided 95% interval


@dataclass(frozen=True)
class Item:
    context: str | tuple[dict, ...]  # a text; for a chat run, also a conversation's messages before the reply
    endings: tuple[str, ...]
    label: int  # the index of the right ending
    where: str = field(default="an item", compare=False)  # what an error calls it: the file and line


@dataclass
class Task:
    name: str  # what metrics.csv's columns and the printed line call it
    items: list[Item]
    source: str  # where the items came from

    @property
    def chance(self) -> float:
        """The accuracy of picking an ending at random."""
        return sum(1 / len(item.endings) for item in self.items) / len(self.items)


# --------------------------------------------------------------------------- reading tasks

def parse_item(line: str, where: str) -> Item:
    """One JSONL line as an item; a UserError naming `where` if it is not one."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where} is not JSON ({e.msg}); write one item per line") from None
    if not isinstance(record, dict):
        raise UserError(f"{where} is not a JSON object; write {{\"context\": ..., \"endings\": [...], \"label\": i}}")
    context = record.get("context", record.get("ctx"))
    endings, label = record.get("endings"), record.get("label")
    if not isinstance(context, str) or not context.strip():
        raise UserError(f"{where} has no context: give \"context\" (or HellaSwag's \"ctx\") as non-empty text")
    if (not isinstance(endings, list) or len(endings) < 2
            or not all(isinstance(e, str) and e.strip() for e in endings)):
        raise UserError(f"{where}: \"endings\" must be a list of at least 2 non-empty texts")
    if isinstance(label, str) and label.isdigit():  # HellaSwag's files give some labels as text
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(endings):
        raise UserError(f"{where}: \"label\" must be the index of the right ending, 0 to {len(endings) - 1}, "
                        f"got {label!r}")
    return Item(context, tuple(endings), label, where)


def read_items(path: Path) -> list[Item]:
    """Every item of a JSONL file; a UserError naming the first bad line."""
    try:
        with open(path, encoding="utf-8") as f:
            items = [parse_item(line, f"{path} line {n}") for n, line in enumerate(f, 1) if line.strip()]
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; save it as UTF-8") from None
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror}); check the path") from None
    if not items:
        raise UserError(f"{path} has no items; write one JSON object per line")
    return items


def git_blob_id(path: Path) -> str:
    """The id git gives the file's content (`git hash-object`): SHA-1 over a header and the bytes."""
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, target: Path, blob_id: str) -> Path:
    """`target`, downloaded from `url` first unless it is there with the pinned content."""
    if target.is_file() and git_blob_id(target) == blob_id:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as f:
            print(f"downloading {url} ...", file=sys.stderr)  # once it answers: no line before an error
            while block := response.read(1 << 20):
                f.write(block)
        actual = git_blob_id(partial)
        if actual != blob_id:
            raise UserError(f"{url} has git blob id {actual}, expected {blob_id}; refusing to use it")
        os.replace(partial, target)
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or e
        raise UserError(f"could not download {target.name} ({reason}); put it at {target} "
                        f"(it is data/{target.name} of github.com/rowanz/hellaswag)") from None
    finally:
        partial.unlink(missing_ok=True)
    return target


def load_task(spec: str) -> Task:
    """The task `spec` names: hellaswag, shakespeare-next-words, or a JSONL file of items."""
    if spec == HELLASWAG:
        path = download(HELLASWAG_URL, TASK_DIR / HELLASWAG_FILE, HELLASWAG_BLOB)
        return Task(HELLASWAG, read_items(path), str(path))
    if spec == NEXT_WORDS:
        path = next_words_task()
        return Task(NEXT_WORDS, read_items(path), str(path))
    path = Path(spec).expanduser()
    if not path.is_file():
        raise UserError(f"no task {spec!r}: give {HELLASWAG}, {NEXT_WORDS} or a JSONL file of "
                        "{\"context\": ..., \"endings\": [...], \"label\": i} lines")
    stem = path.name.removesuffix(".jsonl")
    return Task(stem, read_items(path), str(path))


def subset(task: Task, limit: int | None) -> Task:
    """The task's fixed subset of `limit` items (a seeded draw, in file order); all of it for None."""
    if limit is None or limit >= len(task.items):
        return task
    if limit < 1:
        raise ValueError(f"a subset of at least 1 item, not {limit}")
    chosen = sorted(random.Random(SUBSET_SEED).sample(range(len(task.items)), limit))
    return Task(task.name, [task.items[i] for i in chosen], task.source)


# --------------------------------------------------------------------------- tokens

@dataclass(frozen=True)
class Prompts:
    """How items become token ids: plain text, or a chat run's user turn (or conversation) and assistant reply."""

    encode_context: Callable[[str], list[int]]
    encode_ending: Callable[[str, str], list[int]]  # (context, ending) -> the ending's ids

    @staticmethod
    def for_model(chat: bool) -> "Prompts":
        enc = get_tokenizer()
        if not chat:
            def ending(context: str, text: str) -> list[int]:
                joined = text if context[-1:].isspace() or text[:1].isspace() else " " + text
                return enc.encode_ordinary(joined)
            return Prompts(enc.encode_ordinary, ending)
        def conversation(context: str | tuple[dict, ...]) -> list[dict]:  # a text is one user turn
            return [{"role": "user", "content": context}] if isinstance(context, str) else list(context)
        return Prompts(lambda context: render_prompt(conversation(context)),
                       lambda context, text: encode_content(text.strip()) + [END_ID])


def item_rows(item: Item, prompts: Prompts, context_length: int) -> list[tuple[list[int], int]]:
    """Each ending's row: (the context's ids then the ending's, how many are the context's)."""
    context = prompts.encode_context(item.context)
    rows = []
    for k, text in enumerate(item.endings):
        ending = prompts.encode_ending(item.context, text)
        if len(ending) >= context_length:
            raise UserError(f"{item.where}: ending {k} is {len(ending)} tokens, and the model's context "
                            f"({context_length}) must hold it and a token of context; shorten it")
        kept = context[-(context_length + 1 - len(ending)):]  # a row of n tokens predicts n - 1 of them
        rows.append((kept + ending, len(kept)))
    return rows


@dataclass(frozen=True)
class Shared:
    """An item's endings that keep the same context: the context runs once, its endings after it."""

    context: list[int]  # the kept context's ids (`item_rows`)
    endings: list[list[int]]  # each ending's ids
    rows: list[int]  # the endings' numbers over all the items' rows, in order: where their losses go


def shared_contexts(rows: list[list[tuple[list[int], int]]]) -> list[Shared]:
    """Each item's rows (its `item_rows`) grouped by the context they keep.

    Endings of different lengths keep different crops of a context too long for the model: only
    rows whose kept ids are the same share a context, so every ending is scored after exactly its
    own row's context."""
    groups, number = [], 0
    for item in rows:
        by_context: dict[tuple[int, ...], Shared] = {}
        for ids, kept in item:
            group = by_context.setdefault(tuple(ids[:kept]), Shared(ids[:kept], [], []))
            group.endings.append(ids[kept:])
            group.rows.append(number)
            number += 1
        groups += by_context.values()
    return groups


def predictions(group: Shared) -> int:
    """The positions the head runs at for a group: once per distinct start of its endings (`padded_batch`)."""
    return len({tuple(ending[:j]) for ending in group.endings for j in range(len(ending))})


def batches_of(groups: list[Shared], budget: int, context_length: int, max_rows: int) -> list[list[int]]:
    """The groups (indices into `groups`) of each batch, longest contexts first: as many whole groups as keep
    the head's positions within `budget` (an eval batch's tokens: its logits are no more than that batch's)
    and the KV cache within `max_rows` rows (contexts and endings), while every row's padded ending stays
    within the context."""
    def lengths(g: int) -> tuple[int, int]:  # its context's length, its longest ending's but the last token
        return len(groups[g].context), max(map(len, groups[g].endings)) - 1
    batches, current = [], []
    positions = rows = width = room = 0  # the batch's head positions, cache rows, widest ending, least room
    for g in sorted(range(len(groups)), key=lengths, reverse=True):
        length, wide = lengths(g)
        grown = (positions + predictions(groups[g]), rows + 1 + len(groups[g].endings), max(width, wide),
                 min(room, context_length - length))
        if current and (grown[0] > budget or grown[1] > max_rows or grown[2] > grown[3]):
            batches.append(current)
            current, grown = [], (predictions(groups[g]), 1 + len(groups[g].endings), wide, context_length - length)
        current.append(g)
        positions, rows, width, room = grown
    return batches + [current] if current else batches


def padded_batch(groups: list[Shared]) -> tuple[torch.Tensor, ...]:
    """(contexts (G, L), lengths (G,), group_of (R,), wide (R1, W1), narrow (R2, W2), positions (U,), sources (N,),
    targets (N,), owners (N,)) of G groups and their R = R1 + R2 endings.

    Each context is right-padded to the longest, L. Each ending but its last token is a row that
    continues its group's context (`group_of`); the rows, longest first, fall into two blocks, each
    right-padded to its longest: `wide` and then `narrow`, split where the two hold the fewest
    tokens (shakespeare-chat's replies of 2 to 10 tokens: a third fewer than one block). The hidden
    states `ending_states` makes are each context's last, then the wide rows' flattened, then the
    narrow ones': a context's last predicts the first token of each of its endings, a row's
    position j its ending's token j + 1. `positions` are the hidden states where a token is
    predicted, each once: the endings of a group that start alike share the predictions after the
    same start ("Henry IV" and "Henry V" the one after "Henry"), whose hidden states are the same.
    `sources` say which of them predicts each of the N `targets`, and `owners` whose ending it is
    (its number over all the items' rows: `Shared.rows`). U and N are padded to a multiple of
    `ALIGN`, the targets with IGNORE_INDEX."""
    length = max(len(group.context) for group in groups)
    contexts = torch.zeros(len(groups), length, dtype=torch.long)
    for g, group in enumerate(groups):
        contexts[g, :len(group.context)] = torch.tensor(group.context)
    endings = sorted(((g, ending, number) for g, group in enumerate(groups) for ending, number in
                      zip(group.endings, group.rows)), key=lambda row: len(row[1]), reverse=True)
    widths = [len(ending) - 1 for _, ending, _ in endings]
    split = min(range(1, len(endings) + 1), key=lambda k: k * widths[0] + (len(endings) - k) * widths[k % len(endings)])
    blocks = [torch.zeros(split, widths[0], dtype=torch.long),
              torch.zeros(len(endings) - split, widths[split] if split < len(endings) else 0, dtype=torch.long)]
    positions, sources, targets, owners = list(range(len(groups))), [], [], []
    predicted = {(g, ()): g for g in range(len(groups))}  # (group, an ending's start) -> what predicts its next token
    for r, (g, ending, number) in enumerate(endings):
        block, k = (blocks[0], r) if r < split else (blocks[1], r - split)
        block[k, :len(ending) - 1] = torch.tensor(ending[:-1])
        first = len(groups) + (0 if r < split else blocks[0].numel()) + k * block.shape[1]  # the row's first state
        for j in range(len(ending)):
            source = predicted.setdefault((g, tuple(ending[:j])), len(positions))
            if source == len(positions):  # the first ending of its group to start this way
                positions.append(first + j - 1)
            sources.append(source)
        targets += ending
        owners += [number] * len(ending)
    spare, missing = -len(positions) % ALIGN, -len(targets) % ALIGN
    return (contexts, torch.tensor([len(group.context) for group in groups]), torch.tensor([g for g, _, _ in endings]),
            *blocks, torch.tensor(positions + [0] * spare), torch.tensor(sources + [0] * missing),
            torch.tensor(targets + [IGNORE_INDEX] * missing), torch.tensor(owners + [0] * missing))


def cache_rows(model: nn.Module, budget: int) -> int:
    """The most rows (contexts and endings) a batch's KV cache may hold: as many numbers as the logits of an
    eval batch of `budget` tokens, which training holds at once, were every row as long as the context."""
    cfg = model.cfg
    return max(2, budget * cfg.padded_vocab_size // (cfg.context_length * cfg.n_layers * 2 * cfg.emb_dim))


def ending_states(model: nn.Module, contexts: torch.Tensor, lengths: torch.Tensor, group_of: torch.Tensor,
                  wide: torch.Tensor, narrow: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(U, emb_dim) the hidden states at `positions` (`padded_batch`): where the endings' tokens are predicted.

    The (G, L) contexts run once, into a KV cache (`gpt.tools.batched.RowCache`: each row at its own
    length), which each of their endings' rows then continues: a chat question's 7 to 38 replies
    share one pass over its conversation. The head then runs at these positions only
    (`target_nats`, `picking_nats`), not over every context token: on small.yaml's model it is most
    of the compute. Compiled where training compiles (`Scoring`)."""
    cache = RowCache.empty(model, len(contexts), contexts.shape[1] + wide.shape[1])  # the slots the batch fills
    hidden = model.hidden_states(contexts, cache)  # (G, L, emb_dim)
    states = [hidden[torch.arange(len(contexts), device=contexts.device), lengths - 1]]  # (G, emb_dim): each last
    cache.advance(lengths)
    for rows, owners in ((wide, group_of[:len(wide)]), (narrow, group_of[len(wide):])):
        if rows.shape[0] and rows.shape[1]:  # some ending of the block has a token after its first
            states.append(model.hidden_states(rows, cache.select(owners)).flatten(0, 1))  # (rows * width, emb_dim)
    return torch.cat(states)[positions]


VOCAB_PIECE = 4096  # the head's vocabulary rows at a time in `target_nats`


def target_nats(model: nn.Module, hidden: torch.Tensor, sources: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N,) next-token losses: -log p(targets[n]) at the hidden state hidden[sources[n]], in float32 (as
    F.cross_entropy takes the logits under autocast), over the real vocabulary, as `gpt.tools.batched.vocab_logits`.

    F.cross_entropy's math, each of the U positions' normalisers (the logsumexp of its logits)
    computed once for the targets that share it. The head runs VOCAB_PIECE vocabulary rows at a
    time, and no (U, vocab) logits are ever held: on a 2-core CPU the (U, 4096) matmuls take three
    quarters of the time of one (U, 50257), measured. A piece's normaliser is one of its logits
    minus that logit's log_softmax (one fused pass: with logsumexp's four the head takes 1.2x as
    long, measured); the pieces' normalisers then add up as their logsumexp."""
    x = model.final_norm(hidden)
    weight = model.out_head.weight[:model.cfg.vocab_size]
    norms, picked = [], torch.zeros(targets.shape, device=hidden.device)
    for start in range(0, len(weight), VOCAB_PIECE):
        logits = F.linear(x, weight[start:start + VOCAB_PIECE]).float()  # (U, piece)
        norms.append(logits[:, 0] - logits.log_softmax(-1)[:, 0])
        inside = (targets >= start) & (targets < start + logits.shape[1])
        picked = torch.where(inside, logits[sources, (targets - start).clamp(0, logits.shape[1] - 1)], picked)
    return torch.stack(norms, 1).logsumexp(1)[sources] - picked


BOUND_IDS = 1024  # the ids every position's bound sums over, with the batch's targets: GPT-2's most frequent
MARGIN = 1e-3  # nats a token by which a bound must exceed the best exact loss to leave an ending out (rounding)


def bound_nats(model: nn.Module, hidden: torch.Tensor, sources: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N,) lower bounds of `target_nats`: each position's normaliser summed over a few ids only, the first
    BOUND_IDS (GPT-2's BPE merged its most frequent tokens first) and every target of the batch, which
    the sum over the whole vocabulary can only exceed. On the chat demo 1,105 to 1,345 ids, under 3%
    of the head's work, and close where the model is sure: its mass is on those ids."""
    first = torch.arange(min(BOUND_IDS, model.cfg.vocab_size), device=targets.device)
    ids, where = torch.cat([first, targets]).unique(return_inverse=True)
    logits = F.linear(model.final_norm(hidden), model.out_head.weight[ids]).float()  # (U, ids)
    return logits.logsumexp(-1)[sources] - logits[sources, where[len(first):]]


def picking_nats(model: nn.Module, hidden: torch.Tensor, sources: torch.Tensor, targets: torch.Tensor,
                 counted: torch.Tensor, owners: torch.Tensor, groups: list[Shared]) -> torch.Tensor:
    """(N,) the targets' losses (`padded_batch`; the `counted` ones count): exact for every ending that could be
    its group's pick by acc or acc_norm, lower bounds (`bound_nats`) for the others, which then lie above the
    pick's. So each item's picks are those of exact losses everywhere, for a part of the head's work.

    An exact branch and bound, in two rounds of the head at the positions they need: first each
    group's lowest bound by either measure; then every ending whose bound is not above the best of
    those exact losses (by more than MARGIN a token, for rounding). A group is an item's endings
    that share a context (all of them, unless the context was cropped), and the best of a group is
    no better than the best of its item: an ending left out cannot be the item's pick either."""
    nats = bound_nats(model, hidden, sources, targets).masked_fill(~counted, 0.0)
    numbers = torch.tensor(sorted(n for group in groups for n in group.rows))  # the batch's endings
    ending = torch.searchsorted(numbers, owners.cpu()).to(owners.device)  # each target's ending among them
    members = [torch.searchsorted(numbers, torch.tensor(group.rows)) for group in groups]
    def per_ending(values: torch.Tensor) -> torch.Tensor:  # (N,) -> each ending's sum, on the CPU
        return torch.zeros(len(numbers), device=values.device).index_add_(0, ending, values).cpu()
    tokens = per_ending(counted.float())
    exact = torch.zeros(len(numbers), dtype=torch.bool)
    for first_round in (True, False):
        summed = per_ending(nats)
        wanted = torch.zeros_like(exact)
        for rows in members:
            for value, slack in ((summed[rows], MARGIN * tokens[rows]), ((summed / tokens)[rows], MARGIN)):
                if first_round:
                    wanted[rows[value.argmin()]] = True
                else:
                    wanted[rows] |= value <= value[exact[rows]].min() + slack
        wanted &= ~exact
        if wanted.any():
            needed = wanted.to(ending.device)[ending] & counted  # the wanted endings' targets
            positions, where = sources[needed].unique(return_inverse=True)
            nats[needed] = target_nats(model, hidden[positions], where, targets[needed])
        exact |= wanted
    return nats


@dataclass
class Scoring:
    """How items are scored for a model: prompts, the model's context, the batch budget, where and how."""

    prompts: Prompts
    context_length: int
    budget: int  # tokens per batch (padded): an eval batch's, data.batch_size x context_length
    device: torch.device
    precision: Precision | None = None  # autocast, as training runs
    compile: bool | str = False  # as train.compile: `ending_states` through torch.compile where it says so

    def __post_init__(self):
        # Every batch has its own rows, length and count of positions: compiled for any shape at
        # once, rather than again as each dimension first changes
        self.states = compile_model(ending_states, self.compile, self.device, dynamic=True)


# --------------------------------------------------------------------------- scoring

@dataclass
class TaskScore:
    """Counts over a task's items; the figures are properties."""

    name: str
    items: int = 0
    right: int = 0  # acc: the lowest summed loss was the right ending
    right_norm: int = 0  # acc_norm: the lowest mean loss per token was
    chance: float = 0.0  # the sum over items of 1 / endings
    seconds: float = 0.0

    @property
    def acc(self) -> float:
        return self.right / self.items

    @property
    def acc_norm(self) -> float:
        return self.right_norm / self.items

    def interval(self, right: int) -> tuple[float, float]:
        """The 95% Wilson score interval of an accuracy of `right` out of the items."""
        n, p = self.items, right / self.items
        centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
        half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n**2)) / (1 + Z95**2 / n)
        return centre - half, centre + half

    def metrics(self) -> dict[str, float]:
        """Its columns of metrics.csv: `<task>_acc`, `<task>_acc_norm` (NaN before any item is scored)."""
        return {f"{self.name}_acc": self.acc if self.items else math.nan,
                f"{self.name}_acc_norm": self.acc_norm if self.items else math.nan}

    def figures(self) -> dict:
        """What `--json` prints."""
        return {"task": self.name, "items": self.items, "acc": self.acc, "acc_interval": self.interval(self.right),
                "acc_norm": self.acc_norm, "acc_norm_interval": self.interval(self.right_norm),
                "chance": self.chance / self.items, "seconds": self.seconds,
                "items_per_s": self.items / self.seconds if self.seconds else math.nan}

    def line(self) -> str:
        """One line with both accuracies, their intervals, chance and the speed."""
        acc_lo, acc_hi = self.interval(self.right)
        norm_lo, norm_hi = self.interval(self.right_norm)
        return (f"{self.name}: acc_norm {self.acc_norm:.4f} (95% interval {norm_lo:.4f}-{norm_hi:.4f}), "
                f"acc {self.acc:.4f} ({acc_lo:.4f}-{acc_hi:.4f}) over {self.items:,} items; chance "
                f"{self.chance / self.items:.4f} ({self.items / self.seconds:,.1f} items/s)")


@torch.no_grad()
def ending_losses(model: nn.Module, rows: list[list[tuple[list[int], int]]], scoring: Scoring,
                  progress: str | None = None, every: bool = True) -> list[torch.Tensor]:
    """Per item (its `item_rows`), an (endings, 2) float64 tensor: each ending's summed loss and its token
    count, in eval mode. `progress` names the bar (None: no bar).

    With `every` False, only what the picks need where the head runs in full float32: an ending that
    cannot be its item's pick by acc or acc_norm gets a lower bound of its loss, above the pick's
    (`picking_nats`); the picks are the same. Under autocast to 16 bits or in TF32 matmuls (CUDA's
    float32 here) every loss is exact: the bounds' rounding would not stay within MARGIN."""
    was_training = model.training
    model.eval()
    groups = shared_contexts(rows)
    prune = (not every and model.out_head.weight.dtype == torch.float32
             and (scoring.precision is None or scoring.precision.dtype == torch.float32)
             and torch.get_float32_matmul_precision() == "highest")
    sums = torch.zeros(sum(map(len, rows)), 2, device=scoring.device)  # per ending: summed loss, tokens
    bar = tqdm(total=len(groups), desc=progress, unit="context", leave=False, disable=None if progress else True)
    for batch in batches_of(groups, scoring.budget, scoring.context_length, cache_rows(model, scoring.budget)):
        chosen = [groups[g] for g in batch]
        *tensors, sources, targets, owners = (t.to(scoring.device) for t in padded_batch(chosen))
        counted = targets != IGNORE_INDEX
        targets = targets.clamp(min=0)  # the padding's IGNORE_INDEX as an id; its losses are dropped below
        with scoring.precision.autocast() if scoring.precision else contextlib.nullcontext():
            hidden = scoring.states(model, *tensors)
            losses = (picking_nats(model, hidden, sources, targets, counted, owners, chosen) if prune
                      else target_nats(model, hidden, sources, targets))
        sums.index_add_(0, owners, torch.stack([losses.masked_fill(~counted, 0.0), counted.float()], 1))
        bar.update(len(batch))
    bar.close()
    model.train(was_training)
    return list(sums.cpu().double().split([len(item) for item in rows]))  # one sync, at the end


def score_task(model: nn.Module, task: Task, scoring: Scoring, dist: Distributed = SINGLE,
               announce: str | None = None, rows: list | None = None) -> TaskScore:
    """Score every item of `task` (this process's share of them, counts summed over all).

    `rows` are the share's `item_rows`, if already made. With `announce`, the main process prints it
    to stderr once the items are tokenised (and checked), then shows a progress bar."""
    started = time.perf_counter()
    items = task.items[dist.rank::dist.world_size]
    if rows is None:
        rows = [item_rows(item, scoring.prompts, scoring.context_length) for item in items]
    show = announce is not None and dist.is_main
    if show:
        print(announce, file=sys.stderr)
    losses = ending_losses(model, rows, scoring, task.name if show else None, every=False)
    right = right_norm = 0
    for item, scored in zip(items, losses):
        summed, tokens = scored.unbind(1)
        right += int(summed.argmin()) == item.label
        right_norm += int((summed / tokens).argmin()) == item.label
    counts = torch.tensor([len(items), right, right_norm, sum(1 / len(item.endings) for item in items)],
                          dtype=torch.float64)
    if dist.launched:
        counts = dist.sum(counts.to(scoring.device)).cpu()
    total, right, right_norm, chance = counts.tolist()
    return TaskScore(task.name, int(total), int(right), int(right_norm), chance, time.perf_counter() - started)


class TaskScorer:
    """What a training run scores at each evaluation (`train.eval_tasks`): a few metrics.csv columns."""

    def __init__(self, names: list[str], limit: int | None, scoring: Scoring, dist: Distributed = SINGLE):
        self.tasks = [subset(load_task(name), limit) for name in names]
        self.scoring, self.dist = scoring, dist
        # Tokenised once, every item on every process: an ending the context cannot hold stops the
        # run now (on all of them alike), not at its first evaluation. Each keeps its share's rows.
        self.rows = [[item_rows(item, scoring.prompts, scoring.context_length)
                      for item in task.items][dist.rank::dist.world_size] for task in self.tasks]

    @property
    def columns(self) -> list[str]:
        return [name for task in self.tasks for name in TaskScore(task.name).metrics()]

    @property
    def references(self) -> dict[str, tuple[float, str]]:
        return reference_lines([task.name for task in self.tasks])

    def __call__(self, model: nn.Module, precision: Precision) -> Figures:
        """Each task's figures for `model` (the plain module: not DDP's), in training's precision: its
        metrics, and its acc_norm and time for the evaluation's line."""
        self.scoring.precision = precision
        scores = [score_task(model, task, self.scoring, self.dist, rows=rows)
                  for task, rows in zip(self.tasks, self.rows)]
        return Figures({name: value for score in scores for name, value in score.metrics().items()},
                       "".join(f", {score.name} acc_norm {score.acc_norm:.4f} ({score.seconds:.1f} s)"
                               for score in scores))


def reference_lines(tasks: list[str]) -> dict[str, tuple[float, str]]:
    """The lines a plot of these tasks' acc_norm draws beside them (`gpt.metrics.draw_tasks`): label ->
    (value, line style): GPT-2 124M's HellaSwag score, and chance for the tasks of 4 endings."""
    lines = {}
    if HELLASWAG in tasks:
        lines[f"GPT-2 124M on {HELLASWAG} ({GPT2_HELLASWAG['gpt2']})"] = (GPT2_HELLASWAG["gpt2"], "--")
    if set(tasks) & {HELLASWAG, NEXT_WORDS}:  # 4 endings each
        lines["chance (4 endings)"] = (0.25, ":")
    return lines


def task_evaluation(cfg: TrainConfig, chat: bool, context: int, batch_size: int, device: torch.device,
                    dist: Distributed = SINGLE) -> TaskScorer:
    """The evaluation a training run makes of `cfg.eval_tasks` (`gpt.training.evaluations`): each task read
    (downloaded, made) by rank 0 first, then by the others; a line on each from rank 0."""
    scoring = Scoring(Prompts.for_model(chat), context, batch_size * context, device, compile=cfg.compile)
    scorer = dist.in_turn(lambda: TaskScorer(cfg.eval_tasks, cfg.eval_task_items, scoring, dist))
    if dist.is_main:
        for task in scorer.tasks:
            print(f"scoring {task.name} at each evaluation: {len(task.items):,} items of {task.source}")
    return scorer
