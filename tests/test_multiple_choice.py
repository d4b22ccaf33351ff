"""Multiple-choice tasks (gpt.tools.multiple_choice, gpt.tools.next_words): reading, scoring, the command, the loop."""

from dataclasses import asdict
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train
from gpt.checkpoint import build_model, resolve_model_config, save_checkpoint
from gpt.config import Config, DataConfig, TrainConfig, load_config
from gpt.errors import UserError
from gpt.metrics import read_metrics
from gpt.model import GPTModel, ModelConfig
from gpt.tokenizer import get_tokenizer
from gpt.tools import evaluate, multiple_choice as mc, next_words
from gpt.tools.multiple_choice import Item, Prompts, Task, TaskScore

CPU = torch.device("cpu")
ITEMS = [  # any number of endings; HellaSwag's own field names too
    {"context": "The fox ran into the", "endings": ["woods.", "sky, café!", "river and swam"], "label": 0},
    {"ctx": "A man is sitting on a roof. He", "endings": ["starts pulling up roofing.", "is a cube.",
                                                          "eats the sun.", "is 日本 blue."], "label": "0"},
    {"context": "To be or not to be:\n", "endings": ["that is the question.", "what a fox"], "label": 0},
    {"context": "Numbers: one, two,", "endings": ["three", "blue", "seven cats", "ten", "a very long ending of words"],
     "label": 0},
]


def write_items(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), encoding="utf-8")
    return path


@pytest.fixture
def items_file(tmp_path) -> Path:
    return write_items(tmp_path / "items.jsonl", ITEMS)


def test_items_in_either_format_and_chance_from_their_endings(items_file):
    task = mc.load_task(str(items_file))
    assert task.name == "items" and len(task.items) == 4
    assert task.items[1] == Item("A man is sitting on a roof. He", tuple(ITEMS[1]["endings"]), 0)
    assert task.chance == pytest.approx((1 / 3 + 1 / 4 + 1 / 2 + 1 / 5) / 4)


@pytest.mark.parametrize("line, message", [
    ("not json", "line 2 is not JSON"),
    ('["a"]', "line 2 is not a JSON object"),
    ('{"endings": ["a", "b"], "label": 0}', "line 2 has no context"),
    ('{"context": "x", "endings": ["a"], "label": 0}', "at least 2 non-empty texts"),
    ('{"context": "x", "endings": ["a", "b"], "label": 2}', '"label" must be the index of the right ending, 0 to 1'),
    ('{"context": "x", "endings": ["a", "b"], "label": true}', "got True"),
])
def test_a_bad_line_is_one_error_naming_it_and_nothing_is_written(tmp_path, line, message, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ITEMS[0]) + "\n" + line + "\n", encoding="utf-8")
    torch.manual_seed(0)
    cfg = Config(model=ModelConfig(context_length=32, emb_dim=16, n_heads=2, n_layers=1))
    save_checkpoint(tmp_path / "run.pt", {"model": GPTModel(cfg.model).state_dict(), "config": asdict(cfg)})
    before = sorted(tmp_path.iterdir())
    assert evaluate.main(["--checkpoint", str(tmp_path / "run.pt"), "--task", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path} line 2") and message in err and "\n" not in err
    assert sorted(tmp_path.iterdir()) == before
    # in a training run: refused before the run folder exists
    out = tmp_path / "runs" / "x"
    assert train.main(["--config", "tiny.yaml", f"--train.out_dir={out}", f"--train.eval_tasks=[{path}]"]) == 2
    assert "line 2" in capsys.readouterr().err and not out.exists()


def test_the_interval_is_wilson_s():
    lo, hi = TaskScore("t", items=100, right=30).interval(30)
    assert (round(lo, 4), round(hi, 4)) == (0.2189, 0.3958)  # the textbook 95% Wilson interval of 30/100
    lo, hi = TaskScore("t", items=10, right=0).interval(0)
    assert lo == pytest.approx(0, abs=1e-12) and 0.27 < hi < 0.28  # never below 0, unlike p +- 1.96 sd


def test_the_ending_joins_its_context_with_one_space_and_rows_fit_the_context():
    enc = get_tokenizer()
    text = Prompts.for_model(chat=False)
    (ids, kept), = mc.item_rows(Item("He said", ("hello",), 0), text, 64)
    assert ids == enc.encode_ordinary("He said") + enc.encode_ordinary(" hello") and kept == 2
    (ids, kept), = mc.item_rows(Item("Line one\n", ("Line two",), 0), text, 64)
    assert enc.decode(ids) == "Line one\nLine two"
    long = Item("word " * 100, ("the end",), 0)
    (ids, kept), = mc.item_rows(long, text, 16)  # the context loses its first tokens
    assert len(ids) == 17 and ids[kept:] == enc.encode_ordinary("the end")  # the context ends in a space
    with pytest.raises(UserError, match="an item: ending 0 is 20 tokens"):
        mc.item_rows(Item("x", (" a" * 20,), 0), text, 16)


def test_a_chat_run_is_asked_the_context_and_answers_with_each_ending_and_its_end():
    from gpt.chat.template import END_ID, encode_content, render_prompt
    rows = mc.item_rows(Item("Which play?", ("Hamlet", "Henry IV"), 0), Prompts.for_model(chat=True), 64)
    prompt = render_prompt([{"role": "user", "content": "Which play?"}])
    assert rows[1] == (prompt + encode_content("Henry IV") + [END_ID], len(prompt))
    # a whole conversation as the context: the system prompt and earlier turns rendered before the reply
    history = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Which play?"})
    rows = mc.item_rows(Item(history, ("Hamlet", "Henry IV"), 0), Prompts.for_model(chat=True), 64)
    prompt = render_prompt(list(history))
    assert rows[0] == (prompt + encode_content("Hamlet") + [END_ID], len(prompt))


def reference_losses(logits_of, items: list[Item], prompts: Prompts, context: int) -> list[list[float]]:
    """Each ending's summed loss, one row at a time through `logits_of` (no batch, no padding)."""
    result = []
    for item in items:
        sums = []
        for ids, kept in mc.item_rows(item, prompts, context):
            ids = torch.tensor([ids])
            with torch.no_grad():
                logits = logits_of(ids[:, :-1])[0]
            sums.append(F.cross_entropy(logits[kept - 1:].float(), ids[0, kept:], reduction="sum").item())
        result.append(sums)
    return result


def test_per_ending_losses_equal_transformers_gpt2_on_the_same_weights(hf_gpt2_vocab, items_file):
    """float32: our model loaded from a random GPT-2 folder against transformers' GPT2LMHeadModel."""
    hf_model, folder = hf_gpt2_vocab  # full vocabulary, 64 positions
    model, _, _, _ = evaluate.load_scored_model(str(folder), None, CPU)
    task = mc.load_task(str(items_file))
    prompts = Prompts.for_model(chat=False)
    ours = mc.ending_losses(model, [mc.item_rows(i, prompts, 64) for i in task.items],
                            mc.Scoring(prompts, 64, budget=128, device=CPU))
    theirs = reference_losses(lambda x: hf_model(x).logits, task.items, prompts, 64)
    for scored, expected in zip(ours, theirs):
        np.testing.assert_allclose(scored[:, 0].numpy(), expected, rtol=1e-5, atol=1e-5)
    assert [int(s[:, 1].sum()) for s in ours] == [sum(len(ids) - kept for ids, kept in mc.item_rows(i, prompts, 64))
                                                  for i in task.items]


@pytest.mark.parametrize("budget", [64, 4096])  # one item a batch, all of them
def test_batched_scoring_picks_what_one_ending_at_a_time_picks(budget):
    rng = np.random.default_rng(0)
    words = ["the", "fox", "ran", "over", "a", "hill", "and", "café", "night", "sun", "moon", "king"]
    items = [Item(" ".join(rng.choice(words, rng.integers(3, 30))),
                  tuple(" ".join(rng.choice(words, rng.integers(1, 9))) for _ in range(rng.integers(2, 6))), 0)
             for _ in range(16)]
    torch.manual_seed(0)  # a context that is no multiple of the padding's 16: rows are cut to fit it
    model = GPTModel(ModelConfig(context_length=24, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0)).eval()
    prompts = Prompts.for_model(chat=False)
    batched = mc.ending_losses(model, [mc.item_rows(i, prompts, 24) for i in items], mc.Scoring(prompts, 24, budget, CPU))
    alone = reference_losses(model, items, prompts, 24)
    for scored, expected in zip(batched, alone):  # float32
        np.testing.assert_allclose(scored[:, 0].numpy(), expected, rtol=1e-5, atol=1e-5)
        assert int(scored[:, 0].argmin()) == int(np.argmin(expected))
    # the picks `score_task` counts are those of the losses
    task = Task("t", [Item(i.context, i.endings, int(np.argmin(s))) for i, s in zip(items, alone)], "made here")
    result = mc.score_task(model, task, mc.Scoring(prompts, 24, budget, CPU))
    assert (result.items, result.right) == (16, 16)
    norm = sum(int(np.argmin(np.array(s) / scored[:, 1].numpy())) == int(np.argmin(s)) for s, scored in zip(alone, batched))
    assert result.right_norm == norm


def test_the_head_by_vocabulary_pieces_gives_cross_entropy_over_the_whole_vocabulary():
    """`target_nats` runs the head `VOCAB_PIECE` vocabulary rows at a time, the last piece shorter: each
    target's loss is F.cross_entropy's over the model's whole logits, float32 to 1e-5, for targets in
    the first, middle and last pieces and at their edges, several targets at one position."""
    torch.manual_seed(0)
    model = GPTModel(ModelConfig(context_length=8, emb_dim=32, n_heads=2, n_layers=1, drop_rate=0.0)).eval()
    with torch.no_grad():
        model.out_head.weight.mul_(50)  # logits spread over tens of nats: a wrong column or piece shows
    piece, vocab = mc.VOCAB_PIECE, model.cfg.vocab_size
    assert vocab > 3 * piece and vocab % piece
    hidden = torch.randn(5, 32)
    targets = torch.tensor([0, piece - 1, piece, 2 * piece + 7, vocab - 1, vocab - 1, 1, 3 * piece])
    sources = torch.tensor([0, 1, 2, 3, 4, 0, 4, 2])
    with torch.no_grad():
        expected = F.cross_entropy(model.logits(hidden)[sources], targets, reduction="none")
        scored = mc.target_nats(model, hidden, sources, targets)
    assert expected.std() > 1
    torch.testing.assert_close(scored, expected, rtol=1e-5, atol=1e-5)


def test_scoring_runs_the_exact_head_only_where_an_ending_could_be_picked_and_picks_the_same(monkeypatch):
    """`score_task` asks for the picks only (`ending_losses(..., every=False)`, `picking_nats`): an ending that
    cannot be its item's pick by acc or acc_norm keeps a lower bound of its loss, above the pick's.
    float32, on a model whose mass lies mostly on the ids the bound sums over (as a trained one's
    does), some bounds loose: the same picks as exact losses everywhere, for fewer exact positions."""
    rng = np.random.default_rng(1)
    words = ["the", "fox", "ran", "over", "a", "hill", "and", "café", "night", "sun", "moon", "king", "of", "to"]
    items = [Item(" ".join(rng.choice(words, rng.integers(3, 40))),  # some cropped to fit: several groups
                  tuple(" ".join(rng.choice(words, rng.integers(1, 7))) for _ in range(rng.integers(3, 9))), 0)
             for _ in range(24)]
    torch.manual_seed(0)
    model = GPTModel(ModelConfig(context_length=24, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0)).eval()
    with torch.no_grad():
        model.out_head.weight[:mc.BOUND_IDS] *= 30
    prompts = Prompts.for_model(chat=False)
    rows = [mc.item_rows(i, prompts, 24) for i in items]
    scoring = mc.Scoring(prompts, 24, 64, CPU)
    exact = mc.ending_losses(model, rows, scoring)
    positions, target_nats = [], mc.target_nats
    monkeypatch.setattr(mc, "target_nats", lambda m, hidden, *rest: positions.append(len(hidden))
                        or target_nats(m, hidden, *rest))
    picked = mc.ending_losses(model, rows, scoring, every=False)
    assert 0 < sum(positions) < 0.7 * sum(mc.predictions(g) for g in mc.shared_contexts(rows))
    bounded = 0
    for ours, right in zip(picked, exact):
        assert torch.equal(ours[:, 1], right[:, 1]) and (ours[:, 0] <= right[:, 0] + 1e-5).all()
        left_out = ~torch.isclose(ours[:, 0], right[:, 0], rtol=1e-6, atol=1e-6)
        bounded += int(left_out.sum())
        for measure in (lambda scored: scored[:, 0], lambda scored: scored[:, 0] / scored[:, 1]):
            assert int(measure(ours).argmin()) == int(measure(right).argmin())
            assert (measure(ours)[left_out] > measure(right).min()).all()
    assert bounded > 20  # of 124 endings
    # score_task counts those picks: the counts of exact losses everywhere
    task = Task("t", items, "made here")
    ours = mc.score_task(model, task, scoring)
    monkeypatch.setattr(mc, "ending_losses", lambda *args, every: exact)
    right = mc.score_task(model, task, scoring)
    assert (ours.items, ours.right, ours.right_norm) == (right.items, right.right, right.right_norm)


@pytest.mark.parametrize("attn_impl", ["sdpa", "explicit"])
def test_a_context_runs_once_for_its_endings_and_each_ending_scores_as_its_own_row(attn_impl):
    """Endings that keep the same context share one pass over it (and the predictions after a common start);
    a context cropped to fit keeps a crop per ending length, each its own group. Against one row at a time,
    float32, to 1e-5, in one batch of contexts of different lengths and in a batch per group."""
    long = "the king " * 20  # cropped to fit the context of 24, as each ending's length leaves room
    items = [Item(long, ("and", "and the", "and the queen", "and the queen and"), 0),
             Item("a fox", ("ran", "ran over", "ran over the hill", "sat"), 1),
             Item(long + "sun", ("and", "moon", "night"), 2),  # one crop for all three
             Item("café night", ("sun", "sun moon"), 0)]
    torch.manual_seed(0)
    model = GPTModel(ModelConfig(context_length=24, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0))
    model.use_attention(attn_impl).eval()
    prompts = Prompts.for_model(chat=False)
    rows = [mc.item_rows(i, prompts, 24) for i in items]
    groups = mc.shared_contexts(rows)
    assert [len(g.endings) for g in groups] == [1, 1, 1, 1, 4, 3, 2]  # the first item's 4 lengths, 4 crops
    assert [g.rows for g in groups[4:]] == [[4, 5, 6, 7], [8, 9, 10], [11, 12]]
    assert all(len(g.context) + len(e) == 25 for g in groups[:4] for e in g.endings)  # each crop as its row keeps
    alone = reference_losses(model, items, prompts, 24)
    for budget in (10_000, 1):  # every group in one batch (while their endings fit the context); one a batch
        batches = mc.batches_of(groups, budget, 24, mc.cache_rows(model, budget))
        assert (len(batches) < len(groups)) == (budget > 1)
        for scored, expected in zip(mc.ending_losses(model, rows, mc.Scoring(prompts, 24, budget, CPU)), alone):
            np.testing.assert_allclose(scored[:, 0].numpy(), expected, rtol=1e-5, atol=1e-5)
    # a batch's rows stay within the context (a cropped group's padded ending would run past it), its head's
    # positions within the budget and its cache within its rows, unless one group alone is over them
    assert [mc.predictions(g) for g in groups[4:]] == [4, 1, 2]  # " ran", " ran over", ... share their starts
    for budget, rows in ((10_000, 1000), (12, 9)):
        for batch in mc.batches_of(groups, budget, 24, rows):
            width = max(len(e) for g in batch for e in groups[g].endings) - 1
            assert all(len(groups[g].context) + width <= 24 for g in batch)
            assert len(batch) == 1 or (sum(mc.predictions(groups[g]) for g in batch) <= budget
                                       and sum(1 + len(groups[g].endings) for g in batch) <= rows)


def test_several_processes_split_the_items_and_sum_the_counts(items_file, monkeypatch):
    torch.manual_seed(0)
    model = GPTModel(ModelConfig(context_length=32, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0))
    task = mc.load_task(str(items_file))
    prompts = Prompts.for_model(chat=False)
    whole = mc.score_task(model, task, mc.Scoring(prompts, 32, 256, CPU))

    class Rank:  # what `Distributed` gives score_task: its share of the items, and a sum over ranks
        def __init__(self, rank, parts):
            self.rank, self.world_size, self.launched, self.is_main, self.parts = rank, 2, True, rank == 0, parts

        def sum(self, tensor):
            self.parts.append(tensor.clone())
            return tensor

    parts = []
    shares = [mc.score_task(model, task, mc.Scoring(prompts, 32, 256, CPU), dist=Rank(r, parts))
              for r in (0, 1)]
    assert [s.items for s in shares] == [2, 2]
    total = parts[0] + parts[1]
    assert total.tolist() == [whole.items, whole.right, whole.right_norm, pytest.approx(whole.chance)]


def test_hellaswag_is_downloaded_once_checked_and_refused_if_it_differs(tmp_path, monkeypatch, capsys):
    """The real download code, from a local file in HellaSwag's format (file:// URL), pinned by its git blob id."""
    source = write_items(tmp_path / "source.jsonl", [
        {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
         "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": 3,
         "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                     "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
         "source_id": "activitynet~v_-JhWjGDPHMY"}])
    blob = subprocess.run(["git", "hash-object", str(source)], capture_output=True, text=True).stdout.strip()
    assert mc.git_blob_id(source) == blob  # what git itself computes
    monkeypatch.setattr(mc, "TASK_DIR", tmp_path / "tasks")
    monkeypatch.setattr(mc, "HELLASWAG_URL", source.as_uri())
    monkeypatch.setattr(mc, "HELLASWAG_BLOB", blob)
    task = mc.load_task("hellaswag")
    assert task.name == "hellaswag" and task.items[0].label == 3 and task.items[0].context.endswith("roof. he")
    assert (tmp_path / "tasks" / mc.HELLASWAG_FILE).read_bytes() == source.read_bytes()
    source.unlink()  # a second load reads the kept file: no download
    assert mc.load_task("hellaswag").items == task.items
    (tmp_path / "tasks" / mc.HELLASWAG_FILE).unlink()
    with pytest.raises(UserError) as missing:  # no file, no network
        mc.load_task("hellaswag")
    assert f"put it at {tmp_path / 'tasks' / mc.HELLASWAG_FILE}" in str(missing.value)
    other = write_items(tmp_path / "other.jsonl", ITEMS)
    monkeypatch.setattr(mc, "HELLASWAG_URL", other.as_uri())
    with pytest.raises(UserError, match=f"expected {blob}; refusing to use it"):
        mc.load_task("hellaswag")
    assert sorted(p.name for p in (tmp_path / "tasks").iterdir()) == []  # nothing kept of a wrong file


def test_the_pinned_hellaswag_source_is_the_authors_file_at_a_fixed_commit():
    assert mc.HELLASWAG_URL == ("https://raw.githubusercontent.com/rowanz/hellaswag/"
                                f"{mc.HELLASWAG_COMMIT}/data/hellaswag_val.jsonl")
    assert re.fullmatch(r"[0-9a-f]{40}", mc.HELLASWAG_COMMIT) and re.fullmatch(r"[0-9a-f]{40}", mc.HELLASWAG_BLOB)


def test_a_fixed_subset_is_the_same_every_time_and_in_file_order(items_file):
    task = mc.load_task(str(items_file))
    first, again = mc.subset(task, 2), mc.subset(task, 2)
    assert first.items == again.items and len(first.items) == 2
    assert [task.items.index(i) for i in first.items] == sorted(task.items.index(i) for i in first.items)
    assert mc.subset(task, None) is task and mc.subset(task, 10) is task


SPEECHES = """SCENE I. A room.

[Enter HAMLET]

HAMLET:
To be, or not to be: that is the question:
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune,
Or to take arms against a sea of troubles,
And by opposing end them? To die: to sleep;

OPHELIA:
Good my lord,
How does your honour for this many a day?
I humbly thank you; well, well, well.
My lord, I have remembrances of yours,
That I have longed long to re-deliver;

HAMLET:
No, not I;
I never gave you aught, nor ever did.
[Aside] Ay, truly.
Could beauty, my lord, have better commerce
Than with honesty? and what is more to say,
"""


def test_next_words_items_continue_a_cut_line_with_its_true_words_or_words_cut_from_other_speeches():
    items = next_words.make_items(SPEECHES, count=100, seed=3)
    speeches = next_words.speeches(SPEECHES)
    assert [s for s, _ in speeches] == ["HAMLET:", "OPHELIA:", "HAMLET:"]
    assert "[Aside] Ay, truly." not in speeches[2][1]  # a stage direction is no line
    assert items and items == next_words.make_items(SPEECHES, count=100, seed=3)  # seeded: the same again
    for item in items:
        speaker, *before, start = item["context"].split("\n")
        true = item["endings"][item["label"]]
        lines = next(lines for s, lines in speeches if s == speaker and any(l.startswith(f"{start} {true}") for l in lines))
        j = next(j for j, l in enumerate(lines) if l.startswith(f"{start} {true}"))
        assert before == lines[max(0, j - next_words.CONTEXT_LINES):j] and start
        assert len(item["endings"]) == 4 and len(set(item["endings"])) == 4
        for other in item["endings"]:
            assert len(other.split(" ")) == next_words.WORDS
            if other != true:  # words that follow a cut in a line of another speech
                assert not any(f" {other}" in l for l in lines) and any(f" {other}" in l for _, ls in speeches for l in ls)


def test_the_built_in_task_is_made_once_from_the_val_split_only(tmp_path):
    path = next_words.next_words_task(tmp_path)
    task = mc.read_items(path)
    assert len(task) == next_words.ITEMS and {len(i.endings) for i in task} == {4}
    val = next_words.val_text()
    train_text = get_tokenizer().decode(np.memmap(next_words.prepare(DataConfig()) / "train.bin", dtype=np.uint16,
                                                  mode="r")[-50_000:].tolist())
    spoken = ["\n".join(item.context.split("\n")[1:]) for item in task]  # the context after the speaker
    for item, lines in zip(task[:100], spoken):
        assert lines in val and all(e in val for e in item.endings)
    long = [lines for lines in spoken if len(lines) > 80]  # a few words may be anywhere; whole lines are not
    assert len(long) > 500 and sum(lines in train_text for lines in long) == 0
    stamp = path.stat().st_mtime_ns
    assert next_words.next_words_task(tmp_path) == path and path.stat().st_mtime_ns == stamp  # kept, not made again
    labels = [i.label for i in task]
    assert all(150 < labels.count(k) < 350 for k in range(4))  # the right ending is anywhere


def test_the_command_prints_acc_acc_norm_their_intervals_and_chance(items_file, tmp_path, capsys):
    torch.manual_seed(0)
    cfg = Config(model=ModelConfig(context_length=32, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0),
                 train=TrainConfig(seed=7))
    model = GPTModel(cfg.model)
    save_checkpoint(tmp_path / "run.pt", {"model": model.state_dict(), "config": asdict(cfg)})
    args = ["--checkpoint", str(tmp_path / "run.pt"), "--task", str(items_file)]
    assert evaluate.main(args) == 0
    line = capsys.readouterr().out.strip()
    assert re.fullmatch(r"items: acc_norm [\d.]+ \(95% interval [\d.]+-[\d.]+\), acc [\d.]+ \([\d.]+-[\d.]+\) "
                        r"over 4 items; chance 0\.3208 \([\d,.]+ items/s\)", line), line
    assert evaluate.main(args + ["--json", "--limit", "3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["items"] == 3 and printed["dtype"] == "float32" and len(printed["acc_norm_interval"]) == 2
    expected = mc.score_task(model, mc.subset(mc.load_task(str(items_file)), 3),
                             mc.Scoring(Prompts.for_model(False), 32, 16 * 32, CPU))
    assert (printed["acc"], printed["acc_norm"]) == (expected.acc, expected.acc_norm)
    # --untrained: the model as train.py builds it before step 1, from the run's seed
    torch.manual_seed(7)
    untrained = build_model(resolve_model_config(cfg.model, cfg.train.init_from, ()), cfg.train.init_from)
    assert evaluate.main(args + ["--json", "--untrained"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = mc.score_task(untrained, mc.load_task(str(items_file)), mc.Scoring(Prompts.for_model(False), 32, 512, CPU))
    assert "untrained" in printed["checkpoint"] and (printed["acc"], printed["acc_norm"]) == (expected.acc,
                                                                                            expected.acc_norm)
    assert evaluate.main(["--checkpoint", str(tmp_path / "run.pt"), "--limit", "3"]) == 2
    assert "--limit and --untrained go with --task" in capsys.readouterr().err
    assert evaluate.main(args + ["--corpus", str(items_file)]) == 2
    assert "give one of them" in capsys.readouterr().err


def test_the_loop_scores_tasks_at_each_evaluation_into_metrics_and_the_plot(items_file, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "run"
    args = ["--config", "tiny.yaml", f"--train.out_dir={out}", "--sample.max_new_tokens=2", "--train.dtype=float32",
            f"--train.eval_tasks=[{items_file}]", "--train.eval_task_items=3"]
    assert train.main(args) == 0
    printed = capsys.readouterr().out
    assert f"scoring items at each evaluation: 3 items of {items_file}" in printed
    assert re.search(r"step 10: .* tokens/s, items acc_norm [\d.]+ \([\d.]+ s\)", printed)
    rows = read_metrics(out / "metrics.csv")
    assert [r["step"] for r in rows] == [5, 10] and all(0 <= r["items_acc_norm"] <= 1 for r in rows)
    assert (out / "loss.png").is_file()
    # the last row is the saved model's score (train.dtype float32: the command's precision on a CPU)
    assert evaluate.main(["--checkpoint", str(out / "latest.pt"), "--task", str(items_file), "--limit=3", "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert (rows[-1]["items_acc"], rows[-1]["items_acc_norm"]) == (scored["acc"], scored["acc_norm"])
    # resumed with one more task: the file gains its columns, the old rows keep theirs
    second = write_items(tmp_path / "more.jsonl", ITEMS[:2])
    assert train.main(args[:-2] + ["--train.max_iters=15", "--resume",
                                   f"--train.eval_tasks=[{items_file},{second}]"]) == 0
    rows = read_metrics(out / "metrics.csv")
    assert [r["step"] for r in rows] == [5, 10, 15] and np.isnan(rows[0]["more_acc"]) and 0 <= rows[2]["more_acc"] <= 1


def test_eval_tasks_take_a_list_or_one_name():
    assert load_config("tiny.yaml", ["--train.eval_tasks=hellaswag"]).train.eval_tasks == ["hellaswag"]
    assert load_config("tiny.yaml", ["--train.eval_tasks=[a.jsonl, b.jsonl]"]).train.eval_tasks == ["a.jsonl", "b.jsonl"]
    with pytest.raises(UserError, match="train.eval_tasks in the command line must be a list of names, got 3"):
        load_config("tiny.yaml", ["--train.eval_tasks=3"])
    with pytest.raises(UserError, match="train.eval_task_items must be at least 1"):
        load_config("tiny.yaml", ["--train.eval_task_items=0"])


def test_a_chat_run_is_scored_through_its_template(items_file, tmp_path, capsys):
    from gpt.chat.template import TEMPLATE, chat_model_config
    torch.manual_seed(0)
    cfg = Config(model=chat_model_config(ModelConfig(context_length=32, emb_dim=16, n_heads=2, n_layers=1)),
                 data=DataConfig(format="chat", corpus="shakespeare-chat"))
    model = GPTModel(cfg.model)
    save_checkpoint(tmp_path / "chat.pt", {"model": model.state_dict(), "config": asdict(cfg),
                                           "chat_template": TEMPLATE})
    assert evaluate.main(["--checkpoint", str(tmp_path / "chat.pt"), "--task", str(items_file), "--json"]) == 0
    out, err = capsys.readouterr()
    assert "the context as a user turn, each ending as the reply" in err
    expected = mc.score_task(model, mc.load_task(str(items_file)),
                             mc.Scoring(Prompts.for_model(chat=True), 32, 16 * 32, CPU))
    printed = json.loads(out)
    assert (printed["acc"], printed["acc_norm"]) == (expected.acc, expected.acc_norm)


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_scoring_is_one_graph_for_every_batch_and_counts_what_eager_scoring_counts(
        backend, items_file, monkeypatch):
    """Where training compiles (`train.compile`; auto: CUDA), `ending_states` goes through torch.compile with
    dynamic shapes: Dynamo's tracing alone (its eager backend), or Inductor's real compile on this CPU
    (slow). No graph break, no fallback to eager, the same counts."""
    import warnings
    from torch._dynamo.utils import counters
    real_compile, options = torch.compile, []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: options.append(kw) or real_compile(fn, backend=backend, **kw))
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = GPTModel(ModelConfig(context_length=32, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0))
    task = mc.load_task(str(items_file))
    eager = mc.score_task(model, task, mc.Scoring(Prompts.for_model(False), 32, 64, CPU))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = mc.score_task(model, task, mc.Scoring(Prompts.for_model(False), 32, 64, CPU, compile=True))
    assert not [w for w in caught if "torch.compile failed" in str(w.message)]  # no fallback to eager
    assert options == [{"dynamic": True}]  # a graph for any batch's shape, not one per shape
    groups = mc.shared_contexts([mc.item_rows(i, Prompts.for_model(False), 32) for i in task.items])
    batches = len(mc.batches_of(groups, 64, 32, mc.cache_rows(model, 64)))
    # (a second graph when two sizes that happened to be equal at the first call part: "duck sizing")
    assert batches == 2 and 1 <= counters["stats"]["unique_graphs"] <= 2 and not counters["graph_break"]
    torch._dynamo.reset()
    assert (compiled.items, compiled.right, compiled.right_norm) == (eager.items, eager.right, eager.right_norm)
