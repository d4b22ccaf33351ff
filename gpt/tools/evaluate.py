"""Loss, perplexity and bits per byte over every window: `python -m gpt evaluate --checkpoint RUN`.

With `--task`, the accuracy on a multiple-choice task instead (`evaluate_task`, which scores through
`gpt.tools.multiple_choice`). On a chat run, its held-out conversations instead, for it and its
base (`chat_figures`: what `gpt.chat.scoring` says; `chat_table` prints them). Their loss on the
replies is `score`'s over the chat windows with the head only where a target counts (`score_replies`).

`score` is the one evaluation over every window of a token file: training's final figure
(`train.whole_val_at_end`: `final_val_line`) and this command both call it. The windows are those training
evaluates on: `context_length` tokens side by side (stride = context), window i predicting
tokens i*T+1 .. i*T+T from the ones before them in the window. So every token of the file is
scored once, except the first (nothing predicts it) and the fewer than T left after the last
whole window.

- loss: the mean next-token cross-entropy (nats) over the scored tokens; perplexity is e^loss.
- bits per byte: the nats of the scored tokens that are text, divided by the UTF-8 bytes of
  exactly those tokens (each id decoded to its bytes, `gpt.tokenizer.token_byte_lengths`) and
  by ln 2. `<|endoftext|>` separates documents and is not text: it is left out of both, as
  nanochat leaves out its special tokens. A model's bits per byte does not depend on its
  tokenizer, so models with different vocabularies can be compared.

The command scores a run's val split (its own corpus and settings, prepared again if needed)
or, with `--corpus`, all of any corpus `data.corpus` accepts (tokenised once into
`data/<name>-whole/`; `--data.max_tokens=N` scores its first N tokens). `--checkpoint` takes what
`generate.py` takes, GPT-2's weights included.

Precision: the figure is computed in float32 on every CPU, and in the run's autocast (bf16) on a
GPU (`gpt.precision.comparable_dtype`, which says why); `--dtype` chooses another, and the line
says which it ran in.

Compiled: wherever the run's training compiles (`train.compile`; `auto`: on CUDA; GPT-2's weights
take the default), the model runs through `gpt.compiled.compile_model`, the loss inside its graph.
Every batch has the same shape (`gpt.data.eval_loader` pads the last one), so one graph serves all.
"""

import contextlib
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from gpt.chat.data import VAL_RECORDS, load_chat_split, prepare_chat, read_meta
from gpt.chat.scoring import (Answers, REPLIES, REPLY_LIMIT, ask, choice_counts, choice_tasks, held_out, majority,
                              percent, rank_choices)
from gpt.chat.template import chat_model_from_state, check_template
from gpt.checkpoint import build_model, checkpoint_path, load_checkpoint, model_from_state, resolve_model_config
from gpt.cli import DEFAULT_RUN_CONFIG, default_checkpoint
from gpt.compiled import compile_model
from gpt.config import DataConfig, TrainConfig, build_config, config_from_dict, parse_overrides
from gpt.corpus.prepare import open_corpus, prepare, reusable
from gpt.corpus.writing import preparing, publish, write_tokens
from gpt.data import TokenWindows, eval_loader, full_batch, load_split
from gpt.device import pick_device, setup_device
from gpt.downloads import DATA_DIR
from gpt.errors import ArgumentParser, UserError, run_cli
from gpt.gpt2.pretrained import is_pretrained_source
from gpt.model import GPTModel, IGNORE_INDEX, ModelConfig
from gpt.precision import DTYPES, Precision, dtype_name, scoring_dtype
from gpt.resume import seed_everything
from gpt.tools.multiple_choice import HELLASWAG, Prompts, Scoring, TaskScore, load_task, score_task, subset, target_nats
from gpt.tools.next_words import NEXT_WORDS
from gpt.training import Score, batch_to_device, describe, score


def prepare_whole(cfg: DataConfig, spec: str, prepared_dir: str | None = None, max_tokens: int | None = None,
                  option: str = "--corpus") -> Path:
    """Tokenise all of the corpus `spec` (its first `max_tokens`) into whole.bin, once; return the dir.

    The dir is `prepared_dir`, or data/<name>-whole/ (cfg.prepared_dir belongs to cfg.corpus).
    """
    source = open_corpus(spec, cfg, option)
    prepared = Path(prepared_dir) if prepared_dir else DATA_DIR / f"{source.name}-whole"
    wanted = {"corpus": source.name, "source": source.fingerprint(), "tokenizer": "gpt2", "split": "whole",
              "max_tokens": max_tokens}
    if not reusable(prepared, wanted, {"whole.bin": "whole_tokens"}):
        with preparing(prepared, ("whole.bin",)) as temporary:
            written = write_tokens(source, temporary["whole.bin"], cfg.num_proc, max_tokens)
            publish(prepared, temporary, {**wanted, "documents": written.documents,
                                          "characters": written.characters, "whole_tokens": written.tokens})
    return prepared


def counted_nats(model: nn.Module, inputs: torch.Tensor, positions: torch.Tensor | None, counted: torch.Tensor,
                 targets: torch.Tensor) -> torch.Tensor:
    """(N,) next-token losses of the N `targets` predicted at the `counted` places of the flattened (B, T)
    inputs (chat windows, packed where `positions` are given), the head only there."""
    hidden = model.hidden_states(inputs, positions=positions).flatten(0, 1)  # (B * T, emb_dim)
    return target_nats(model, hidden[counted], torch.arange(len(counted), device=counted.device), targets)


def score_replies(model: nn.Module, windows: Dataset, budget: int, device: torch.device,
                  precision: Precision | None = None, compile: bool | str = False) -> Score:
    """`score`'s loss over every chat window of `windows` (their counted targets: the replies), the head
    only at those targets.

    On shakespeare-chat a quarter of a window's positions, where `score` runs the head at all of them
    (the loss inside the model's graph, as training's final figure is computed); the same sums to
    float32's rounding (tested). A batch holds as many consecutive windows as keep their counted
    targets within `budget` (an eval batch's tokens: no more logits than that batch's).
    `counted_nats` runs through torch.compile where `compile` (the run's train.compile) says so, for
    any batch's shape at once. In eval mode; restores the mode."""
    def batches():  # each window read once, into the batch it fits
        current, held = [], 0  # the current batch's windows and their counted targets
        for i in range(len(windows)):
            window = windows[i]
            count = int((window[1] != IGNORE_INDEX).sum())
            if current and held + count > budget:
                yield full_batch(current, len(current))
                current, held = [], 0
            current.append(window)
            held += count
        if current:
            yield full_batch(current, len(current))
    was_training = model.training
    model.eval()
    nats = compile_model(counted_nats, compile, device, dynamic=True)
    per_batch = []  # each batch's (tokens, nats), left on the device: one sync at the end
    with torch.no_grad():
        for batch in tqdm(batches(), desc="evaluating", unit="batch", leave=False, disable=None):
            inputs, targets, positions = batch_to_device(batch, device)
            targets = targets.flatten()
            counted = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # (N,)
            with precision.autocast() if precision else contextlib.nullcontext():
                losses = nats(model, inputs, positions, counted, targets[counted]).float()
            per_batch.append(torch.stack([torch.tensor(len(counted), device=device, dtype=torch.float32),
                                          losses.sum()]))
    model.train(was_training)
    tokens, total = torch.stack(per_batch).cpu().double().sum(0).tolist() if per_batch else (0, 0.0)
    return Score(len(windows), int(tokens), total)


def data_config(base: DataConfig, overrides: list[str], source: str) -> tuple[DataConfig, set[str]]:
    """`base` with `--data.key=value` overrides, strictly checked, and the keys they set."""
    values = parse_overrides(overrides)
    if set(values) - {"data"}:
        raise UserError(f"only --data.key=value settings apply here, not --{next(iter(set(values) - {'data'}))}.*")
    cfg = build_config([({"data": asdict(base)}, source), (values, "the command line")]).data
    return cfg, set(values.get("data", {}))


def load_scored_model(location: str, state: dict | None, device: torch.device
                      ) -> tuple[GPTModel, DataConfig | None, TrainConfig, str]:
    """(model in eval mode, the run's data config or None for GPT-2's weights, its train settings (the
    defaults for GPT-2's weights), what it is); `state` is the run's checkpoint, already read, or None."""
    if state is None:
        cfg = resolve_model_config(ModelConfig(), location, given=())
        return build_model(cfg, location).to(device).eval(), None, TrainConfig(), location
    path = checkpoint_path(location)
    model, config = model_from_state(state, path, device)
    return model, config.data, config.train, str(path)


def scored_windows(data: DataConfig, given: set[str], corpus: str | None, context: int) -> tuple[TokenWindows, str]:
    """The windows to score, prepared if need be, and what they are: all of `corpus`, or the run's val split."""
    if corpus:  # the run's prepared_dir and max_tokens are for its own corpus: only the command line's apply
        prepared = prepare_whole(data, corpus, data.prepared_dir if "prepared_dir" in given else None,
                                 data.max_tokens if "max_tokens" in given else None)
        return load_split(prepared, "whole", context, context), corpus
    windows = load_split(prepare(data), "val", context, context)
    return windows, f"the val split of {data.val_corpus or data.corpus}"


@dataclass
class ChatFigures:
    """What `chat_figures` measures on a chat run, per model: "base" (when there is one), then "fine-tuned"."""

    data: str  # the corpus of the held-out conversations
    conversations: int  # held-out conversations the loss is over
    dtype: torch.dtype  # of the losses and the likelihoods
    context: int  # the model's context_length
    max_new_tokens: int  # the length limit of a greedy reply
    checkpoints: dict[str, str]  # per model: where its weights came from
    loss: dict[str, Score]  # per model: the loss on the held-out replies
    answers: dict[str, Answers]  # per model: its greedy replies to the first `--replies` held-out conversations
    likelihood: dict[str, dict[str, TaskScore]]  # per model and task: every question with choices, ranked
    choices: dict[str, str]  # per task with choices: how many its questions have ("38", "7-22")
    majority: dict[str, tuple[str, int]]  # per task: the train split's commonest answer, right on how many
    # of the replied-to questions
    choice_majority: dict[str, tuple[str, int]]  # the same on the questions with choices
    note: str | None = None  # why there are no base figures, when there are none


def chat_figures(path: Path, device: torch.device, overrides: Sequence[str] = (), replies: int = REPLIES,
                 max_new_tokens: int = REPLY_LIMIT, dtype: str = "comparable", state: dict | None = None
                 ) -> ChatFigures:
    """Loss on the held-out replies, greedy accuracy, ended replies and likelihood accuracy on the questions
    with choices, for the chat run at `path` (a checkpoint file) and for its base (`gpt.chat.scoring`).

    `overrides` are `--data.key=value` settings, `dtype` as `--dtype`; `state` is the checkpoint if it is
    already read. Progress goes to stderr."""
    state = load_checkpoint(path) if state is None else state
    model, config = chat_model_from_state(state, path, device)
    data, _ = data_config(config.data, list(overrides), str(path))
    context = model.cfg.context_length
    with contextlib.redirect_stdout(sys.stderr):
        prepared = prepare_chat(data)
    windows = load_chat_split(prepared, "val", context, data.pack)
    records = held_out(prepared)
    asked = records[:replies]
    tasks = choice_tasks(records, str(prepared / VAL_RECORDS))
    train_answers = read_meta(prepared).get("train_answers", {})
    models = {"fine-tuned": (model, str(path))}
    note = None
    if config.train.init_from == "scratch":
        note = "no base: the run started from scratch"
    else:
        try:
            base = build_model(config.model, config.train.init_from)
            models = {"base": (base.to(device).eval(), config.train.init_from), **models}
        except UserError as e:
            note = f"no base figures: {e}"
    precision = Precision(scoring_dtype(dtype, config.train.dtype, device), device)  # as for text
    # the likelihoods as any task's are scored: an eval batch's tokens a batch, compiled where training is
    scoring = Scoring(Prompts.for_model(chat=True), context, data.batch_size * context, device, precision,
                      config.train.compile)
    ranked = sum(len(task.items) for task in tasks)
    print(f"scoring {', '.join(f'{name} {where}' for name, (_, where) in models.items())} on the "
          f"{windows.conversations:,} held-out conversations of {data.val_corpus or data.corpus}; {len(asked):,} "
          f"replied to (greedy, at most {max_new_tokens} tokens); {ranked:,} questions' choices ranked by "
          f"likelihood; in {dtype_name(precision.dtype)}", file=sys.stderr)
    loss, answers, likelihood = {}, {}, {}
    for name, (m, _) in models.items():
        loss[name] = score_replies(m, windows, data.batch_size * context, device, precision, config.train.compile)
        answers[name] = ask(m, asked, max_new_tokens)
        likelihood[name] = rank_choices(m, tasks, scoring, name)
    with_choices = [r for r in records if "choices" in r]
    return ChatFigures(data.val_corpus or data.corpus, windows.conversations, precision.dtype, context, max_new_tokens,
                       {name: where for name, (_, where) in models.items()}, loss, answers, likelihood,
                       {task.name: choice_counts(task) for task in tasks}, majority(asked, train_answers),
                       majority(with_choices, train_answers), note)


def chat_json(figures: ChatFigures) -> dict:
    """What `--json` prints for a chat run."""
    models = {name: {"checkpoint": figures.checkpoints[name], "reply_loss": figures.loss[name].loss,
                     "reply_tokens": figures.loss[name].tokens, "right": dict(answers.right),
                     "questions": dict(answers.questions), "ended": answers.ended, "replies": answers.asked,
                     "skipped": answers.skipped,
                     "likelihood": {task: scored.figures() for task, scored in figures.likelihood[name].items()}}
              for name, answers in figures.answers.items()}
    tuned = figures.likelihood["fine-tuned"]
    return {"data": figures.data, "conversations": figures.conversations, "max_new_tokens": figures.max_new_tokens,
            "dtype": dtype_name(figures.dtype), **models,
            "majority": {t: {"answer": a, "right": hits} for t, (a, hits) in figures.majority.items()},
            "choice_majority": {t: {"answer": a, "right": hits, "questions": tuned[t].items}
                                for t, (a, hits) in figures.choice_majority.items() if t in tuned}}


def chat_table(figures: ChatFigures) -> list[str]:
    """The lines `python -m gpt evaluate` prints for a chat run: a column per model, then the majority answer.

    Per task: its questions with choices (how many, how many choices, chance), their likelihood acc
    and acc_norm with 95% intervals, then the greedy replies' accuracy on the asked ones."""
    names = list(figures.loss)
    label_width, width = 36, 20

    def row(label: str, cells: list[str], majority: tuple[str, int] | None = None, count: int = 0) -> str:
        line = f"{label:{label_width}}" + "".join(f"{cell:>{width}}" for cell in cells)
        if majority is not None:
            line += f"   {percent(majority[1], count)} ({majority[0]})"
        return line

    def interval(scored: TaskScore, right: int) -> str:
        low, high = scored.interval(right)
        return f"{100 * right / scored.items:.1f}% ({100 * low:.1f}-{100 * high:.1f})"

    tuned = figures.answers["fine-tuned"]
    lines = [row("", names) + "   majority answer",
             row("loss on held-out replies (nats)", [f"{figures.loss[n].loss:.4f}" for n in names]),
             row(f"ended with <|end|> ({tuned.asked} replies)", [percent(figures.answers[n].ended, tuned.asked)
                                                                 for n in names])]
    ranked = figures.likelihood["fine-tuned"]
    for task in [*ranked, *(t for t in tuned.questions if t not in ranked)]:
        if task in ranked:
            first = ranked[task]
            lines.append(f"{task}: {first.items:,} questions, {figures.choices[task]} choices each, chance "
                         f"{100 * first.chance / first.items:.1f}%")
            scores = [figures.likelihood[n][task] for n in names]
            lines.append(row("  likelihood acc (95% interval)", [interval(s, s.right) for s in scores],
                             figures.choice_majority.get(task, ("-", 0)), first.items))
            lines.append(row("  likelihood acc_norm", [interval(s, s.right_norm) for s in scores]))
        else:
            lines.append(f"{task}: no choices")
        asked = tuned.questions.get(task, 0)
        lines.append(row(f"  greedy reply ({asked} asked)", [percent(figures.answers[n].right.get(task, 0), asked)
                                                             for n in names], figures.majority.get(task, ("-", 0)), asked))
    if tuned.skipped:
        lines.append(f"{tuned.skipped} held-out conversation(s) not asked: the system prompt leaves no room for a "
                     f"reply in a context of {figures.context}")
    if figures.note:
        lines.append(figures.note)
    return lines


def evaluate_chat(state: dict, path: Path, args, overrides: list[str], device: torch.device) -> None:
    """Part of `main` for a chat run (its checkpoint `state`, read from `path`): `chat_figures`, printed."""
    if args.corpus:
        raise UserError("--corpus scores text; a chat run is scored on its held-out conversations: leave it out")
    figures = chat_figures(path, device, overrides, args.replies, args.max_new_tokens, args.dtype, state)
    if args.json:
        print(json.dumps(chat_json(figures)))
    else:
        print("\n".join(chat_table(figures)))


def evaluate_task(location: str, args, overrides: list[str], device: torch.device) -> None:
    """Part of `main` with --task: acc and acc_norm of a run, its untrained model or GPT-2's weights
    on a multiple-choice task (`gpt.tools.multiple_choice`)."""
    if args.corpus:
        raise UserError("--corpus and --task are two evaluations: give one of them")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}")
    if is_pretrained_source(location):
        if args.untrained:
            raise UserError(f"--untrained takes a run, whose config says how its model started; {location} is not one")
        model, run_data, run, source = load_scored_model(location, None, device)
        chat = False
    else:
        path = checkpoint_path(location)
        state = load_checkpoint(path)
        chat = bool(state.get("chat_template"))
        if chat:
            check_template(state["chat_template"], path)
        config, source = config_from_dict(state["config"], source=str(path)), str(path)
        if args.untrained:  # as train.py builds it before step 1: seeded, then random or init_from's weights
            seed_everything(config.train.seed)
            model = build_model(config.model, config.train.init_from).to(device).eval()
            source = f"the untrained model of {path} (step 0)"
        else:
            model, config = model_from_state(state, path, device)
        run_data, run = config.data, config.train
    data, _ = data_config(run_data or DataConfig(), overrides, source if run_data else "the defaults")
    with contextlib.redirect_stdout(sys.stderr):  # what preparing the task says: stdout is for the figures
        task = subset(load_task(args.task), args.limit)
    context = model.cfg.context_length
    precision = Precision(scoring_dtype(args.dtype, run.dtype, device), device)
    scoring = Scoring(Prompts.for_model(chat), context, data.batch_size * context, device, precision, run.compile)
    result = score_task(model, task, scoring, announce=(
        f"scoring {source} on {len(task.items):,} items of {task.source}"
        f"{' (the context as a user turn, each ending as the reply)' if chat else ''} in {dtype_name(precision.dtype)}"))
    if args.json:
        print(json.dumps({"checkpoint": source, **result.figures(), "dtype": dtype_name(precision.dtype)}))
    else:
        print(result.line())


def main(argv: list[str] | None = None) -> int:
    """Print the loss, perplexity and bits per byte of a model over a val split or a corpus, or its accuracy on a task."""
    parser = ArgumentParser(prog="python -m gpt evaluate", allow_abbrev=False, description=(
        "Loss, perplexity and bits per byte of a model over every window of its run's val split, or of "
        "any corpus; with --task, its accuracy on a multiple-choice task (HellaSwag, or yours). "
        "--data.key=value overrides the run's data settings (e.g. --data.batch_size=4)."))
    parser.add_argument("--checkpoint", help="run folder (its best.pt, else latest.pt) or checkpoint file "
                        f"(default: the run configs/{DEFAULT_RUN_CONFIG} writes); or GPT-2's weights: gpt2, "
                        "gpt2-medium, gpt2-large, gpt2-xl or a Hugging Face GPT-2 folder")
    parser.add_argument("--corpus", help="score all of this corpus instead (anything data.corpus takes: a file, "
                        "a folder, hf:NAME[:CONFIG] or shakespeare)")
    parser.add_argument("--task", help=f"score a multiple-choice task instead: {HELLASWAG} (downloaded once), "
                        f"{NEXT_WORDS} (made from the built-in corpus) or a JSONL file of "
                        '{"context": ..., "endings": [...], "label": i} lines')
    parser.add_argument("--limit", type=int, help="--task: score a fixed subset of this many items")
    parser.add_argument("--untrained", action="store_true", help="--task: score the run's model as it was "
                        "before its first step (its seed; random weights, or those it started from)")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    parser.add_argument("--replies", type=int, default=REPLIES, help="a chat run: held-out conversations to "
                        "reply to greedily, for accuracy and ended replies (the likelihood ranks every question "
                        "with choices)")
    parser.add_argument("--max-new-tokens", type=int, default=REPLY_LIMIT, help="a chat run: the length limit "
                        "of a reply")
    parser.add_argument("--device", default="auto", help="auto, cpu, mps or cuda[:N]")
    parser.add_argument("--dtype", choices=["comparable", *DTYPES], default="comparable", help=(
        "the precision to score in; comparable (the default): float32 on a CPU, the run's autocast on a GPU"))
    args, overrides = parser.parse_known_args(argv)

    def work() -> None:
        device = pick_device(args.device, option="--device")
        setup_device(device)  # on a CPU, malloc kept from returning the logits' memory every batch
        location = args.checkpoint or default_checkpoint()
        if args.task:
            return evaluate_task(location, args, overrides, device)
        if args.limit is not None or args.untrained:
            raise UserError("--limit and --untrained go with --task")
        if is_pretrained_source(location) and not args.corpus:
            raise UserError(f"{location} is not a run, so it has no val split; give --corpus SOURCE to score")
        state = None if is_pretrained_source(location) else load_checkpoint(checkpoint_path(location))
        if state is not None and state.get("chat_template"):
            return evaluate_chat(state, checkpoint_path(location), args, overrides, device)
        model, run_data, run, source = load_scored_model(location, state, device)
        data, given = data_config(run_data or DataConfig(), overrides, source if run_data else "the defaults")
        context = model.cfg.context_length
        with contextlib.redirect_stdout(sys.stderr):  # what preparation says: stdout is for the figures
            windows, what = scored_windows(data, given, args.corpus, context)
        print(f"scoring {source} on {what}", file=sys.stderr)
        precision = Precision(scoring_dtype(args.dtype, run.dtype, device), device)
        # compiled where the run's training was (train.compile; auto: on CUDA; GPT-2's weights: the default)
        result = score(compile_model(model, run.compile, device), eval_loader(windows, data.batch_size, None),
                       device, precision)
        if args.json:
            print(json.dumps({"checkpoint": source, "data": what, **asdict(result), "loss": result.loss,
                              "perplexity": result.perplexity, "bits_per_byte": result.bits_per_byte,
                              "dtype": dtype_name(precision.dtype)}))
        else:
            print(describe(result, "loss", what, precision.dtype))

    return run_cli(work)


if __name__ == "__main__":
    sys.exit(main())
