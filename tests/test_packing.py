"""Packed chat windows: best-fit packing, conversations that never see each other, positions that
restart, and a loss that is the mean over the step's counted targets."""

import copy
import json
import random

import pytest
import torch

from gpt.chat.data import ChatWindows, best_fit, prepare_chat
from gpt.chat.template import CHAT_VOCAB_SIZE
from gpt.config import DataConfig, TrainConfig
from gpt.data import eval_loader, full_batch
from gpt.model import GPTModel, IGNORE_INDEX, ModelConfig, conversations_apart
from gpt.precision import Precision
from gpt.tokenizer import EOT_ID
from gpt.training import token_losses, train_step

CPU = torch.device("cpu")
WINDOW = 64


def conversation(n: int) -> dict:
    return {"messages": [{"role": "user", "content": f"Count to {n}, please" + " now" * (n % 3)},
                         {"role": "assistant", "content": " ".join(map(str, range(1, n + 1)))}]}


@pytest.fixture
def prepared(tmp_path):
    """A chat corpus of 32 conversations of 13 to 34 tokens, and two longer than a window: one cut
    (its reply goes on past it), one dropped (its prompt fills it)."""
    long_prompt = {"messages": [{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "Ok"}]}
    records = [conversation(70), long_prompt] + [conversation(n) for n in random.Random(0).choices(range(1, 25), k=30)]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return prepare_chat(DataConfig(format="chat", corpus=str(path), prepared_dir=str(tmp_path / "p"),
                                   val_fraction=0.1))


def chat_model(impl: str, dtype: torch.dtype = torch.float32) -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(ModelConfig(vocab_size=CHAT_VOCAB_SIZE, context_length=WINDOW, emb_dim=32, n_heads=4,
                                n_layers=2, drop_rate=0.0)).use_attention(impl).to(dtype)


def test_best_fit_fills_bins_within_capacity_and_places_every_item_once():
    sizes = random.Random(1).choices(range(1, 60), k=300)
    bins = best_fit(sizes, 64)
    assert sorted(i for b in bins for i in b) == list(range(300))
    assert all(sum(sizes[i] for i in b) <= 64 for b in bins)
    assert len(bins) <= sum(sizes) / 64 * 1.1  # within 10% of the fewest bins any packing could use
    assert best_fit(sizes, 64) == bins  # the same windows every time: a resumed run reads the same
    assert best_fit([5, 4, 3, 2], 7) == [[0, 3], [1, 2]]  # longest first, each where it leaves least room


def test_packed_windows_hold_several_conversations_with_restarting_positions(prepared):
    alone, packed = ChatWindows(prepared, "train", WINDOW), ChatWindows(prepared, "train", WINDOW, pack=True)
    assert packed.conversations == alone.conversations == len(alone) and len(packed) < len(alone) / 2
    assert packed.targets_per_window() > 2 * alone.targets_per_window()
    assert (packed.cut, packed.dropped) == (alone.cut, alone.dropped) and alone.cut + alone.dropped > 0
    for i in range(len(packed)):
        inputs, targets, positions = packed[i]
        starts = (positions == 0).nonzero().flatten().tolist()
        assert inputs[starts].tolist() == [EOT_ID] * len(starts)  # every conversation (and the padding) begins so
        lengths = [end - start - 1 for start, end in packed.windows[i]]
        assert starts[:len(lengths)] == [sum(lengths[:k]) for k in range(len(lengths))]
        assert (targets[sum(lengths):] == IGNORE_INDEX).all()  # the padding counts nowhere
    assert "packed into" in packed.describe("train") and "reply tokens a window" in packed.describe("train")


def test_conversations_apart_separates_the_sequences_a_zero_starts():
    apart = conversations_apart(torch.tensor([[0, 1, 2, 0, 1, 0]]))
    sequence = [0, 0, 0, 1, 1, 2]
    assert apart.shape == (1, 1, 6, 6)
    assert apart[0, 0].tolist() == [[a != b for b in sequence] for a in sequence]


@pytest.mark.parametrize("impl", ["explicit", "sdpa"])
def test_changing_one_packed_conversation_changes_no_output_of_another(prepared, impl):
    """The causal-leak test, extended: within a window, every output of the other conversations
    (before and after the changed one) stays exactly as it was."""
    packed = ChatWindows(prepared, "train", WINDOW, pack=True)
    i = next(i for i in range(len(packed)) if len(packed.windows[i]) >= 3)
    inputs, _, positions = packed[i]
    starts = (positions == 0).nonzero().flatten().tolist()
    middle = slice(starts[1] + 1, starts[2])  # the second conversation, its first token aside
    changed = inputs.clone().long()
    changed[middle] = (changed[middle] + 7) % 50257
    model = chat_model(impl).train()  # dropout 0: train mode, as a training step runs it
    with torch.no_grad():
        before, after = (model(x[None].long(), positions=positions[None].long())[0] for x in (inputs, changed))
    others = torch.ones(WINDOW, dtype=torch.bool)
    others[starts[1]:starts[2]] = False
    assert torch.equal(before[others], after[others])
    assert not torch.equal(before[~others], after[~others])  # the change did reach its own conversation


@pytest.mark.parametrize("impl", ["explicit", "sdpa"])
def test_a_packed_conversation_has_the_losses_it_has_alone_in_a_window(prepared, impl):
    """Per-token losses in float32 within 1e-5 nats (the sums differ in order only), each conversation
    alone against packed with others, over every window of the split, explicit and sdpa alike."""
    alone, packed = ChatWindows(prepared, "train", WINDOW), ChatWindows(prepared, "train", WINDOW, pack=True)
    model = chat_model(impl).eval()
    with torch.no_grad():
        x, y = full_batch([alone[i] for i in range(len(alone))], len(alone))
        by_span = dict(zip([window[0] for window in alone.windows],
                           token_losses(model, x.long(), y).view(len(alone), WINDOW)))
        x, y, positions = full_batch([packed[i] for i in range(len(packed))], len(packed))
        losses = token_losses(model, x.long(), y, positions.long()).view(len(packed), WINDOW)
    compared = 0
    for window, row in zip(packed.windows, losses):
        at = 0
        for start, end in window:
            n = end - start - 1
            torch.testing.assert_close(row[at:at + n], by_span[(start, end)][:n], rtol=0, atol=1e-5)
            compared += int((row[at:at + n] > 0).sum())
            at += n
    assert compared == int((y != IGNORE_INDEX).sum()) > 100


def test_explicit_and_sdpa_attention_agree_on_packed_windows(prepared):
    packed = ChatWindows(prepared, "train", WINDOW, pack=True)
    x, y, positions = (t.long() for t in full_batch([packed[i] for i in range(4)], 4))
    results = []
    for impl in ("explicit", "sdpa"):
        model = chat_model(impl, torch.float64)
        loss = model(x, targets=y, positions=positions)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=1e-12)  # float64
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_an_eval_batch_of_packed_windows_is_padded_with_a_row_of_one_span(prepared):
    packed = ChatWindows(prepared, "val", WINDOW, pack=True)
    (inputs, targets, positions), = eval_loader(packed, 3, None)
    assert inputs.shape == targets.shape == positions.shape == (3, WINDOW)
    assert positions[len(packed):].tolist() == [list(range(WINDOW))] * (3 - len(packed))
    assert (targets[len(packed):] == IGNORE_INDEX).all()


def test_the_step_loss_is_the_mean_over_its_counted_targets_one_micro_batch_of_8_or_8_of_1(prepared):
    """On the same 8 packed windows, in float32 within 1e-6: the loss and the update of one
    micro-batch of 8 windows equal those of 8 micro-batches of 1, though the windows count
    different numbers of targets (a mean of per-micro-batch means would not)."""
    packed = ChatWindows(prepared, "train", WINDOW, pack=True)
    windows = [packed[i % len(packed)] for i in range(8)]
    counts = [int((y != IGNORE_INDEX).sum()) for _, y, _ in windows]
    assert len(set(counts)) > 1
    model = chat_model("sdpa")
    results = []
    for accum, batch in ((1, [full_batch(windows, 8)]), (8, [full_batch([w], 1) for w in windows])):
        trained = copy.deepcopy(model)
        sgd = torch.optim.SGD(trained.parameters(), lr=1.0)  # the update is the gradient itself
        cfg = TrainConfig(optimizer="adamw", grad_clip=0.0, grad_accum_steps=accum)
        loss, tokens = train_step(trained, iter(batch), sgd, Precision(torch.float32, CPU), cfg)
        results.append((loss, tokens, [p.detach() for p in trained.parameters()]))
    (loss_1, tokens_1, params_1), (loss_8, tokens_8, params_8) = results
    assert loss_1 == pytest.approx(loss_8, rel=1e-6) and tokens_1 == tokens_8 == 8 * WINDOW
    for a, b in zip(params_1, params_8):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    with torch.no_grad():  # what the old mean of means would have said: measurably different
        means = [model(x.long(), targets=y, positions=p.long()).item() for x, y, p in (full_batch([w], 1) for w in windows)]
    assert abs(sum(means) / 8 - loss_1) > 1e-4  # 100 times the tolerance above
