"""Chat fine-tuning: records, the template, the loss mask, windows, init_from a run, chat.py, evaluation."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import chat
import train
from gpt.chat.data import ChatWindows, VAL_RECORDS, prepare_chat
from gpt.chat.scoring import ask, before_last_reply, choice_tasks, normalise, rank_choices
from gpt.chat.template import (CHAT_VOCAB_SIZE, END_ID, SPECIAL_IDS, TEMPLATE, conversation_from_record, crop_history,
                               encode_content, load_chat_model, render, render_prompt, reply)
from gpt.checkpoint import build_model, load_checkpoint, resolve_model_config
from gpt.config import DataConfig
from gpt.corpus import shakespeare_chat
from gpt.corpus.shakespeare_chat import excerpt, scenes, title_of
from gpt.data import eval_loader
from gpt.errors import UserError
from gpt.model import GPTModel, IGNORE_INDEX, ModelConfig
from gpt.sampling import SampleConfig, generate
from gpt.tokenizer import EOT_ID
from gpt.tools import evaluate, multiple_choice as mc
from gpt.training import evaluate as training_evaluate

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Two and three?"},
            {"role": "assistant", "content": "Five."}, {"role": "user", "content": "And four and four?"},
            {"role": "assistant", "content": "Eight."}]


def counted_targets(messages: list[dict], window: int = 64) -> list[int]:
    ids, trained = render(messages)
    return [token for token, learn in zip(ids, trained) if learn]


# --------------------------------------------------------------------------- records and template

def test_three_record_shapes_give_the_same_conversation():
    openai = {"messages": MESSAGES[1:3]}
    sharegpt = {"conversations": [{"from": "human", "value": "Two and three?"}, {"from": "gpt", "value": "Five."}]}
    alpaca = {"instruction": "Two and three?", "input": "", "output": "Five."}
    got = [conversation_from_record(r, "x") for r in (openai, sharegpt, alpaca)]
    assert got[0] == got[1] == got[2] == MESSAGES[1:3]
    with_input = conversation_from_record({"instruction": "Add.", "input": "2 3", "output": "5"}, "x")
    assert with_input[0]["content"] == "Add.\n\n2 3"


@pytest.mark.parametrize("record,message", [
    ({"messages": []}, "x line 1 is an empty conversation"),
    ({"messages": [{"role": "assistant", "content": "Hi"}]}, "roles out of order: message 1 is 'assistant'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "roles out of order"),
    ({"messages": [{"role": "bot", "content": "a"}]}, "unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "a"}]}, "has no assistant turn"),
    ({"text": "plain"}, "is not a conversation (its fields: text)"),
])
def test_bad_records_are_named(record, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        conversation_from_record(record, "x line 1")


ASKED = {"messages": [{"role": "user", "content": "Which play?"}, {"role": "assistant", "content": "Hamlet"}],
         "answer": "Hamlet"}


@pytest.mark.parametrize("fields,message", [
    ({"choices": "Hamlet, Macbeth"}, "x line 1: \"choices\" must be a list of at least 2 non-empty texts, the candidate "
                                     "answers; got 'Hamlet, Macbeth'"),
    ({"choices": ["Hamlet"]}, "must be a list of at least 2 non-empty texts"),
    ({"choices": ["Hamlet", 3]}, "must be a list of at least 2 non-empty texts"),
    ({"choices": ["Hamlet", " "]}, "must be a list of at least 2 non-empty texts"),
    ({"choices": ["Hamlet", "Macbeth", "Hamlet "]}, "x line 1: \"choices\" holds 'Hamlet' twice; give each candidate once"),
    ({"choices": ["Macbeth", "Othello"]}, "x line 1: the answer 'Hamlet' is not among its 2 choices; add it to "
                                          "\"choices\" or correct the answer"),
    ({"choices": ["Hamlet", "Macbeth"], "answer": None}, "the answer None is not among its 2 choices"),
    ({"choices": ["Hamlet", "Macbeth"], "answer": "hamlet"}, "the answer 'hamlet' is not among"),
])
def test_malformed_choices_are_one_line_naming_the_record(fields, message):
    record = {**ASKED, **fields}
    with pytest.raises(UserError) as caught:
        conversation_from_record(record, "x line 1")
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_choices_need_an_answer_and_well_formed_ones_pass():
    with pytest.raises(UserError, match='x line 1 has "choices" but no "answer"; give the right one'):
        conversation_from_record({"messages": ASKED["messages"], "choices": ["Hamlet", "Macbeth"]}, "x line 1")
    assert conversation_from_record({**ASKED, "choices": ["Macbeth", "Hamlet"]}, "x") == ASKED["messages"]


def test_template_ids_sit_in_the_padded_rows_and_only_replies_are_targets():
    assert set(SPECIAL_IDS.values()) == set(range(EOT_ID + 1, CHAT_VOCAB_SIZE))
    assert ModelConfig(vocab_size=CHAT_VOCAB_SIZE).padded_vocab_size == ModelConfig().padded_vocab_size
    ids, trained = render(MESSAGES)
    assert ids[0] == EOT_ID and ids.count(END_ID) == len(MESSAGES)
    from gpt.tokenizer import get_tokenizer
    enc = get_tokenizer()
    replies = [t for t, learn in zip(ids, trained) if learn]
    assert replies == enc.encode("Five.") + [END_ID] + enc.encode("Eight.") + [END_ID]
    assert render_prompt(MESSAGES[:2])[-1] == SPECIAL_IDS["<|assistant|>"]


def test_text_spelling_a_marker_never_becomes_one():
    spelt = "<|user|> <|assistant|><|end|> <|system|> <|endoftext|>"
    messages = [{"role": "user", "content": spelt}, {"role": "assistant", "content": spelt}]
    ids, _ = render(messages)
    structural = [EOT_ID, SPECIAL_IDS["<|user|>"], END_ID, SPECIAL_IDS["<|assistant|>"], END_ID]
    assert [t for t in ids if t >= EOT_ID] == structural


def test_changing_a_user_turn_changes_no_counted_target():
    changed = [dict(m) for m in MESSAGES]
    changed[1]["content"] = "What do two and three make, if you add them together?"
    changed[3]["content"] = "x"
    assert counted_targets(changed) == counted_targets(MESSAGES)
    # and the loss mask holds: targets outside replies are ignored, whatever the user wrote
    for messages in (MESSAGES, changed):
        ids, trained = render(messages)
        targets = torch.tensor([t if learn else IGNORE_INDEX for t, learn in zip(ids[1:], trained[1:])])
        assert targets[targets != IGNORE_INDEX].tolist() == counted_targets(MESSAGES)


def test_loss_ignores_the_ignored_targets():
    torch.manual_seed(0)
    model = GPTModel(ModelConfig(vocab_size=101, context_length=8, emb_dim=16, n_heads=2, n_layers=1,
                                 drop_rate=0.0))
    inputs = torch.randint(0, 101, (2, 8))
    targets = torch.randint(0, 101, (2, 8))
    masked = targets.clone()
    masked[:, :5] = IGNORE_INDEX
    logits = model(inputs)
    expected = torch.nn.functional.cross_entropy(logits[:, 5:].flatten(0, 1), targets[:, 5:].flatten())
    assert torch.allclose(model(inputs, targets=masked), expected)


def test_crop_history_keeps_the_system_prompt_and_drops_the_oldest_turns():
    history = MESSAGES + [{"role": "user", "content": "And one more?"}]
    full = len(render_prompt(history))
    kept, dropped = crop_history(history, full)
    assert kept == history and dropped == 0
    kept, dropped = crop_history(history, full - 1)
    assert kept[0] == MESSAGES[0] and kept[1:] == history[3:] and dropped == 2
    kept, _ = crop_history(history, len(render_prompt([MESSAGES[0], history[-1]])) - 1)
    assert kept[0] == MESSAGES[0] and len(kept) == 2 and kept[1]["content"] != history[-1]["content"]
    with pytest.raises(UserError, match="system prompt"):
        crop_history(history, 4)


# --------------------------------------------------------------------------- the offline data set

PLAY = """Hamlet

ACT I

SCENE I. Elsinore.

[Enter BERNARDO and FRANCISCO]

BERNARDO:
Who's there?

FRANCISCO:
Nay, answer me: stand, and unfold yourself.
[Exit]

SCENE II. A room.

HAMLET:
A little more than kin, and less than kind.
"""


def test_plays_become_scenes_of_speeches():
    found = scenes(PLAY)
    assert found == [[("BERNARDO", "Who's there?"), ("FRANCISCO", "Nay, answer me: stand, and unfold yourself.")],
                     [("HAMLET", "A little more than kin, and less than kind.")]]
    assert title_of("x/hamlet.md", PLAY) == "Hamlet"
    assert title_of("plays/problems/measure-for-measure.md", "ACT I\n") == "Measure for Measure"
    assert excerpt("one two\nthree\nfour\nfive") == "one two\nthree\nfour"


def speeches(*pairs: tuple[str, str]) -> str:
    return "".join(f"{speaker}:\n{text}\n\n" for speaker, text in pairs)


# Two short plays: in Macbeth, "Messenger" is no named character and MACBETH speaks once too few
HAMLET = "Hamlet\n\nACT I\n\nSCENE I. Elsinore.\n\n" + speeches(
    ("BERNARDO", "Who is there upon the platform this cold night?"),
    ("FRANCISCO", "Nay, answer me: stand, and unfold yourself now."),
    ("HAMLET", "A little more than kin, and less than kind, I think."),
    ("BERNARDO", "Long live the king, and all his noble house."))
MACBETH = "ACT I\n\nSCENE I. A heath.\n\n" + speeches(
    ("LADY MACBETH", "Glamis thou art, and Cawdor, and shalt be what thou art promised."),
    ("Messenger", "The king comes here to-night, my gracious lady."),
    ("LADY MACBETH", "Thou'rt mad to say it: is not thy master with him?"),
    ("MACBETH", "My dearest love, Duncan comes here to-night, they say."),
    ("BANQUO", "What are these, so wither'd and so wild in their attire?"),
    ("BANQUO", "Good sir, why do you start, and seem to fear things that do sound so fair?"))


def test_play_questions_offer_every_title_and_speaker_questions_the_play_s_characters(monkeypatch):
    monkeypatch.setattr(shakespeare_chat, "shakespeare_documents",
                        lambda: [("plays/hamlet.md", HAMLET), ("plays/tragedies/macbeth.md", MACBETH)])
    monkeypatch.setattr(shakespeare_chat, "MIN_SPEECHES", 2)
    records = shakespeare_chat.conversations()
    plays = [r for r in records if r["task"] == "play"]
    speakers = [r for r in records if r["task"] == "speaker"]
    assert len(plays) == 10 and all(r["choices"] == ["Hamlet", "Macbeth"] for r in plays)
    # the characters with 2 speeches or more in their own play, in capitals; Hamlet has one, so no choice
    assert sorted((r["answer"], tuple(r.get("choices", ()))) for r in speakers) == [
        ("BANQUO", ("BANQUO", "LADY MACBETH")), ("BANQUO", ("BANQUO", "LADY MACBETH")),
        ("BERNARDO", ()), ("BERNARDO", ()),
        ("LADY MACBETH", ("BANQUO", "LADY MACBETH")), ("LADY MACBETH", ("BANQUO", "LADY MACBETH"))]
    for record in records:  # each passes the check that preparation makes
        conversation_from_record(record, "x")


@pytest.mark.slow
def test_every_checkable_shakespeare_question_has_its_answer_among_its_play_s_choices():
    """The real corpus (~8 s): 38 titles for each play question, that play's own characters for each speaker one."""
    speakers = {shakespeare_chat.title_of(name, text): {s for scene in scenes(text) for s, _ in scene}
                for name, text in shakespeare_chat.shakespeare_documents()}
    records = shakespeare_chat.conversations()
    checked = [r for r in records if "answer" in r]
    assert len(checked) > 40_000 and all(r["answer"] in r["choices"] for r in checked)
    assert all(r["choices"] == sorted(speakers) for r in checked if r["task"] == "play") and len(speakers) == 38
    for record in (r for r in checked if r["task"] == "speaker"):
        title = record["messages"][0]["content"].split("?")[0].removeprefix("Who says this in ")
        assert set(record["choices"]) <= speakers[title] and len(record["choices"]) >= 7


# --------------------------------------------------------------------------- windows

def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_windows_hold_one_conversation_and_count_cut_and_dropped(tmp_path):
    short = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    long_reply = {"messages": [{"role": "user", "content": "Tell"}, {"role": "assistant", "content": "word " * 40}]}
    long_prompt = {"messages": [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "Ok"}]}
    corpus = write_jsonl(tmp_path / "chat.jsonl", [short, long_reply, long_prompt] * 4 + [short])
    prepared = prepare_chat(DataConfig(format="chat", corpus=str(corpus), prepared_dir=str(tmp_path / "p"),
                                       val_fraction=0.1))
    windows = ChatWindows(prepared, "train", 16)
    assert (len(windows), windows.cut, windows.dropped) == (8, 4, 4)
    inputs, targets = windows[0]
    ids, trained = render(short["messages"])
    # its inputs are all its tokens but the last (only a target), then padding, not another conversation
    assert inputs[:len(ids) - 1].tolist() == ids[:-1] and (inputs[len(ids) - 1:] == EOT_ID).all()
    assert targets[:len(ids) - 1].tolist() == [t if learn else IGNORE_INDEX for t, learn in zip(ids[1:], trained[1:])]
    assert (targets[len(ids) - 1:] == IGNORE_INDEX).all()


def test_val_records_keep_their_choices_and_older_prepared_files_are_prepared_again(tmp_path, capsys):
    records = [{**ASKED, "task": "play", "choices": ["Hamlet", "Macbeth"]}] * 10
    cfg = DataConfig(format="chat", corpus=str(write_jsonl(tmp_path / "chat.jsonl", records)),
                     prepared_dir=str(tmp_path / "p"), val_fraction=0.2)
    prepared = prepare_chat(cfg)
    kept = [json.loads(line) for line in (prepared / VAL_RECORDS).read_text().splitlines()]
    assert kept == [{"messages": ASKED["messages"], "task": "play", "answer": "Hamlet",
                     "choices": ["Hamlet", "Macbeth"]}] * 2
    meta = json.loads((prepared / "meta.json").read_text())
    del meta["val_fields"]  # as a version that kept no choices in val.jsonl wrote it
    (prepared / "meta.json").write_text(json.dumps(meta))
    capsys.readouterr()
    prepare_chat(cfg)
    assert "made from other data or settings; preparing again" in capsys.readouterr().out
    prepare_chat(cfg)
    assert "preparing again" not in capsys.readouterr().out


def test_a_padded_last_batch_of_conversations_leaves_the_reply_loss_as_it_is(tmp_path, monkeypatch):
    records = [{"messages": [{"role": "user", "content": f"Count to {n}"},
                             {"role": "assistant", "content": " ".join(map(str, range(1, n + 1)))}]} for n in range(1, 9)]
    prepared = prepare_chat(DataConfig(format="chat", corpus=str(write_jsonl(tmp_path / "chat.jsonl", records)),
                                       prepared_dir=str(tmp_path / "p"), val_fraction=0.1))
    windows = ChatWindows(prepared, "train", 24)  # 7 conversations: batches of 3, 3 and 1 (padded to 3)
    torch.manual_seed(0)
    model = GPTModel(ModelConfig(vocab_size=CHAT_VOCAB_SIZE, context_length=24, emb_dim=16, n_heads=2, n_layers=1,
                                 drop_rate=0.0)).eval()
    loader = eval_loader(windows, 3, None)
    scored = evaluate.score(model, loader, torch.device("cpu"))
    x, y = (torch.stack(part).long() for part in zip(*(windows[i] for i in range(len(windows)))))
    with torch.no_grad():  # unpadded: every conversation at once, the sum over its replies' targets
        nats = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum")
    assert len(windows) == 7 and all(inputs.shape == (3, 24) for inputs, _ in loader)
    assert (scored.windows, scored.tokens) == (7, int((y != IGNORE_INDEX).sum()))  # padding rows: no window, no target
    assert scored.loss == pytest.approx(nats.item() / scored.tokens, rel=1e-6)  # float32 on the CPU
    assert training_evaluate(model, loader, torch.device("cpu")) == pytest.approx(scored.loss, rel=1e-6)
    # the chat evaluation's: the head only where a target counts, the same sums; packed windows too
    for pack, budget in ((False, 30), (True, 30), (True, 1)):  # batches of several windows; of one each
        windows = ChatWindows(prepared, "train", 24, pack)
        whole = evaluate.score(model, eval_loader(windows, 3, None), torch.device("cpu"))
        replies = evaluate.score_replies(model, windows, budget, torch.device("cpu"))
        assert (replies.windows, replies.tokens) == (whole.windows, whole.tokens) == (len(windows), scored.tokens)
        assert replies.loss == pytest.approx(whole.loss, rel=1e-6)
    assert len(windows) < 7 and not model.training  # packed: fewer windows
    # compiled where training compiles (Dynamo's tracing alone here): one graph for every batch, no break
    from torch._dynamo.utils import counters
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend="eager", **kw))
    torch._dynamo.reset()
    counters.clear()
    compiled = evaluate.score_replies(model, windows, 30, torch.device("cpu"), compile=True)
    assert 1 <= counters["stats"]["unique_graphs"] <= 2 and not counters["graph_break"]
    torch._dynamo.reset()
    assert compiled.tokens == replies.tokens and compiled.loss == pytest.approx(replies.loss, rel=1e-6)


def test_greedy_replies_asked_as_one_batch_are_those_asked_one_at_a_time():
    """`ask` decodes every conversation in one batch; `reply`, one at a time, gives the same replies (float32):
    cropped histories, replies that end with <|end|>, that stop at <|endoftext|>, that run to the limit."""
    torch.manual_seed(0)
    model = GPTModel(ModelConfig(vocab_size=CHAT_VOCAB_SIZE, context_length=64, emb_dim=16, n_heads=2, n_layers=1,
                                 drop_rate=0.0)).eval()
    with torch.no_grad():  # larger weights than the init's, and the two ends made likely: replies of every kind
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.3)
        direction = model.final_norm.bias.normal_(0.0, 1.0)  # every position's logits move along it
        model.tok_emb.weight[END_ID] += 0.3 * direction  # the tied head's rows: <|end|> and <|endoftext|> likelier
        model.tok_emb.weight[EOT_ID] += 0.42 * direction
    say = [[{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]
           for w in ("yes", "no", "maybe so", "café", "the king is dead")]
    long = [{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "x"}]  # cropped to fit
    too_long = [{"role": "system", "content": "rule " * 80}, *say[0]]  # no room for a reply: skipped
    conversations = [MESSAGES[1:3], MESSAGES, long, too_long, *say]
    greedy = SampleConfig(temperature=0.0, max_new_tokens=12)
    alone = []
    for messages in conversations:
        try:
            alone.append(reply(model, before_last_reply(messages), greedy, torch.device("cpu")))
        except UserError:
            alone.append(None)
    assert alone[3] is None and {len(r[2]) for r in alone if r} >= {0, 3, 12} and sum(r[1] for r in alone if r) >= 3
    # each checkable record's answer is the reply given alone, but one's: all right but that one, if the texts agree
    records = [{"messages": m, "task": "t", "answer": r[0] if r and k != 1 else "not it"} if k % 3 != 2
               else {"messages": m} for k, (m, r) in enumerate(zip(conversations, alone))]
    answers = ask(model, records, 12)
    assert (answers.asked, answers.skipped) == (len(conversations) - 1, 1)
    assert answers.ended == sum(r[1] for r in alone if r)
    checkable = [k for k, r in enumerate(records) if "answer" in r and alone[k]]
    assert answers.questions["t"] == len(checkable)
    assert answers.right["t"] == sum(normalise(records[k]["answer"]) == normalise(alone[k][0]) for k in checkable)
    assert answers.right["t"] == len(checkable) - 1


# --------------------------------------------------------------------------- likelihood of the choices

def reply_nats(model: GPTModel, history: list[dict], reply_text: str) -> tuple[float, int]:
    """The summed next-token loss of `reply_text` and <|end|> as the reply to `history`, and its token count:
    the whole rendered conversation through the model at once, in float32."""
    prompt = render_prompt(history)
    ids = prompt + encode_content(reply_text) + [END_ID]
    n = len(ids) - len(prompt)
    with torch.no_grad():
        logprobs = model(torch.tensor([ids[:-1]])).float().log_softmax(-1)[0, -n:]  # (n, V): the reply's tokens
    return -logprobs.gather(1, torch.tensor(ids[-n:])[:, None]).sum().item(), n


def test_choices_are_ranked_by_their_likelihood_after_the_whole_conversation():
    torch.manual_seed(0)
    model = GPTModel(ModelConfig(vocab_size=CHAT_VOCAB_SIZE, context_length=64, emb_dim=16, n_heads=2, n_layers=1,
                                 drop_rate=0.0)).eval()
    choices = ["Eight.", "Nine", "Seven and a half", "Sixteen, or so they say"]
    conversations = [MESSAGES, MESSAGES[1:3], [MESSAGES[0], *MESSAGES[3:]]]  # with a system prompt, earlier turns
    direct = [[reply_nats(model, before_last_reply(m), c) for c in choices] for m in conversations]
    def argmin(values):
        return min(range(len(values)), key=values.__getitem__)
    best = [argmin([nats for nats, _ in d]) for d in direct]
    best_norm = [argmin([nats / n for nats, n in d]) for d in direct]
    worst = [max(range(len(choices)), key=lambda k, d=d: d[k][0]) for d in direct]
    records = [{"messages": m, "task": task, "answer": choices[k], "choices": choices}
               for task, labels in (("best", best), ("norm", best_norm), ("worst", worst))
               for m, k in zip(conversations, labels)]
    records.insert(1, {"messages": MESSAGES, "task": "best", "answer": "Eight."})  # no choices: not ranked
    tasks = choice_tasks(records, "val.jsonl")
    assert [t.name for t in tasks] == ["best", "norm", "worst"] and [len(t.items) for t in tasks] == [3, 3, 3]
    assert tasks[0].items[1].where == "val.jsonl line 3" and tasks[0].items[0].context == tuple(MESSAGES[:4])

    scoring = mc.Scoring(mc.Prompts.for_model(chat=True), 64, 3 * 64, torch.device("cpu"))  # several batches
    rows = [mc.item_rows(item, scoring.prompts, 64) for item in tasks[0].items]
    for summed, expected in zip(mc.ending_losses(model, rows, scoring), direct):  # float32 on the CPU
        assert summed[:, 0].tolist() == pytest.approx([nats for nats, _ in expected], rel=1e-5)
        assert summed[:, 1].tolist() == [n for _, n in expected]
    scores = rank_choices(model, tasks, scoring)
    assert (scores["best"].acc, scores["norm"].acc_norm, scores["worst"].acc) == (1.0, 1.0, 0.0)
    assert scores["best"].chance / scores["best"].items == pytest.approx(1 / len(choices))


# --------------------------------------------------------------------------- runs: init_from, resume, chat, evaluate

# The tests below share two tiny training runs (~15 s on a shared 2-core CPU): marked slow.
@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> SimpleNamespace:
    """A tiny text run, and a chat run fine-tuned from it on a small JSONL of conversations."""
    root = tmp_path_factory.mktemp("chat")
    records = [{"messages": [{"role": "user", "content": f"Add {a} and {b}."},
                             {"role": "assistant", "content": str(a + b)}], "task": "sum", "answer": str(a + b),
                "choices": [str(n) for n in range(19)]} for a in range(10) for b in range(10)]
    corpus = write_jsonl(root / "sums.jsonl", records)
    base, tuned = root / "base", root / "tuned"
    common = ["--config", "tiny.yaml", "--train.max_iters=2", "--sample.max_new_tokens=2",
              "--train.dtype=float32"]  # float32: the tests compare numbers
    assert train.main([*common, f"--train.out_dir={base}"]) == 0
    chat_args = [*common, f"--train.init_from={base}", "--data.format=chat", f"--data.corpus={corpus}",
                 f"--data.prepared_dir={root / 'prepared'}", "--data.val_fraction=0.2"]
    assert train.main([*chat_args, f"--train.out_dir={tuned}"]) == 0
    return SimpleNamespace(root=root, base=base, tuned=tuned, corpus=corpus, chat_args=chat_args)


@pytest.mark.slow
def test_init_from_a_run_keeps_its_weights_and_adds_the_template_rows(runs):
    base_state = load_checkpoint(runs.base / "best.pt")["model"]
    cfg = resolve_model_config(ModelConfig(), str(runs.base), given=())
    assert cfg.emb_dim == 32 and cfg.vocab_size == EOT_ID + 1
    start = build_model(ModelConfig(**{**cfg.__dict__, "vocab_size": CHAT_VOCAB_SIZE}), str(runs.base)).state_dict()
    old = base_state["tok_emb.weight"]
    assert torch.equal(start["tok_emb.weight"][:EOT_ID + 1], old[:EOT_ID + 1])
    assert torch.allclose(start["tok_emb.weight"][EOT_ID + 1:CHAT_VOCAB_SIZE], old[:EOT_ID + 1].mean(0).expand(4, -1))
    assert torch.equal(start["trf_blocks.0.ff.fc.weight"], base_state["trf_blocks.0.ff.fc.weight"])
    tuned = load_checkpoint(runs.tuned / "latest.pt")
    assert tuned["chat_template"] == TEMPLATE and tuned["config"]["model"]["vocab_size"] == CHAT_VOCAB_SIZE


@pytest.mark.slow
def test_resume_with_another_template_is_refused(runs, capsys):
    assert train.main([*runs.chat_args, f"--train.out_dir={runs.tuned}", "--resume", "--train.max_iters=3",
                       "--data.format=text"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "chat template 'gpt-chat-1'" in err and "asks for none (a text run)" in err
    assert train.main(["--config", "tiny.yaml", f"--train.out_dir={runs.base}", "--resume", "--train.max_iters=3",
                       "--data.format=chat", f"--data.corpus={runs.corpus}"]) == 2
    assert "chat template none (a text run)" in capsys.readouterr().err


@pytest.mark.slow
def test_greedy_chat_reply_equals_generate(runs):
    model, _ = load_chat_model(str(runs.tuned), "cpu")[:2]
    history = [{"role": "user", "content": "Add 2 and 3."}]
    cfg = SampleConfig(temperature=0.0, max_new_tokens=6)
    _, ended, ids = reply(model, history, cfg, torch.device("cpu"))
    prompt = torch.tensor([render_prompt(history)])
    expected = generate(model, prompt, 6, temperature=0.0, eos_id=END_ID)[0, prompt.shape[1]:].tolist()
    cut = expected.index(END_ID) + 1 if END_ID in expected else len(expected)
    assert ids == [t for t in expected[:cut]] and ended == (END_ID in expected)
    pieces = []  # streamed: the text arrives token by token, before the reply is returned
    text, _, _ = reply(model, history, cfg, torch.device("cpu"), write=pieces.append)
    assert "".join(pieces) == text
    if text.isascii():  # one piece per token (a character split over tokens waits for its end)
        assert len(pieces) == len([t for t in ids if t < EOT_ID])


@pytest.mark.slow
def test_chat_command_one_shot_and_clean_exits(runs, capsys, monkeypatch):
    assert chat.main(["--checkpoint", str(runs.tuned), "--prompt", "Add 1 and 1.", "--max-new-tokens", "3",
                      "--temperature", "0"]) == 0
    assert capsys.readouterr().out.endswith("\n")
    for ending in (EOFError, KeyboardInterrupt):
        answers = iter(["Add 1 and 2.", ending])

        def fake_input(prompt, answers=answers):
            item = next(answers)
            if isinstance(item, type):
                raise item
            return item
        monkeypatch.setattr("builtins.input", fake_input)
        assert chat.main(["--checkpoint", str(runs.tuned), "--max-new-tokens", "2"]) == 0
    capsys.readouterr()
    assert chat.main(["--checkpoint", str(runs.base), "--prompt", "Hi"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "was never chat-tuned" in err


@pytest.mark.slow
def test_evaluate_reports_loss_accuracy_and_ended_for_base_and_tuned(runs, capsys):
    assert evaluate.main(["--checkpoint", str(runs.tuned), "--json", "--replies", "5", "--max-new-tokens", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    for name in ("base", "fine-tuned"):
        assert report[name]["reply_loss"] > 0 and report[name]["replies"] == 5
        assert report[name]["questions"] == {"sum": 5} and 0 <= report[name]["right"].get("sum", 0) <= 5
        assert 0 <= report[name]["ended"] <= 5
    assert report["base"]["reply_loss"] != report["fine-tuned"]["reply_loss"]  # two models, not one twice
    assert report["majority"]["sum"]["answer"].isdigit()
    # the likelihood: every held-out question (20 at val_fraction 0.2), not the 5 replied to
    for name in ("base", "fine-tuned"):
        ranked = report[name]["likelihood"]["sum"]
        assert ranked["items"] == 20 and ranked["chance"] == pytest.approx(1 / 19)
        assert ranked["acc_interval"][0] <= ranked["acc"] <= ranked["acc_interval"][1]
    assert report["choice_majority"]["sum"]["questions"] == 20


@pytest.mark.slow
def test_evaluate_prints_the_likelihood_beside_greedy_and_majority_per_task(runs, capsys):
    assert evaluate.main(["--checkpoint", str(runs.tuned), "--replies", "5", "--max-new-tokens", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["base", "fine-tuned", "majority", "answer"]
    assert "sum: 20 questions, 19 choices each, chance 5.3%" in lines
    rows = {line.split("  ")[1].strip() if line.startswith("  ") else line: line for line in lines}
    percent = r"\d+\.\d%"
    interval = rf"{percent} \(\d+\.\d-\d+\.\d\)"
    assert re.fullmatch(rf"  likelihood acc \(95% interval\) +{interval} +{interval} +{percent} \(\d+\)",
                        rows["likelihood acc (95% interval)"])
    assert re.fullmatch(rf"  likelihood acc_norm +{interval} +{interval}", rows["likelihood acc_norm"])
    assert re.fullmatch(rf"  greedy reply \(5 asked\) +{percent} +{percent} +{percent} \(\d+\)",
                        rows["greedy reply (5 asked)"])


@pytest.mark.slow
def test_export_carries_the_template_and_its_tokens(runs, tmp_path):
    transformers = pytest.importorskip("transformers")
    from gpt.gpt2.export import export_run
    export_run(runs.tuned, tmp_path / "hf", overwrite=False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = tokenizer.apply_chat_template(MESSAGES[:4], tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert ids == render_prompt(MESSAGES[:4])
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ours = load_chat_model(str(runs.tuned), "cpu")[0]
    x = torch.tensor([ids])
    with torch.no_grad():
        assert (ours(x)[..., :CHAT_VOCAB_SIZE] - theirs(x).logits).abs().max() < 1e-4
    assert theirs.config.eos_token_id == END_ID


@pytest.mark.parametrize("kind", ["parquet", "hf"])
def test_conversations_come_from_parquet_and_hugging_face_datasets(kind, tmp_path):
    records = [{"conversations": [{"from": "human", "value": f"Say {i}."}, {"from": "gpt", "value": str(i)}]}
               for i in range(10)]
    if kind == "parquet":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(records), tmp_path / "chats.parquet")
        corpus = str(tmp_path / "chats.parquet")
    else:
        pytest.importorskip("datasets")
        folder = tmp_path / "dataset"
        folder.mkdir()
        write_jsonl(folder / "train.jsonl", records)
        corpus = f"hf:{folder}"
    prepared = prepare_chat(DataConfig(format="chat", corpus=corpus, prepared_dir=str(tmp_path / "p"),
                                       val_fraction=0.2))
    windows = ChatWindows(prepared, "train", 32)
    assert len(windows) == 8 and len(ChatWindows(prepared, "val", 32)) == 2
    ids, _ = render(conversation_from_record(records[0], "x"))
    assert windows[0][0][:len(ids) - 1].tolist() == ids[:-1]  # its last token is only a target


def test_a_run_with_another_template_or_none_is_refused():
    from gpt.chat.template import check_template
    check_template(dict(TEMPLATE), "run")  # this version's: accepted
    with pytest.raises(UserError, match="template 'gpt-chat-0' and this version uses 'gpt-chat-1'"):
        check_template({**TEMPLATE, "name": "gpt-chat-0"}, "run")
    with pytest.raises(UserError, match="template 'gpt-chat-1' and this version uses"):
        check_template({**TEMPLATE, "tokens": {**TEMPLATE["tokens"], "<|end|>": 50261}}, "run")  # same name, edited
    with pytest.raises(UserError, match="never chat-tuned"):
        check_template(None, "run")
