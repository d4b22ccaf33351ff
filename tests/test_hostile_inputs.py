"""Every bad input of docs/bad-input.md's table: one `error:` line naming what is wrong and what to do,
exit code 2, no traceback, and every file that existed before left byte for byte as it was."""

import hashlib
import json
import pickle
import re
import shutil
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import chat
import generate
import train
from gpt.gpt2 import export
from gpt.tools import attention_map, evaluate, multiple_choice
from gpt.model import GPTModel, ModelConfig

TRAIN, GENERATE, ATTENTION_MAP, CHAT, EVALUATE, EXPORT = train, generate, attention_map, chat, evaluate, export


class Payload:
    """Unpickling this runs code (it creates a file): what weights_only=True must refuse."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> SimpleNamespace:
    """A folder holding a trained run, bad configs, bad corpora and bad checkpoints."""
    root = tmp_path_factory.mktemp("world")
    w = SimpleNamespace(root=root, run=root / "run")
    assert train.main(["--config", "tiny.yaml", f"--train.out_dir={w.run}", "--train.max_iters=2",
                       "--sample.max_new_tokens=1"]) == 0

    def text(name: str, content: str | bytes) -> Path:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        return path

    w.typo = text("typo.yaml", "model:\n  n_layer: 2\n")
    w.typed = text("typed.yaml", "train:\n  max_iters: many\n")
    w.broken = text("broken.yaml", "model:\n  n_layers: [\n")
    w.section = text("section.yaml", "modle:\n  n_layers: 2\n")
    w.latin_yaml = text("latin.yaml", "# Ophélie\n".encode("latin-1"))
    w.empty = text("empty.txt", " \n\n")
    w.latin = text("latin.txt", "Ophélie ".encode("latin-1") * 100)
    w.short = text("short.txt", "Too short to train on. " * 3)
    text("no-text/table.csv", "a,b\n")
    w.no_text = root / "no-text"
    w.bad_json = text("bad.jsonl", '{"text": "fine"}\nnot json\n')
    w.no_field = text("no-field.jsonl", json.dumps({"title": "T", "body": "words"}) + "\n")
    w.number = text("number.jsonl", json.dumps({"text": 42}) + "\n")
    w.blank_records = text("blank.jsonl", '{"text": ""}\n{"text": "  \\n "}\n')
    w.no_column = root / "no-column.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"title": ["a play"]}), w.no_column)
    except ImportError:  # the case that needs it is skipped
        pass
    w.in_the_way = text("a-file", "not a folder")
    item = {"context": "The fox ran into the", "endings": ["woods.", "sky."], "label": 0}
    w.bad_items = text("bad-items.jsonl", json.dumps(item) + "\n" + json.dumps({**item, "label": 2}) + "\n")
    w.long_items = text("long-items.jsonl", json.dumps({**item, "endings": ["woods.", "sky " * 40]}) + "\n")

    latest = (w.run / "latest.pt").read_bytes()
    w.truncated_run = text("truncated-run/latest.pt", latest[: len(latest) // 2]).parent
    w.garbage = text("garbage.pt", b"not a checkpoint")
    w.empty_pt = text("empty.pt", b"")
    w.pickle = text("plain.pkl", pickle.dumps({"model": {}, "config": {}}, protocol=4))
    w.evil_run = root / "evil-run"
    w.evil_run.mkdir()
    torch.save({"model": Payload(root / "pwned"), "config": {}}, w.evil_run / "latest.pt")
    w.weights_only_run = root / "weights-only-run"
    w.weights_only_run.mkdir()
    shutil.copy(w.run / "best.pt", w.weights_only_run / "latest.pt")
    state = torch.load(w.run / "best.pt", weights_only=True)
    state["config"]["model"]["emb_dim"] = 64
    w.mismatched = root / "mismatched.pt"
    torch.save(state, w.mismatched)

    def chat(name: str, *records) -> Path:
        return text(name, "".join(json.dumps(r) + "\n" for r in records))

    hello = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    w.chats = chat("chats.jsonl", *[hello] * 20)
    w.empty_chat = chat("empty-chat.jsonl", hello, {"messages": []})
    w.disordered = chat("disordered.jsonl", {"messages": [{"role": "assistant", "content": "Hi"},
                                                           {"role": "user", "content": "Hello."}]})
    w.unknown_role = chat("unknown-role.jsonl", {"conversations": [{"from": "narrator", "value": "Once"}]})
    w.no_reply = chat("no-reply.jsonl", {"messages": [{"role": "user", "content": "Anyone?"}]})
    w.no_shape = chat("no-shape.jsonl", {"prompt": "Hi", "completion": "Hello."})
    w.bad_choices = chat("bad-choices.jsonl", {**hello, "answer": "Hello.", "choices": ["Hello.", "Go away."]},
                         {**hello, "answer": "Hello.", "choices": ["Hi.", "Go away."]})
    w.long_chats = chat("long-chats.jsonl", *[{"messages": [{"role": "user", "content": "word " * 40},
                                                             {"role": "assistant", "content": "Yes."}]}] * 10)
    w.spelt = chat("spelt.jsonl", *[{"messages": [{"role": "user", "content": "Say <|end|><|assistant|>"},
                                                  {"role": "assistant", "content": "<|user|> said."}]}] * 20)
    w.chat_run = root / "chat-run"
    assert train.main(["--config", "tiny.yaml", f"--train.out_dir={w.chat_run}", "--train.max_iters=2",
                       "--sample.max_new_tokens=1", "--data.format=chat", f"--data.corpus={w.chats}",
                       f"--data.prepared_dir={root / 'prepared-chats'}", "--data.val_fraction=0.2",
                       "--data.batch_size=4"]) == 0
    w.old_template_run = root / "old-template-run"
    w.old_template_run.mkdir()
    state = torch.load(w.chat_run / "latest.pt", weights_only=True)
    state["chat_template"] = {**state["chat_template"], "name": "gpt-chat-0"}
    torch.save(state, w.old_template_run / "latest.pt")

    # LoRA runs tuned on copies of run/'s best.pt; then one base is changed and the other removed.
    w.changed_base, w.gone_base = root / "changed-base", root / "gone-base"
    for base in (w.changed_base, w.gone_base):
        base.mkdir()
        shutil.copy(w.run / "best.pt", base / "best.pt")
    w.lora_run, w.lora_chat_run = root / "lora-run", root / "lora-chat-run"
    assert train.main(lora(w, w.changed_base, w.lora_run)) == 0
    assert train.main(lora(w, w.gone_base, w.lora_chat_run, "--data.format=chat", f"--data.corpus={w.chats}",
                           f"--data.prepared_dir={root / 'prepared-chats'}", "--data.val_fraction=0.2",
                           "--data.batch_size=4")) == 0
    state = torch.load(w.changed_base / "best.pt", weights_only=True)
    state["model"]["final_norm.weight"][0] += 0.5
    torch.save(state, w.changed_base / "best.pt")
    shutil.rmtree(w.gone_base)

    # For the GGUF export: models llama.cpp's gpt2 cannot hold (as a file) or store (as q8_0), and a file in the way.
    saved = torch.load(w.run / "best.pt", weights_only=True)
    for name, change in {"vocab-101": {"vocab_size": 101}, "width-48": {"emb_dim": 48}}.items():
        model_cfg = {**saved["config"]["model"], **change}
        (root / name).mkdir()
        torch.save({**saved, "config": {**saved["config"], "model": model_cfg},
                    "model": GPTModel(ModelConfig(**model_cfg)).state_dict()}, root / name / "best.pt")
    w.vocab_101_run, w.width_48_run = root / "vocab-101", root / "width-48"
    w.existing_gguf = text("existing.gguf", "mine")
    return w


def lora(w, base: Path, out: Path, *more) -> list[str]:
    """A LoRA run of rank 2 tuned on the run in `base` (2 steps, unless `more` says otherwise)."""
    return ["--config", "tiny.yaml", f"--train.init_from={base}", f"--train.out_dir={out}", "--train.max_iters=2",
            "--train.optimizer=adamw", "--train.lora.rank=2", "--sample.max_new_tokens=1", *more]


def torchrun_processes(count: int):
    """A setup: this process looks like rank 0 of `count` started by torchrun (none of which connect)."""
    def setup(monkeypatch):
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": str(count),
                           "LOCAL_WORLD_SIZE": str(count)}.items():
            monkeypatch.setenv(key, value)
    return setup


def out_of_memory_in(mode: str):
    """A setup: the model's forward pass raises CUDA's out-of-memory error in `mode` (train or eval)."""
    def setup(monkeypatch):
        forward = GPTModel.forward

        def failing(self, idx, *args, **kwargs):
            if self.training == (mode == "train"):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total "
                                             "capacity of 79.19 GiB of which 3.06 MiB is free.")
            return forward(self, idx, *args, **kwargs)
        monkeypatch.setattr(GPTModel, "forward", failing)
    return setup


def hellaswag_out_of_reach(monkeypatch):
    """No HellaSwag file and no network: the pinned URL points at nothing."""
    monkeypatch.setattr(multiple_choice, "HELLASWAG_URL", "file:///nonexistent/hellaswag_val.jsonl")
    monkeypatch.setattr(multiple_choice, "TASK_DIR", Path("/nonexistent-tasks"))


def tiny(w, *more):
    return ["--config", "tiny.yaml", f"--train.out_dir={w.root / 'out'}", *more]


def resume(w, run, *more):
    return ["--config", "tiny.yaml", f"--train.out_dir={run}", "--resume", *more]


def chat_data(w, corpus, *more):
    return tiny(w, "--data.format=chat", f"--data.corpus={corpus}",
                f"--data.prepared_dir={w.root / ('prepared-' + Path(corpus).stem)}", *more)


def without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` fails as if not installed


def without_gguf(monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` fails as if not installed


def needs(module: str):
    return lambda monkeypatch: pytest.importorskip(module)


# (id, area, script, argv from the world, what the message must say[, a setup given monkeypatch:
# what the case needs or how it fails]);
# docs/bad-input.md's table.
CASES = [
    ("missing config", "config", TRAIN, lambda w: ["--config", "nope.yaml"],
     r"config 'nope.yaml' not found \(looked in \. and .*configs\); available: .*gpt2-124m.yaml, .*small.yaml, "
     r"tiny.yaml"),
    ("misspelt key", "config", TRAIN, lambda w: ["--config", str(w.typo)],
     r"unknown key model.n_layer in .*typo.yaml; did you mean model.n_layers\?"),
    ("value of the wrong type", "config", TRAIN, lambda w: ["--config", str(w.typed)],
     r"train.max_iters in .*typed.yaml must be int, got 'many'"),
    ("a run setting in the model section", "config", TRAIN, lambda w: ["--config", "tiny.yaml", "--model.init_from=gpt2"],
     r"model.init_from in the command line is a setting of the run, not of the architecture: write it as "
     r"train.init_from"),
    ("broken YAML", "config", TRAIN, lambda w: ["--config", str(w.broken)],
     r"broken.yaml is not valid YAML at line 3; fix the syntax"),
    ("unknown section", "config", TRAIN, lambda w: ["--config", str(w.section)],
     r"unknown section 'modle' in .*; sections are model, data, train, sample"),
    ("config not UTF-8", "config", TRAIN, lambda w: ["--config", str(w.latin_yaml)],
     r"latin.yaml is not UTF-8 text; save it as UTF-8"),
    ("impossible model", "config", TRAIN, lambda w: tiny(w, "--model.n_heads=3"),
     r"model.emb_dim \(32\) must be divisible by model.n_heads \(3\)"),
    ("unknown override", "command line", TRAIN, lambda w: tiny(w, "--train.lr=1"),
     r"unknown key train.lr in the command line; known keys: out_dir, max_iters"),
    ("override of the wrong type", "command line", TRAIN, lambda w: tiny(w, "--train.max_iters=lots"),
     r"train.max_iters in the command line must be int, got 'lots'"),
    ("unknown option", "command line", TRAIN, lambda w: tiny(w, "--fast"),
     r"unknown option --fast; use --config FILE and --section.key=value overrides"),
    ("option without its value", "command line", TRAIN, lambda w: ["--config"],
     r"argument --config: expected one argument; see \S+ --help"),
    ("--resume with --overwrite", "command line", TRAIN, lambda w: resume(w, w.run, "--overwrite"),
     r"argument --overwrite: not allowed with argument --resume"),
    ("device that is not there", "command line", TRAIN,
     lambda w: tiny(w, "--train.device=cuda" if not torch.cuda.is_available() else "--train.device=tpu"),
     r"train.device is 'cuda' but CUDA is not available; use auto or cpu" if not torch.cuda.is_available()
     else r"train.device must be auto, cpu, mps or cuda\[:N\], got 'tpu'"),
    ("option value not a number", "command line", GENERATE, lambda w: ["Hi", "--max-new-tokens", "many"],
     r"argument --max-new-tokens: invalid int value: 'many'; see \S+ --help"),
    ("sampling device that is not there", "command line", GENERATE,
     lambda w: ["Hi", "--checkpoint", str(w.run), "--device", "tpu"],
     r"--device must be auto, cpu, mps or cuda\[:N\], got 'tpu'"),
    ("top-p out of range", "command line", GENERATE, lambda w: ["Hi", "--checkpoint", str(w.run), "--top-p", "2"],
     r"--top-p: sample.top_p must be in \(0, 1\] \(or null\), got 2.0"),
    ("attention map of a layer the model lacks", "command line", ATTENTION_MAP,
     lambda w: ["Hi", "--checkpoint", str(w.run), "--layer", "2"],
     r"--layer 2 is out of range: .*run/best.pt has 2 layers, numbered 0 to 1"),
    ("attention map of a head the model lacks", "command line", ATTENTION_MAP,
     lambda w: ["Hi", "--checkpoint", str(w.run), "--head", "2"],
     r"--head 2 is out of range: .*run/best.pt has 2 heads, numbered 0 to 1"),
    ("missing corpus", "data", TRAIN, lambda w: tiny(w, f"--data.corpus={w.root / 'none.txt'}"),
     r"data.corpus '.*none.txt' does not exist; give a text, JSONL or Parquet file, a folder of them, hf:NAME "
     r"for a Hugging Face dataset, or 'shakespeare'"),
    ("blank corpus", "data", TRAIN, lambda w: tiny(w, f"--data.corpus={w.empty}"),
     r"corpus '.*empty.txt' is empty; give it some text"),
    ("corpus not UTF-8", "data", TRAIN, lambda w: tiny(w, f"--data.corpus={w.latin}"),
     r"latin.txt is not UTF-8 text \(bad byte at offset 3\); convert it, e.g. `iconv -f latin1 -t utf-8`"),
    ("folder without text files", "data", TRAIN, lambda w: tiny(w, f"--data.corpus={w.no_text}"),
     r"corpus folder .*no-text holds no .txt, .md, .jsonl, .jsonl.gz or .parquet files; add some or name a file"),
    ("JSONL line that is not JSON", "data", TRAIN, lambda w: tiny(w, f"--data.corpus={w.bad_json}"),
     r"bad.jsonl line 2 is not JSON \(Expecting value at column 1\); each line must be one JSON object, e.g. "
     r'\{"text": "..."\}'),
    ("record without the text field", "data", TRAIN, lambda w: tiny(w, f"--data.corpus={w.no_field}"),
     r"no-field.jsonl line 1 has no field 'text' \(its fields: title, body\); set data.text_field to the one "
     r"that holds the text"),
    ("text field that is not a string", "data", TRAIN, lambda w: tiny(w, f"--data.corpus={w.number}"),
     r"number.jsonl line 1: field 'text' is int, not a string; set data.text_field to a field that holds text"),
    ("Parquet file without the column", "data", TRAIN, lambda w: tiny(w, f"--data.corpus={w.no_column}"),
     r"no-column.parquet has no column 'text' \(its columns: title\); set data.text_field to the column that "
     r"holds the text", needs("pyarrow")),
    ("hf: without datasets installed", "data", TRAIN,
     lambda w: tiny(w, "--data.corpus=hf:HuggingFaceFW/fineweb-edu"),
     r"data.corpus 'hf:HuggingFaceFW/fineweb-edu' needs the datasets library: pip install pyarrow datasets, "
     r'or pip install -e "\.\[datasets\]"', without_datasets),
    ("Hugging Face dataset out of reach", "data", TRAIN,
     lambda w: tiny(w, "--data.corpus=hf:no-such-user/no-such-dataset"),
     r"cannot open Hugging Face dataset 'no-such-user/no-such-dataset', split 'train' \(Couldn't reach .*\); "
     r"check the name, config and split, and the connection, or download its files and set data.corpus to "
     r"their folder", needs("datasets")),
    ("corpus with no text after blank records", "data", TRAIN, lambda w: tiny(w, f"--data.corpus={w.blank_records}"),
     r"corpus '.*blank.jsonl' is empty \(every record's 'text' is blank\); give it some text"),
    ("data.max_tokens below one window", "data", TRAIN, lambda w: tiny(w, "--data.max_tokens=20"),
     r"data.max_tokens 20 leaves the train split 18 tokens at data.val_fraction 0.1, fewer than one window of "
     r"33; raise data.max_tokens or leave it unset"),
    ("corpus shorter than a window", "data", TRAIN,
     lambda w: tiny(w, f"--data.corpus={w.short}", f"--data.prepared_dir={w.root / 'prepared-short'}"),
     r"the train split of .* has 18 tokens, fewer than one window of 33; use more text or a smaller "
     r"model.context_length"),
    ("batch larger than the data", "data", TRAIN, lambda w: tiny(w, "--data.batch_size=100000"),
     r"the train split has \d+ windows, fewer than data.batch_size 100000; use more text, a smaller "
     r"batch_size or a smaller stride"),
    ("prepared_dir not writable", "data", TRAIN,
     lambda w: tiny(w, f"--data.corpus={w.short}", f"--data.prepared_dir={w.in_the_way / 'prepared'}"),
     r"cannot write the prepared corpus in .*a-file/prepared \(Not a directory\); free some disk space or set "
     r"data.prepared_dir"),
    ("out_dir not writable", "run folder", TRAIN, lambda w: ["--config", "tiny.yaml",
                                                           f"--train.out_dir={w.in_the_way / 'run'}"],
     r"cannot create train.out_dir .*a-file/run \(Not a directory\); choose a folder you can write to"),
    ("fresh run over an existing one", "run folder", TRAIN,
     lambda w: ["--config", "tiny.yaml", f"--train.out_dir={w.run}"],
     r"/run already holds a run \(latest.pt and best.pt\); continue it with --resume, replace it with "
     r"--overwrite, or set train.out_dir to another folder"),
    ("--resume with nothing to resume", "run folder", TRAIN, lambda w: resume(w, w.root / "out"),
     r"--resume: there is no latest.pt in .*out to continue; start a fresh run without --resume"),
    ("--resume with another model", "checkpoint", TRAIN,
     lambda w: resume(w, w.run, "--model.n_layers=3", "--model.emb_dim=64"),
     r"latest.pt holds another model than the config asks for \(model.emb_dim: checkpoint 32, config 64; "
     r"model.n_layers: checkpoint 2, config 3\); resume with the checkpoint's model settings"),
    ("--resume with another optimizer", "checkpoint", TRAIN, lambda w: resume(w, w.run, "--train.optimizer=adamw"),
     r"latest.pt was trained with train.optimizer muon and the config asks for adamw: its optimizer state "
     r"cannot carry over; resume with --train.optimizer=muon, or start a new run with --overwrite or another "
     r"train.out_dir"),
    ("--resume a finished run", "checkpoint", TRAIN, lambda w: resume(w, w.run, "--train.max_iters=2"),
     r"the run in .*run is already at step 2 and train.max_iters is 2; raise it \(e.g. "
     r"--train.max_iters=4\) to train further"),
    ("--resume from a truncated checkpoint", "checkpoint", TRAIN, lambda w: resume(w, w.truncated_run),
     r"cannot read checkpoint .*truncated-run/latest.pt: it is truncated or damaged \(PytorchStreamReader "
     r"failed reading zip archive: failed finding central directory\); use another checkpoint or train again"),
    ("--resume from a code-running pickle", "checkpoint", TRAIN, lambda w: resume(w, w.evil_run),
     r"cannot read checkpoint .*evil-run/latest.pt: unpickling it would call getattr, and a checkpoint "
     r"written by train.py never runs code; refused, nothing was run. Use a checkpoint you trust"),
    ("--resume from a weights-only file", "checkpoint", TRAIN, lambda w: resume(w, w.weights_only_run),
     r"latest.pt cannot be resumed: it has no optimizer, scaler, data, rng \(only latest.pt files written by "
     r"train.py can\); start again with --overwrite"),
    ("no checkpoint to sample from", "checkpoint", GENERATE, lambda w: ["Hi", "--checkpoint", str(w.root)],
     r"no checkpoint in .* \(looked for best.pt and latest.pt\); train one first"),
    ("no checkpoint to map the attention of", "checkpoint", ATTENTION_MAP,
     lambda w: ["Hi", "--checkpoint", str(w.root)],
     r"no checkpoint in .* \(looked for best.pt and latest.pt\); train one first \(python train.py --config "
     r"small.yaml\) or pass --checkpoint RUN_DIR"),
    ("checkpoint that does not exist", "checkpoint", GENERATE,
     lambda w: ["Hi", "--checkpoint", str(w.root / "nowhere.pt")],
     r"no checkpoint at .*nowhere.pt; train one first \(python train.py --config small.yaml\) or pass "
     r"--checkpoint RUN_DIR"),
    ("truncated checkpoint", "checkpoint", GENERATE, lambda w: ["Hi", "--checkpoint", str(w.truncated_run)],
     r"cannot read checkpoint .*truncated-run/latest.pt: it is truncated or damaged"),
    ("empty checkpoint file", "checkpoint", GENERATE, lambda w: ["Hi", "--checkpoint", str(w.empty_pt)],
     r"cannot read checkpoint .*empty.pt: it is truncated or damaged \(the file is empty\)"),
    ("plain pickle, not a checkpoint", "checkpoint", GENERATE, lambda w: ["Hi", "--checkpoint", str(w.pickle)],
     r"cannot read checkpoint .*plain.pkl: it is not a PyTorch checkpoint; give a latest.pt or best.pt written "
     r"by train.py"),
    ("file that is not a checkpoint", "checkpoint", GENERATE, lambda w: ["Hi", "--checkpoint", str(w.garbage)],
     r"cannot read checkpoint .*garbage.pt: it is not a PyTorch checkpoint"),
    ("code-running pickle", "checkpoint", GENERATE, lambda w: ["Hi", "--checkpoint", str(w.evil_run)],
     r"cannot read checkpoint .*evil-run/latest.pt: unpickling it would call getattr"),
    ("weights that do not fit the config", "checkpoint", GENERATE,
     lambda w: ["Hi", "--checkpoint", str(w.mismatched)],
     r"the weights in .*mismatched.pt do not fit the model its config describes \(size mismatch for "
     r"tok_emb.weight: .*\); the file was damaged or edited: use another checkpoint"),
    ("global batch the processes cannot share", "torchrun", TRAIN, lambda w: tiny(w),
     r"the global batch, data.batch_size x train.grad_accum_steps = 8 x 1 = 8 windows, cannot be shared evenly "
     r"by 3 processes; start 1, 2, 4 or 8 processes \(--nproc_per_node\), or make the global batch a multiple "
     r"of 3: --data.batch_size=9 or --train.grad_accum_steps=3", torchrun_processes(3)),
    ("out of GPU memory in a training step", "memory", TRAIN, lambda w: resume(w, w.run, "--train.max_iters=4"),
     r"out of memory on cpu during training step 3 \(tried to allocate 20.00 MiB\) with batches of 8 windows x "
     r"32 tokens \(data.batch_size 8, model.context_length 32\); to fit, lower data.batch_size and raise "
     r"train.grad_accum_steps to keep the global batch \(e.g. --data.batch_size=4 --train.grad_accum_steps=2\), "
     r"set --train.activation_checkpointing=true, or lower model.context_length; the last checkpoint, "
     r".*run/latest.pt \(step 2\), is kept", out_of_memory_in("train")),
    ("out of GPU memory in an evaluation", "memory", TRAIN, lambda w: resume(w, w.run, "--train.max_iters=4"),
     r"out of memory on cpu during the evaluation at step 4 \(tried to allocate 20.00 MiB\) with batches of 8 "
     r"windows x 32 tokens .*; to fit, lower data.batch_size and raise train.grad_accum_steps to keep the global "
     r"batch \(e.g. --data.batch_size=4 --train.grad_accum_steps=2\), or lower model.context_length; the last "
     r"checkpoint, .*run/latest.pt \(step 2\), is kept", out_of_memory_in("eval")),
    ("empty conversation", "chat", TRAIN, lambda w: chat_data(w, w.empty_chat),
     r"empty-chat.jsonl line 2 is an empty conversation; give it a user and an assistant message"),
    ("roles out of order", "chat", TRAIN, lambda w: chat_data(w, w.disordered),
     r"disordered.jsonl line 1: roles out of order: message 1 is 'assistant' first \(after any system "
     r"message\); a conversation is \[system\], then user and assistant turns in alternation"),
    ("unknown role", "chat", TRAIN, lambda w: chat_data(w, w.unknown_role),
     r"unknown-role.jsonl line 1 message 1 has the unknown role 'narrator'; roles are system, human, user, gpt"),
    ("conversation without a reply", "chat", TRAIN, lambda w: chat_data(w, w.no_reply),
     r"no-reply.jsonl line 1 has no assistant turn, so nothing to learn; give each conversation a reply"),
    ("record in no conversation shape", "chat", TRAIN, lambda w: chat_data(w, w.no_shape),
     r"no-shape.jsonl line 1 is not a conversation \(its fields: prompt, completion\); a chat record holds "
     r"messages \(OpenAI\), conversations \(ShareGPT\) or instruction/input/output \(Alpaca\)"),
    ("an answer not among its choices", "chat", TRAIN, lambda w: chat_data(w, w.bad_choices),
     r"bad-choices.jsonl line 2: the answer 'Hello.' is not among its 2 choices; add it to \"choices\" or correct "
     r"the answer"),
    ("a chat corpus of plain text", "chat", TRAIN, lambda w: chat_data(w, w.short),
     r"short.txt is plain text; a chat corpus \(data.format: chat\) is JSONL, Parquet or hf: records"),
    ("conversations longer than any window", "chat", TRAIN, lambda w: chat_data(w, w.long_chats),
     r"no conversation of the train split of .*prepared-long-chats has a reply within the first 32 tokens: each of "
     r"the 9 is longer than any window; shorten the conversations or use a model with a longer "
     r"model.context_length"),
    ("fewer packed windows than a batch", "chat", TRAIN, lambda w: chat_data(w, w.chats, "--data.val_fraction=0.2"),
     r"the train split's 16 conversations pack into 4 windows of 32, fewer than data.batch_size 8; add "
     r"conversations, lower data.batch_size, or set data.pack: false for one conversation a window"),
    ("chat run resumed as a text run", "chat", TRAIN, lambda w: resume(w, w.chat_run, "--train.max_iters=4"),
     r"chat-run/latest.pt was trained with the chat template 'gpt-chat-1' and this run asks for none \(a text "
     r"run\) \(data.format text\); a run keeps its template"),
    ("chat run resumed with another template", "chat", TRAIN,
     lambda w: resume(w, w.old_template_run, "--train.max_iters=4", "--data.format=chat", f"--data.corpus={w.chats}"),
     r"old-template-run/latest.pt was trained with the chat template 'gpt-chat-0' and this run asks for "
     r"'gpt-chat-1' \(data.format chat\); a run keeps its template"),
    ("chat with a run never chat-tuned", "chat", CHAT, lambda w: ["--checkpoint", str(w.run), "--prompt", "Hi"],
     r"run/best.pt was never chat-tuned \(its checkpoint has no chat template\); fine-tune it first"),
    ("LoRA on a linear the model lacks", "lora", TRAIN,
     lambda w: tiny(w, f"--train.init_from={w.run}", "--train.optimizer=adamw", "--train.lora.targets=[W_qry]"),
     r"train.lora.targets names 'W_qry', which is not a linear of the model; give attention, mlp \(groups\) or "
     r"W_query, W_key, W_value, out_proj, ff.fc, ff.proj"),
    ("LoRA of rank 0", "lora", TRAIN,
     lambda w: tiny(w, f"--train.init_from={w.run}", "--train.optimizer=adamw", "--train.lora.rank=0"),
     r"train.lora.rank must be at least 1, got 0 \(in .*tiny.yaml and the command line\)"),
    ("LoRA with Muon", "lora", TRAIN, lambda w: tiny(w, f"--train.init_from={w.run}", "--train.lora.rank=2"),
     r"train.lora trains its adapters with AdamW, and train.optimizer is muon \(for whole matrices\); set "
     r"train.optimizer: adamw"),
    ("LoRA on random weights", "lora", TRAIN, lambda w: tiny(w, "--train.optimizer=adamw", "--train.lora.rank=2"),
     r"train.lora tunes adapters on pretrained weights, and train.init_from is scratch \(random weights, which "
     r"adapters cannot teach\); set train.init_from to gpt2, gpt2-medium, gpt2-large, gpt2-xl, a run folder or "
     r"Hugging Face weights, or leave train.lora out to train every weight"),
    ("--resume a LoRA run whose base changed", "lora", TRAIN,
     lambda w: lora(w, w.changed_base, w.lora_run, "--resume", "--train.max_iters=4"),
     r"lora-run/latest.pt holds LoRA adapters for train.init_from '.*changed-base' with weights of sha256 "
     r"[0-9a-f]{12}\.\.\., and '.*changed-base' now has other weights \(sha256 [0-9a-f]{12}\.\.\.\); put back "
     r"the weights the adapters were tuned on, or fine-tune again on these"),
    ("--resume a LoRA run without train.lora", "lora", TRAIN,
     lambda w: resume(w, w.lora_run, f"--train.init_from={w.changed_base}", "--train.max_iters=4"),
     r"lora-run/latest.pt was trained with train.lora rank 2, alpha 16.0, dropout 0.05, targets \['attention', "
     r"'mlp'\] and the config asks for none \(full fine-tuning\); resume with the run's train.lora"),
    ("generate from a LoRA run whose base changed", "lora", GENERATE, lambda w: ["Hi", "--checkpoint", str(w.lora_run)],
     r"lora-run/best.pt holds LoRA adapters for train.init_from '.*changed-base' with weights of sha256 "
     r"[0-9a-f]{12}\.\.\., and '.*changed-base' now has other weights"),
    ("chat with a LoRA run whose base is gone", "lora", CHAT,
     lambda w: ["--checkpoint", str(w.lora_chat_run), "--prompt", "Hi"],
     r"lora-chat-run/best.pt holds LoRA adapters, not a whole model, and their base cannot be loaded: "
     r"train.init_from '.*gone-base' is not scratch, a GPT-2 size"),
    ("export a LoRA run whose base is gone", "lora", EXPORT, lambda w: [str(w.lora_chat_run), str(w.root / "hf")],
     r"lora-chat-run/best.pt holds LoRA adapters, not a whole model, and their base cannot be loaded"),
    ("GGUF export of no run", "export", EXPORT, lambda w: [str(w.root / "nowhere"), str(w.root / "out.gguf")],
     r"no checkpoint at .*nowhere; train one first"),
    ("GGUF export of a folder that holds no run", "export", EXPORT, lambda w: [str(w.no_text), str(w.root / "out.gguf")],
     r"no checkpoint in .*no-text \(looked for best.pt and latest.pt\); train one first"),
    ("GGUF export in an unknown dtype", "export", EXPORT,
     lambda w: [str(w.run), str(w.root / "out.gguf"), "--dtype", "q4_0"],
     r"argument --dtype: invalid choice: '?q4_0'? \(choose from '?f32'?, '?f16'?, '?q8_0'?\); see python -m gpt export --help"),
    ("GGUF export over an existing file", "export", EXPORT, lambda w: [str(w.run), str(w.existing_gguf)],
     r"existing.gguf already exists; choose another name or pass --overwrite to replace it"),
    ("GGUF export of a vocabulary that is not GPT-2's", "export", EXPORT,
     lambda w: [str(w.vocab_101_run), str(w.root / "out.gguf")],
     r"vocab-101/best.pt has model.vocab_size 101, and a GGUF file for llama.cpp's gpt2 carries GPT-2's tokenizer "
     r"\(50257 ids\); export it to Hugging Face's format instead \(an OUT_DIR not ending in .gguf\)"),
    ("q8_0 of rows that are not whole blocks", "export", EXPORT,
     lambda w: [str(w.width_48_run), str(w.root / "out.gguf"), "--dtype", "q8_0"],
     r"--dtype q8_0 stores each row of weights in blocks of 32 values, and .*width-48/best.pt has model.emb_dim 48, "
     r"not a multiple of 32; use --dtype f16 or f32"),
    ("--dtype for a Hugging Face export", "export", EXPORT, lambda w: [str(w.run), str(w.root / "hf"), "--dtype", "f16"],
     r"--dtype is for a GGUF file \(OUT ending in .gguf, or --format gguf\); the Hugging Face export into .*hf "
     r"writes float32"),
    ("GGUF export without gguf installed", "export", EXPORT, lambda w: [str(w.run), str(w.root / "out.gguf")],
     r'writing GGUF needs the gguf package: pip install gguf, or pip install -e "\.\[gguf\]"', without_gguf),
    ("empty prompt", "prompt", GENERATE, lambda w: ["", "--checkpoint", str(w.run)],
     r'the prompt is empty; give some text to continue, e.g. "Your journey"'),
    ("empty prompt for the attention map", "prompt", ATTENTION_MAP, lambda w: ["", "--checkpoint", str(w.run)],
     r'the prompt is empty; give some text to look at, e.g. "Your journey starts with one step"'),
    ("no prompt", "prompt", GENERATE, lambda w: ["--checkpoint", str(w.run)],
     r"the following arguments are required: prompt; see \S+ --help"),
    ("empty prompt in the config", "prompt", TRAIN, lambda w: tiny(w, "--sample.prompt="),
     r"sample.prompt is empty; give some text to continue \(in .*tiny.yaml and the command line\)"),
    ("nothing to generate", "prompt", GENERATE,
     lambda w: ["Hi", "--checkpoint", str(w.run), "--max-new-tokens", "0"],
     r"--max-new-tokens: sample.max_new_tokens must be at least 1, got 0"),
    ("a bad line in a task file", "task", EVALUATE, lambda w: ["--checkpoint", str(w.run), "--task", str(w.bad_items)],
     r'bad-items.jsonl line 2: "label" must be the index of the right ending, 0 to 1, got 2'),
    ("a bad task file named in train.eval_tasks", "task", TRAIN, lambda w: tiny(w, f"--train.eval_tasks={w.bad_items}"),
     r'bad-items.jsonl line 2: "label" must be the index of the right ending, 0 to 1, got 2'),
    ("an unknown task", "task", EVALUATE, lambda w: ["--checkpoint", str(w.run), "--task", "hellaswog"],
     r"no task 'hellaswog': give hellaswag, shakespeare-next-words or a JSONL file of "),
    ("HellaSwag with no file and no network", "task", EVALUATE,
     lambda w: ["--checkpoint", str(w.run), "--task", "hellaswag"],
     r"could not download hellaswag_val.jsonl \(.*\); put it at /nonexistent-tasks/hellaswag_val.jsonl \(it is "
     r"data/hellaswag_val.jsonl of github.com/rowanz/hellaswag\)", hellaswag_out_of_reach),
    ("an ending longer than the model's context", "task", EVALUATE,
     lambda w: ["--checkpoint", str(w.run), "--task", str(w.long_items)],
     r"long-items.jsonl line 1: ending 1 is \d+ tokens, and the model's context \(32\) must hold it and a token of "
     r"context; shorten it"),
    ("an ending longer than the model's context in train.eval_tasks", "task", TRAIN,
     lambda w: tiny(w, f"--train.eval_tasks={w.long_items}"),
     r"long-items.jsonl line 1: ending 1 is \d+ tokens, and the model's context \(32\) must hold it"),
    ("--limit 0", "task", EVALUATE, lambda w: ["--checkpoint", str(w.run), "--task", str(w.long_items), "--limit", "0"],
     r"--limit must be at least 1, got 0"),
    ("train.eval_tasks not a list of names", "task", TRAIN, lambda w: tiny(w, "--train.eval_tasks=3"),
     r"train.eval_tasks in the command line must be a list of names, got 3"),
    ("negative temperature", "prompt", GENERATE, lambda w: ["Hi", "--checkpoint", str(w.run), "--temperature", "-1"],
     r"--temperature: sample.temperature must be 0 or more, got -1.0"),
]


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file()}


def exit_code(script, argv: list[str]) -> int:
    try:
        return script.main(argv)
    except SystemExit as e:  # argparse stops this way
        return e.code


# Inputs that look wrong but are not mistakes: they train, and what happened is said (rows of docs/bad-input.md too).
ACCEPTED = [
    ("template marker inside the content", "chat", TRAIN,
     lambda w: chat_data(w, w.spelt, "--train.max_iters=1", "--sample.max_new_tokens=1", "--data.batch_size=2",
                         f"--train.out_dir={w.root / 'spelt-run'}"),
     r"20 spell a template marker in their text, kept as plain text"),
]


def test_the_table_is_large_and_covers_every_area():
    assert len(CASES) >= 20 and len({case[0] for case in CASES}) == len(CASES)
    assert {case[1] for case in CASES} == {"config", "command line", "torchrun", "data", "run folder", "checkpoint",
                                           "memory", "prompt", "chat", "task", "lora", "export"}


@pytest.mark.parametrize("case,script,argv,message", [(c[0], *c[2:5]) for c in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_accepted_input_trains_and_says_what_happened(world, case, script, argv, message, capsys):
    assert script.main(argv(world)) == 0
    assert re.search(message, capsys.readouterr().out)
    from gpt.chat.template import SPECIAL_IDS
    import numpy as np
    ids = np.fromfile(world.root / "prepared-spelt" / "train.bin", dtype=np.uint16)
    assert (ids >= 50256).sum() == 5 * 18  # per conversation: <|endoftext|> <|user|> <|end|> <|assistant|> <|end|>
    assert set(ids[ids >= 50256].tolist()) == {50256, *SPECIAL_IDS.values()} - {SPECIAL_IDS["<|system|>"]}


@pytest.mark.parametrize("case,script,argv,message,setup", [(*c[:1], *c[2:5], c[5] if len(c) > 5 else None)
                                                             for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_input_is_one_clear_line_and_loses_nothing(world, case, script, argv, message, setup, capsys,
                                                          monkeypatch):
    if setup is not None:
        setup(monkeypatch)
    before = snapshot(world.root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = exit_code(script, argv(world))
    out, err = capsys.readouterr()
    assert not caught, [str(w.message) for w in caught]  # run for real, each is more on stderr
    assert code == 2, (out, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and re.search(message, err), err
    after = snapshot(world.root)
    assert {name: after.get(name) for name in before} == before  # nothing lost or changed
    assert not [name for name in after if name not in before and name.endswith((".pt", ".gguf", ".tmp"))]  # nothing saved
    assert not (world.root / "pwned").exists()  # the pickle's code never ran


def test_the_guide_table_has_a_row_for_each_case():
    guide = (Path(__file__).resolve().parent.parent / "docs" / "bad-input.md").read_text(encoding="utf-8")
    areas = [line.split("|")[1].strip() for line in guide.splitlines() if line.startswith("| ")]
    assert sorted(area for area in areas if area not in ("", "---")) == sorted(case[1] for case in CASES + ACCEPTED)
