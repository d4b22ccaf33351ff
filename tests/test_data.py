import json
import random
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from gpt.config import DataConfig
from gpt.corpus import Block, encode, sources, writing
from gpt.corpus.encode import Encoded, encode_documents
from gpt.corpus.plays import markdown_play_to_text
from gpt.corpus.prepare import prepare
from gpt.data import PAD_INPUT_ID, TokenWindows, TrainBatches, eval_loader, load_split
from gpt.errors import UserError
from gpt.model import IGNORE_INDEX
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


@pytest.mark.parametrize("num_proc,block", [(1, 777), (2, 777), (2, None)])
def test_chunked_encoding_equals_whole(monkeypatch, num_proc, block):
    text = ("Word  \n  spaced\n\nlines\nX\ny " * 20000)
    monkeypatch.setattr(encode, "CHUNK_CHARS", 1000)
    block = block or len(text)  # blocks cut anywhere, even mid-word; or one block of 660K characters
    blocks = [Block(text[i:i + block], i == 0) for i in range(0, len(text), block)]
    pieces = list(encode_documents(blocks, num_proc))
    assert len(pieces) > 100  # it did go piece by piece
    tokens = np.frombuffer(b"".join(piece.tokens for piece in pieces), dtype=np.uint16)
    assert tokens.tolist() == get_tokenizer().encode_ordinary(text)


def test_every_safe_cut_keeps_the_tokens_of_the_whole():
    # Spaces, newlines, tabs, CR, contractions, digits, punctuation, accents, CJK, emoji and
    # whitespace that Python and the tokenizer disagree on (\x1c, \x85, \xa0, \u3000).
    alphabet = list("aZé ßx  \n\n\t\r'sdtlm0129.,!?-_") + ["\xa0", "\u3000", "\x1c", "\u0301", "🎭",
                                                          "日本", "\x85", "\u2028", "'ll", "\r\n"]
    enc, rng = get_tokenizer(), random.Random(0)
    for _ in range(1000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60)))
        cuts, start = [0], 1
        while (cut := encode.safe_cut(text, start)) is not None:
            cuts.append(cut)
            start = cut + 1
        pieces = [text[a:b] for a, b in zip(cuts, cuts[1:] + [len(text)])]
        assert [i for p in pieces for i in enc.encode_ordinary(p)] == enc.encode_ordinary(text), repr(text)


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
    assert x.dtype == torch.uint16  # as stored; widened to int64 on the device
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
    with pytest.raises(UserError, match="holds no .txt, .md, .jsonl"):
        prepare(DataConfig(corpus=str(tmp_path / "nothing")))
    assert not (tmp_path / "e").exists() and not (tmp_path / "l").exists()


@pytest.mark.parametrize("raw,offset", [
    ("日本語".encode() + b"\xff tail", 9),  # past the first blocks
    (b"ab\xe6\x97", 2),  # a character cut short by the end of the file
    (b"abc\xe6\x97abc", 3),  # ... or by the next one
])
def test_text_is_read_in_blocks_and_a_bad_byte_is_named_by_its_offset(tmp_path, monkeypatch, raw, offset):
    monkeypatch.setattr(sources, "BLOCK_BYTES", 4)  # characters split across blocks
    good = tmp_path / "good.txt"
    good.write_text("naïve café 日本語 🎭\r\n", encoding="utf-8")
    assert "".join(sources.read_text_blocks(good)) == good.read_bytes().decode("utf-8")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(raw)
    with pytest.raises(UserError, match=f"not UTF-8 text \\(bad byte at offset {offset}\\)"):
        list(sources.read_text_blocks(bad))


@pytest.mark.parametrize("failure,raised", [
    (OSError(28, "No space left on device"), UserError),  # a full disk: one clear error
    (KeyboardInterrupt(), KeyboardInterrupt),  # Ctrl-C while tokenising
])
def test_failed_preparation_leaves_the_previous_files_and_no_temporary_ones(
        corpus_file, tmp_path, monkeypatch, failure, raised):
    cfg = DataConfig(corpus=str(corpus_file), prepared_dir=str(tmp_path / "prep"))
    prepared = prepare(cfg)
    before = {p.name: p.read_bytes() for p in prepared.iterdir()}
    corpus_file.write_text(corpus_file.read_text(encoding="utf-8") + "\nmore", encoding="utf-8")

    def failing(blocks, num_proc):
        yield Encoded(np.array([1, 2, 3], dtype=np.uint16).tobytes(), 1, 10, 10)
        raise failure

    monkeypatch.setattr(writing, "encode_documents", failing)
    with pytest.raises(raised, match="cannot write the prepared corpus .*No space left on device" if raised
                       is UserError else None):
        prepare(cfg)
    assert {p.name: p.read_bytes() for p in prepared.iterdir()} == before


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


def test_train_batches_shuffle_like_a_seeded_dataloader():
    # The order of a seeded, shuffling DataLoader, epoch after epoch: TrainBatches adds only the
    # ability to resume part way through an epoch.
    ds = TokenWindows(np.arange(2000, dtype=np.uint16), max_length=8, stride=8)  # 15 batches an epoch
    it = iter(TrainBatches(ds, 16, seed=7))
    for epoch in range(2):
        loader = DataLoader(ds, batch_size=16, shuffle=True, drop_last=True,
                            generator=torch.Generator().manual_seed(7 + epoch))
        assert all(torch.equal(next(it)[0], x) for x, _ in loader)


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


def test_eval_batches_all_have_the_full_shape_and_padding_rows_are_no_windows():
    ds = TokenWindows(np.arange(100, dtype=np.uint16), max_length=4, stride=4)  # 24 windows
    loader = eval_loader(ds, batch_size=5, max_batches=None)  # 4 batches of 5, then 4 windows
    batches = list(loader)
    assert len(ds) == 24 and len(batches) == 5
    assert all(x.shape == y.shape == (5, 4) for x, y in batches)  # the last too: one shape to compile
    assert all(y.dtype == torch.int64 for _, y in batches)  # IGNORE_INDEX (-100) does not fit in uint16
    inputs, targets = (torch.cat(part) for part in zip(*batches))
    windows = [ds[i] for i in range(len(ds))]
    assert torch.equal(inputs[:24], torch.stack([x for x, _ in windows]))  # every window, once, in order
    assert torch.equal(targets[:24], torch.stack([y for _, y in windows]).long())
    assert (inputs[24:] == PAD_INPUT_ID).all() and (targets[24:] == IGNORE_INDEX).all()  # counted nowhere
    assert sum(len(b) for b in loader.batch_sampler) == 24  # the windows a loader scores: no padding row


def test_preparation_streams_in_bounded_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(encode, "CHUNK_CHARS", 1 << 14)
    monkeypatch.setattr(sources, "BLOCK_BYTES", 1 << 14)
    monkeypatch.setattr(writing, "COPY_BYTES", 1 << 14)
    line = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer\n"
    enc = get_tokenizer()  # built before measuring

    def peak_memory(lines: int) -> tuple[Path, int, int]:
        corpus = tmp_path / f"{lines}.txt"
        corpus.write_text("".join(f"{i} {line}" for i in range(lines)), encoding="utf-8")
        tracemalloc.start()
        try:
            prepared = prepare(DataConfig(corpus=str(corpus), prepared_dir=str(tmp_path / f"p{lines}")))
            return prepared, corpus.stat().st_size, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    _, _, small_peak = peak_memory(10_000)  # 0.9 MB
    prepared, size, peak = peak_memory(40_000)  # 3.6 MB: its text whole would be 3.6 MB, its tokens 30 MB
    assert peak < 1.5 * small_peak and peak < size / 4, (small_peak, peak)  # does not grow with the file
    tokens = np.concatenate([np.fromfile(prepared / f"{split}.bin", dtype=np.uint16) for split in ("train", "val")])
    assert tokens.tolist() == enc.encode_ordinary((tmp_path / "40000.txt").read_text(encoding="utf-8"))


def test_training_windows_read_the_token_file_through_a_memmap(corpus_file, tmp_path):
    prepared = prepare(DataConfig(corpus=str(corpus_file), prepared_dir=str(tmp_path / "p")))
    windows = load_split(prepared, "train", 8, 8)
    assert isinstance(windows.tokens, np.memmap) and Path(windows.tokens.filename) == prepared / "train.bin"
    with open(prepared / "train.bin", "r+b") as f:  # change the file on disk ...
        f.write(np.array([7, 8, 9], dtype=np.uint16).tobytes())
    x, y = windows[0]
    assert x[:3].tolist() == [7, 8, 9] and y[:2].tolist() == [8, 9]  # ... and the windows see it: no copy
