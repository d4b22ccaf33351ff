"""Loss and bits per byte over every window (gpt.tools.evaluate), checked against independent computations."""

from dataclasses import asdict
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from gpt.checkpoint import save_checkpoint
from gpt.config import Config, DataConfig, TrainConfig
from gpt.corpus.prepare import prepare
from gpt.data import TextFormat, TokenWindows, eval_loader, load_split
from gpt.distributed import SINGLE
from gpt.model import GPTModel, ModelConfig
from gpt.tokenizer import EOT_ID, get_tokenizer
from gpt.tools import evaluate
from gpt.training import final_val_line, score

CPU = torch.device("cpu")


@pytest.mark.parametrize("batch_size", [3, 4])  # 9 windows: 3 batches of 3, or 2 of 4 and one padded to 4
def test_score_counts_the_nats_and_bytes_of_exactly_the_scored_tokens(batch_size):
    enc = get_tokenizer()
    tokens = (enc.encode_ordinary("Naïve café, 日本語 and 🎭 masks.\n" * 3) + [EOT_ID]
              + enc.encode_ordinary("A second document, after the separator." * 2 + " The end."))
    torch.manual_seed(0)
    model = GPTModel(ModelConfig(context_length=8, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0))
    windows = TokenWindows(np.array(tokens, dtype=np.uint16), max_length=8, stride=8)
    result = score(model, eval_loader(windows, batch_size, max_batches=None), torch.device("cpu"))

    # Independently: window i predicts tokens 8i+1 .. 8i+8; <|endoftext|> is no text, so it counts
    # in the loss but in neither the nats nor the bytes of bits per byte.
    n = len(windows)
    ids = torch.tensor(tokens[:8 * n + 1])
    with torch.no_grad():
        logits = model.eval()(ids[:-1].view(n, 8))
    nats = F.cross_entropy(logits.flatten(0, 1), ids[1:], reduction="none").double()
    text = ids[1:] != EOT_ID
    scored_text = enc.decode_bytes([t for t in ids[1:].tolist() if t != EOT_ID])
    assert EOT_ID in ids[1:].tolist() and len(tokens) > 8 * n + 1  # a separator scored, a tail left out
    assert (result.windows, result.tokens, result.text_tokens) == (n, 8 * n, int(text.sum()))
    assert result.text_bytes == len(scored_text)
    assert result.loss == pytest.approx(nats.mean().item(), rel=1e-6)
    assert result.bits_per_byte == pytest.approx(nats[text].sum().item() / (len(scored_text) * math.log(2)), rel=1e-6)


def test_gpt2_weights_scored_on_a_corpus_agree_with_transformers(hf_gpt2_vocab, tmp_path, capsys):
    hf_model, folder = hf_gpt2_vocab  # full GPT-2 vocabulary, 64 positions
    corpus_file = tmp_path / "corpus.txt"
    corpus_file.write_text("".join(f"Line {i}: café ünïcode, 日本, a fox.\n" for i in range(60)), encoding="utf-8")
    assert evaluate.main(["--checkpoint", str(folder), "--corpus", str(corpus_file), "--json",
                          "--data.batch_size=5", f"--data.prepared_dir={tmp_path / 'whole'}"]) == 0
    printed = json.loads(capsys.readouterr().out)
    tokens = torch.tensor(get_tokenizer().encode_ordinary(corpus_file.read_text(encoding="utf-8")))
    n = (len(tokens) - 1) // 64
    with torch.no_grad():  # transformers' own model over the same windows of 64
        logits = hf_model(tokens[:n * 64].view(n, 64)).logits
    nats = F.cross_entropy(logits.flatten(0, 1), tokens[1:n * 64 + 1], reduction="none")
    assert printed["windows"] == n > 1 and printed["tokens"] == n * 64
    assert printed["loss"] == pytest.approx(nats.mean().item(), abs=1e-5)
    text_bytes = len(get_tokenizer().decode_bytes(tokens[1:n * 64 + 1].tolist()))
    assert printed["text_bytes"] == text_bytes
    assert printed["bits_per_byte"] == pytest.approx(nats.sum().item() / (text_bytes * math.log(2)), rel=1e-5)
    # --data.max_tokens scores the corpus's first tokens only (prepared again: another setting).
    assert evaluate.main(["--checkpoint", str(folder), "--corpus", str(corpus_file), "--json",
                          "--data.max_tokens=129", f"--data.prepared_dir={tmp_path / 'whole'}"]) == 0
    assert json.loads(capsys.readouterr().out)["windows"] == 2  # stdout holds the figures alone


def test_gpt2_weights_without_a_corpus_is_one_clear_error(hf_small_vocab, capsys):
    _, folder = hf_small_vocab
    assert evaluate.main(["--checkpoint", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {folder} is not a run, so it has no val split; give --corpus SOURCE to score"


@pytest.mark.parametrize("setting, compiled", [(True, True), (False, False), ("auto", False)])  # auto: CUDA only
def test_the_final_figure_and_the_command_compile_where_the_run_s_training_would(setting, compiled, corpus_file,
                                                                                tmp_path, monkeypatch, capsys):
    """Through torch.compile (eager backend: fast) where train.compile asks for it, with the same figures."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m: real_compile(m, backend="eager"))
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    cfg = Config(model=ModelConfig(context_length=8, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0),
                 data=DataConfig(corpus=str(corpus_file), prepared_dir=str(tmp_path / "prepared"), num_proc=1,
                                 max_tokens=500, batch_size=5),  # val: 50 tokens, 6 windows of 8
                 train=TrainConfig(compile=setting))
    model = GPTModel(cfg.model)
    save_checkpoint(tmp_path / "run.pt", {"model": model.state_dict(), "config": asdict(cfg)})
    assert evaluate.main(["--checkpoint", str(tmp_path / "run.pt"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert counters["stats"]["unique_graphs"] == int(compiled)
    torch._dynamo.reset()
    counters.clear()
    windows = load_split(prepare(cfg.data), "val", 8, 8)
    line = final_val_line(model, eval_loader(windows, 5, None), cfg.train, CPU, SINGLE, TextFormat.whole_val, 1)
    assert counters["stats"]["unique_graphs"] == int(compiled)
    torch._dynamo.reset()
    assert len(windows) % 5 and printed["windows"] == len(windows) and printed["tokens"] == 8 * len(windows)
    assert f"over all {len(windows):,} windows" in line and f"{printed['loss']:.4f}" in line
    model.eval()
    with torch.no_grad():  # uncompiled, unpadded, every window at once
        x, y = (torch.stack(part).long() for part in zip(*(windows[i] for i in range(len(windows)))))
        expected = F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    assert printed["loss"] == pytest.approx(expected, rel=1e-6)
