import json

import numpy as np
import pytest
import torch

from gpt.data import (
    DataConfig, TokenWindows, TrainBatches, encode_document, eval_loader, load_split,
    markdown_play_to_text, prepare,
)
from gpt.errors import UserError
from gpt.tokenizer import EOT_ID, get_tokenizer

PLAY = """# Macbeth

## ACT I

### SCENE I. A desert place.

_Thunder and lightning. Enter three Witches_

**First Witch**  
When shall we three meet again  
In thunder, lightning, or in rain?

_Alarum within. Enter DUNCAN, MALCOLM, with Attendants,
meeting a bleeding Sergeant_

**Sergeant**  
__\\[Aside]_  
Doubtful it stood\\--so.

*Exeunt.*
"""


def test_markdown_play_to_plain_text():
    text = markdown_play_to_text(PLAY)
    assert text == (
        "Macbeth\n\nACT I\n\nSCENE I. A desert place.\n\n"
        "[Thunder and lightning. Enter three Witches]\n\n"
        "First Witch:\nWhen shall we three meet again\nIn thunder, lightning, or in rain?\n\n"
        "[Alarum within. Enter DUNCAN, MALCOLM, with Attendants, meeting a bleeding Sergeant]\n\n"
        "Sergeant:\n[Aside]\nDoubtful it stood--so.\n\n[Exeunt.]\n"
    )


def test_builtin_shakespeare_is_plain_play_text():
    prepared = prepare(DataConfig())
    meta = json.loads((prepared / "meta.json").read_text())
    assert meta["documents"] == 38
    text = (prepared / "input.txt").read_text(encoding="utf-8")
    for markup in ("**", "_", "#", "\\"):
        assert markup not in text
    assert "\nHAMLET:\nTo be, or not to be: that is the question:\n" in text
    train = np.memmap(prepared / "train.bin", dtype=np.uint16, mode="r")
    val = np.memmap(prepared / "val.bin", dtype=np.uint16, mode="r")
    assert len(train) == meta["train_tokens"] > 1_000_000
    assert len(val) == meta["val_tokens"]
    assert abs(len(val) / (len(train) + len(val)) - 0.1) < 0.001
    separators = int((train == EOT_ID).sum() + (val == EOT_ID).sum())
    assert separators == 37  # one between each pair of plays
    assert get_tokenizer().decode(train[:8].tolist()).startswith("A Midsummer")


def test_chunked_encoding_equals_whole():
    text = ("Word  \n  spaced\n\nlines\nX\ny " * 20000)
    from gpt import data
    old = data.CHUNK_CHARS
    data.CHUNK_CHARS = 1000
    try:
        assert encode_document(text) == get_tokenizer().encode_ordinary(text)
    finally:
        data.CHUNK_CHARS = old


@pytest.mark.parametrize("n,max_length,stride,expected", [
    (11, 10, 10, 1),   # exactly one window plus its shifted target
    (10, 10, 10, 0),   # one token short of a window
    (21, 10, 10, 2),
    (20, 10, 10, 1),
    (21, 10, 5, 3),    # overlapping windows
    (21, 10, 1, 11),
    (100, 10, 30, 3),  # stride > max_length skips tokens
    (0, 4, 1, 0),
])
def test_window_count(n, max_length, stride, expected):
    assert len(TokenWindows(np.arange(n), max_length, stride)) == expected


def test_windows_stride_and_shift():
    ds = TokenWindows(np.arange(30, dtype=np.uint16), max_length=4, stride=3)
    x, y = ds[2]
    assert x.tolist() == [6, 7, 8, 9]
    assert y.tolist() == [7, 8, 9, 10]
    assert x.dtype == torch.int64
    last_x, last_y = ds[len(ds) - 1]
    assert last_y[-1].item() <= 29
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_user_corpus_file_prepared_once_and_again_on_change(corpus_file, tmp_path, capsys):
    cfg = DataConfig(corpus=str(corpus_file), prepared_dir=str(tmp_path / "prep"))
    prepared = prepare(cfg)
    meta = json.loads((prepared / "meta.json").read_text())
    total = meta["train_tokens"] + meta["val_tokens"]
    assert total == len(get_tokenizer().encode_ordinary(corpus_file.read_text(encoding="utf-8")))
    stamp = (prepared / "train.bin").stat().st_mtime_ns
    prepare(cfg)  # nothing changed: reused
    assert (prepared / "train.bin").stat().st_mtime_ns == stamp
    with open(prepared / "train.bin", "r+b") as f:  # a damaged token file is made again
        f.truncate(10)
    prepare(cfg)
    assert (prepared / "train.bin").stat().st_size == 2 * meta["train_tokens"]
    corpus_file.write_text(corpus_file.read_text(encoding="utf-8") + "\nmore text", encoding="utf-8")
    prepare(cfg)
    assert json.loads((prepared / "meta.json").read_text())["train_tokens"] > meta["train_tokens"]


def test_user_corpus_folder_joins_documents_with_eot(tmp_path):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("first document " * 50, encoding="utf-8")
    (folder / "sub" / "b.md").write_text("second document " * 50, encoding="utf-8")
    (folder / "ignored.csv").write_text("x,y", encoding="utf-8")
    prepared = prepare(DataConfig(corpus=str(folder), prepared_dir=str(tmp_path / "p"), val_fraction=0.2))
    tokens = np.concatenate([np.fromfile(prepared / f, dtype=np.uint16) for f in ("train.bin", "val.bin")])
    assert int((tokens == EOT_ID).sum()) == 1
    assert json.loads((prepared / "meta.json").read_text())["documents"] == 2


def test_corpus_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        prepare(DataConfig(corpus=str(tmp_path / "missing.txt")))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    with pytest.raises(UserError, match="is empty"):
        prepare(DataConfig(corpus=str(empty), prepared_dir=str(tmp_path / "e")))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8.*offset 3"):
        prepare(DataConfig(corpus=str(latin), prepared_dir=str(tmp_path / "l")))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(UserError, match="no .txt or .md"):
        prepare(DataConfig(corpus=str(tmp_path / "nothing")))
    assert not (tmp_path / "e").exists() and not (tmp_path / "l").exists()


def test_corpus_shorter_than_a_window(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Only a handful of tokens here, nothing more.", encoding="utf-8")
    prepared = prepare(DataConfig(corpus=str(short), prepared_dir=str(tmp_path / "s"), val_fraction=0.5))
    with pytest.raises(UserError, match="fewer than one window of 65"):
        load_split(prepared, "train", 64, 64)


def test_train_batches_deterministic_by_seed_and_reshuffled_per_epoch():
    ds = TokenWindows(np.arange(200, dtype=np.uint16), max_length=4, stride=4)  # 49 windows
    def take(seed, n):
        it = iter(TrainBatches(ds, 7, seed))
        return [next(it)[0] for _ in range(n)]
    a, b, c = take(1, 14), take(1, 14), take(2, 14)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    # 49 windows / 7 = 7 batches per epoch; epoch 1 is another permutation of the same windows.
    first = torch.cat(a[:7])[:, 0].sort().values
    second = torch.cat(a[7:])[:, 0].sort().values
    assert torch.equal(first, second)
    assert not torch.equal(torch.cat(a[:7]), torch.cat(a[7:]))


@pytest.mark.parametrize("taken", [0, 3, 7, 10, 20])  # 7 batches per epoch: edges included
def test_train_batches_resume_on_the_next_batch(taken):
    ds = TokenWindows(np.arange(200, dtype=np.uint16), max_length=4, stride=4)  # 49 windows
    unbroken = iter(TrainBatches(ds, 7, seed=3))
    expected = [next(unbroken)[0] for _ in range(taken + 9)]
    first = TrainBatches(ds, 7, seed=3)
    it = iter(first)
    for _ in range(taken):
        next(it)
    resumed = TrainBatches(ds, 7, seed=3)
    resumed.load_state_dict(first.state_dict())
    it = iter(resumed)
    assert all(torch.equal(next(it)[0], x) for x in expected[taken:])


def test_batches_and_evaluation_leave_the_global_rng_alone():
    ds = TokenWindows(np.arange(200, dtype=np.uint16), max_length=4, stride=4)
    before = torch.get_rng_state()
    it = iter(TrainBatches(ds, 7, seed=3))
    for _ in range(10):  # across an epoch boundary
        next(it)
    for _ in eval_loader(ds, 5, 3):
        pass
    assert torch.equal(torch.get_rng_state(), before)  # dropout's RNG is not drawn from


def test_train_batches_needs_a_full_batch():
    ds = TokenWindows(np.arange(20, dtype=np.uint16), max_length=4, stride=4)
    with pytest.raises(UserError, match="fewer than data.batch_size"):
        TrainBatches(ds, 8, 0)


def test_eval_loader_is_fixed_and_bounded():
    ds = TokenWindows(np.arange(1000, dtype=np.uint16), max_length=4, stride=4)
    loader = eval_loader(ds, batch_size=5, max_batches=3)
    first = [x for x, _ in loader]
    assert len(first) == 3
    assert all(torch.equal(a, b) for a, b in zip(first, [x for x, _ in loader]))
    starts = torch.cat(first)[:, 0]
    assert starts[0] == 0 and starts[-1] == 4 * (len(ds) - 1)  # spread over the whole split
