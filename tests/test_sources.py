"""Corpora of JSONL, Parquet, mixed folders and Hugging Face datasets, prepared on several processes."""

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest

from gpt.config import DataConfig
from gpt.corpus import encode
from gpt.corpus.prepare import prepare
from gpt.errors import UserError
from gpt.tokenizer import EOT_ID, get_tokenizer


def expected_tokens(documents: list[str]) -> list[int]:
    """Each non-blank document tokenised whole, joined by <|endoftext|>: what preparation must give."""
    enc, tokens = get_tokenizer(), []
    for text in (d for d in documents if d.strip()):
        tokens += ([EOT_ID] if tokens else []) + enc.encode_ordinary(text)
    return tokens


def prepared_tokens(prepared: Path) -> list[int]:
    return np.concatenate([np.fromfile(prepared / f"{split}.bin", dtype=np.uint16)
                           for split in ("train", "val")]).tolist()


def write_jsonl(path: Path, records: list, compress: bool = False) -> Path:
    lines = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    path.write_bytes(gzip.compress(lines.encode()) if compress else lines.encode())
    return path


def write_parquet(path: Path, columns: dict, row_group_size: int = 2) -> Path:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


DOCS = [f"Document {i}: the quick brown fox, café ünïcode, line {i * 7 % 13}.\n" * (i % 4 + 1) for i in range(12)]


def test_a_folder_mixing_every_kind_is_read_in_path_order(tmp_path, capsys):
    folder = tmp_path / "corpus"
    (folder / "b").mkdir(parents=True)
    (folder / "a.txt").write_text(DOCS[0], encoding="utf-8")
    write_jsonl(folder / "b" / "c.jsonl", [{"body": DOCS[1], "id": 1}, "", {"body": "  \n"}, {"body": DOCS[2]}])
    write_jsonl(folder / "b" / "d.jsonl.gz", [{"body": DOCS[3]}, {"body": DOCS[4]}], compress=True)
    write_parquet(folder / "e.parquet", {"body": DOCS[5:10], "n": list(range(5))})  # 3 row groups
    (folder / "f.md").write_text(DOCS[10], encoding="utf-8")
    (folder / "notes.csv").write_text("not, a, corpus", encoding="utf-8")
    cfg = DataConfig(corpus=str(folder), text_field="body", prepared_dir=str(tmp_path / "p"), num_proc=2)
    prepared = prepare(cfg)
    # Sorted by path: a.txt, b/c.jsonl (blank line and blank record skipped), b/d.jsonl.gz, e.parquet, f.md.
    assert prepared_tokens(prepared) == expected_tokens(DOCS[:11])
    meta = json.loads((prepared / "meta.json").read_text())
    assert meta["documents"] == 11 and meta["source"]["text_field"] == "body"

    stamp = (prepared / "train.bin").stat().st_mtime_ns
    assert prepare(cfg) == prepared and (prepared / "train.bin").stat().st_mtime_ns == stamp  # reused
    with pytest.raises(UserError, match=r"c.jsonl line 1 has no field 'text' \(its fields: body, id\)"):
        prepare(DataConfig(corpus=str(folder), prepared_dir=str(tmp_path / "p")))  # another field: read again
    assert (prepared / "train.bin").stat().st_mtime_ns == stamp  # and the failure left the files alone


def test_token_files_are_byte_identical_for_any_number_of_processes(tmp_path, monkeypatch):
    monkeypatch.setattr(encode, "CHUNK_CHARS", 2000)  # many tasks, and long documents cut in pieces
    documents = [DOCS[i % 12] * (1 + i % 50) for i in range(300)]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": d} for d in documents])
    digests = set()
    for num_proc in (1, 2, 3):
        prepared = prepare(DataConfig(corpus=str(corpus), prepared_dir=str(tmp_path / f"p{num_proc}"),
                                      num_proc=num_proc))
        digests.add(b"".join((prepared / f"{split}.bin").read_bytes() for split in ("train", "val")))
    assert len(digests) == 1
    assert np.frombuffer(digests.pop(), dtype=np.uint16).tolist() == expected_tokens(documents)


def test_max_tokens_keeps_the_first_tokens_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(encode, "CHUNK_CHARS", 500)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": d} for d in DOCS * 5])
    cfg = DataConfig(corpus=str(corpus), max_tokens=777, num_proc=2, prepared_dir=str(tmp_path / "p"))
    prepared = prepare(cfg)
    assert prepared_tokens(prepared) == expected_tokens(DOCS * 5)[:777]
    meta = json.loads((prepared / "meta.json").read_text())
    assert (meta["train_tokens"], meta["val_tokens"], meta["max_tokens"]) == (700, 77, 777)


def test_val_corpus_is_the_whole_val_split(tmp_path, capsys):
    train_file, val_file = tmp_path / "train.txt", tmp_path / "val.jsonl"
    train_file.write_text("".join(DOCS), encoding="utf-8")
    write_jsonl(val_file, [{"text": d} for d in DOCS[:3]])
    cfg = DataConfig(corpus=str(train_file), val_corpus=str(val_file), prepared_dir=str(tmp_path / "p"))
    prepared = prepare(cfg)
    assert np.fromfile(prepared / "train.bin", dtype=np.uint16).tolist() == expected_tokens(["".join(DOCS)])
    assert np.fromfile(prepared / "val.bin", dtype=np.uint16).tolist() == expected_tokens(DOCS[:3])
    meta = json.loads((prepared / "meta.json").read_text())
    assert meta["val_fraction"] is None and meta["val_corpus"]["text_field"] == "text"
    write_jsonl(val_file, [{"text": DOCS[4]}])
    os.utime(val_file, ns=(1, 1))  # another size and time: the val split is made again
    prepare(cfg)
    assert np.fromfile(prepared / "val.bin", dtype=np.uint16).tolist() == expected_tokens(DOCS[4:5])
    assert "preparing again" in capsys.readouterr().out


def test_files_prepared_before_these_settings_existed_are_reused(corpus_file, tmp_path):
    cfg = DataConfig(corpus=str(corpus_file), prepared_dir=str(tmp_path / "p"))
    prepared = prepare(cfg)
    meta = json.loads((prepared / "meta.json").read_text())
    for key in ("val_corpus", "max_tokens"):  # what meta.json held before them
        del meta[key]
    (prepared / "meta.json").write_text(json.dumps(meta))
    stamp = (prepared / "train.bin").stat().st_mtime_ns
    prepare(cfg)
    assert (prepared / "train.bin").stat().st_mtime_ns == stamp


def test_hf_source_streams_a_local_dataset_through_datasets(tmp_path):
    pytest.importorskip("datasets")
    folder = tmp_path / "dataset"
    folder.mkdir()
    write_parquet(folder / "part-0.parquet", {"text": DOCS[:5]})
    write_parquet(folder / "part-1.parquet", {"text": DOCS[5:8]})
    cfg = DataConfig(corpus=f"hf:{folder}", prepared_dir=str(tmp_path / "p"), num_proc=1)
    prepared = prepare(cfg)
    assert prepared_tokens(prepared) == expected_tokens(DOCS[:8])
    assert json.loads((prepared / "meta.json").read_text())["source"] == {
        "hf": str(folder), "config": None, "split": "train", "text_field": "text"}
    for shard in folder.iterdir():
        shard.unlink()
    assert prepare(cfg) == prepared  # reused from the name, config and split: nothing is read
    with pytest.raises(UserError, match=r"cannot open Hugging Face dataset .*dataset', split 'test'"):
        prepare(DataConfig(corpus=f"hf:{folder}", hf_split="test", prepared_dir=str(tmp_path / "q")))
    assert not (tmp_path / "q").exists()  # nothing written


def test_prepare_command_makes_the_files_train_py_reuses(corpus_file, tmp_path, capsys):
    from gpt.tools import prepare as prepare_command

    argv = ["--config", "tiny.yaml", f"--data.corpus={corpus_file}", f"--data.prepared_dir={tmp_path / 'p'}"]
    assert prepare_command.main(argv) == 0
    assert f"token files ready in {tmp_path / 'p'}" in capsys.readouterr().out
    stamp = (tmp_path / "p" / "train.bin").stat().st_mtime_ns
    assert prepare(DataConfig(corpus=str(corpus_file), prepared_dir=str(tmp_path / "p"))) == tmp_path / "p"
    assert (tmp_path / "p" / "train.bin").stat().st_mtime_ns == stamp  # what a training run finds: reused
