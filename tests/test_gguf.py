"""The GGUF export, checked by llama.cpp itself (llama-cpp-python builds it from source), not by a
reader of ours: it loads each file, tokenizes, computes logits, decodes greedily and renders a chat,
and the results are compared with ours. Skipped where llama_cpp or gguf is not installed
(requirements-dev.txt has both).

Logits are compared as max |llama.cpp's logit - ours| over the prompt's positions and the real
vocabulary, against our largest |logit|, with llama.cpp's default settings (llama-cpp-python 0.3.36):
its KV cache holds float16, and its GELU reads a float16 table, so even f32 weights do not give
float32's logits. Measured, with the bounds the tests hold:

| dtype | random weights (every parameter N(0, 0.3)) | bound | the trained chat run | bound |
| --- | --- | --- | --- | --- |
| f32 | 0.7e-3 to 2.1e-3 (the text and LoRA runs, the models in memory) | 5e-3 | 7.1e-5 | 3e-4 |
| f16 | 1.6e-3 | 5e-3 | 2.9e-4 | 1e-3 |
| q8_0 | 6.1e-2 | 0.1 | 4.7e-3 | 1.5e-2 |

A mistake in the tensors shows far above those: one attention output transposed, key and value
swapped, a LayerNorm's weight and bias swapped or the position rows shifted gave 0.7 to 1.1, the
attention biases of one layer left at zero 0.16. Random weights are q8_0's worst case (its blocks of
32 share one scale, and nothing in them is peaked); on them its greedy tokens first differed from ours
after 0 to 39 tokens. So greedy decoding is checked for 64 tokens at f32 on every model, and at f16 and
q8_0 on the trained chat run, where all 64 agreed at each (at least 16 are required).
"""

import contextlib
import json

import numpy as np
import pytest
import torch

import train
from conftest import randomised
from gpt.checkpoint import load_checkpoint
from gpt.errors import UserError
from gpt.gpt2 import export, gguf_export
from gpt.checkpoint import load_model
from gpt.model import GPTModel, ModelConfig
from gpt.sampling import SampleConfig, generate
from gpt.tokenizer import EOT_ID, get_tokenizer

gguf = pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

CONTEXT = 96  # model.context_length of the models here: a prompt and 64 greedy tokens
PROMPT = "To be, or not to be: that is the question."
GREEDY = 64
# max |llama.cpp's logit - ours| / max |our logit|, by dtype (measured: the module's docstring)
TOLERANCE = {"f32": 5e-3, "f16": 5e-3, "q8_0": 0.1}  # random weights
TRAINED_TOLERANCE = {"f32": 3e-4, "f16": 1e-3, "q8_0": 1.5e-2}  # the chat run
LINE = "Now is the winter of our discontent made glorious summer by this sun of York."


def llama(path, **options):
    """llama.cpp's model from `path` (closed on leaving the `with`), with its default settings."""
    return contextlib.closing(llama_cpp.Llama(str(path), n_ctx=256, verbose=False, **options))


def llama_logits(path, ids: list[int]) -> np.ndarray:
    """(len(ids), n_vocab) logits llama.cpp computes for `ids`."""
    with llama(path, logits_all=True) as llm:
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)])


def llama_greedy(path, ids: list[int], n: int = GREEDY) -> list[int]:
    """The `n` tokens llama.cpp's greedy sampler picks after `ids` (not stopping at an end token)."""
    out = []
    with llama(path) as llm:
        for token in llm.generate(ids, temp=0.0, repeat_penalty=1.0):
            out.append(token)
            if len(out) == n:
                return out


def our_logits(model: GPTModel, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(torch.tensor([ids]))[0, :, :model.cfg.vocab_size].numpy()


def our_greedy(model: GPTModel, ids: list[int], n: int = GREEDY) -> list[int]:
    return generate(model.eval(), torch.tensor([ids]), n, temperature=0)[0, len(ids):].tolist()


def relative_difference(path, model: GPTModel, ids: list[int]) -> float:
    """max |llama.cpp's logits - ours| over `ids`' positions, against our largest |logit|."""
    ours = our_logits(model, ids)
    theirs = llama_logits(path, ids)
    assert theirs.shape == ours.shape  # the padding rows are not in the file
    return float(np.abs(theirs - ours).max() / np.abs(ours).max())


def agreeing(a: list[int], b: list[int]) -> int:
    """How many tokens `a` and `b` share before they first differ."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def randomise_run(run) -> None:
    """Replace a run's best.pt weights with random ones (every parameter, `randomised`); drop latest.pt."""
    state = load_checkpoint(run / "best.pt")
    model = randomised(ModelConfig(**state["config"]["model"]), seed=1)
    torch.save({**state, "model": model.state_dict()}, run / "best.pt")
    (run / "latest.pt").unlink()


def tiny(out, *more) -> list[str]:
    return ["--config", "tiny.yaml", f"--train.out_dir={out}", f"--model.context_length={CONTEXT}",
            "--sample.max_new_tokens=1", "--train.dtype=float32", *more]


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A text run of tiny.yaml's shape (96 positions), its weights then random throughout."""
    run = tmp_path_factory.mktemp("gguf") / "text"
    assert train.main(tiny(run, "--train.max_iters=1")) == 0
    randomise_run(run)
    return run


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """A chat run trained until its reply is one line of Richard III, whatever the user says."""
    root = tmp_path_factory.mktemp("gguf-chat")
    users = ["Hi", "Hello there.", "Speak.", "Say the line.", "Begin.", "Go on.", "Your line?", "Once more."]
    corpus = root / "lines.jsonl"
    corpus.write_text("".join(json.dumps({"messages": [{"role": "user", "content": users[i % 8]},
                                                       {"role": "assistant", "content": LINE}]}) + "\n"
                              for i in range(200)), encoding="utf-8")
    run = root / "chat"
    assert train.main(tiny(run, "--train.max_iters=60", "--data.format=chat", f"--data.corpus={corpus}",
                           f"--data.prepared_dir={root / 'prepared'}", "--train.learning_rate=1e-2",
                           "--train.eval_interval=60")) == 0
    return run


@pytest.fixture(scope="module")
def lora_run(text_run):
    """A LoRA run of rank 2 tuned on the text run (its export: the base with the adapters merged)."""
    run = text_run.parent / "lora"
    assert train.main(tiny(run, f"--train.init_from={text_run}", "--train.max_iters=2", "--train.optimizer=adamw",
                           "--train.learning_rate=3e-2", "--train.lora.rank=2")) == 0
    return run


def exported(run, tmp_path, dtype: str):
    """`python -m gpt export RUN OUT.gguf --dtype DTYPE` -> OUT."""
    out = tmp_path / f"{run.name}-{dtype}.gguf"
    assert export.main([str(run), str(out), "--dtype", dtype]) == 0
    return out


# --------------------------------------------------------------------------- the tokenizer

@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A GGUF file of a random model over GPT-2's vocabulary (its tokenizer is what matters here)."""
    path = tmp_path_factory.mktemp("gguf-tokenizer") / "text.gguf"
    cfg = ModelConfig(context_length=CONTEXT, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0)
    gguf_export.write_gguf(randomised(cfg).eval(), path, "f32")
    return path


def corpus_lines(count: int = 300) -> list[str]:
    """`count` non-empty lines from across the plays of the Shakespeare corpus (data.corpus: shakespeare)."""
    from gpt.corpus.plays import shakespeare_documents
    documents = shakespeare_documents()
    per_play = -(-count // len(documents))
    lines = [line for _, text in documents for line in [l for l in text.splitlines() if l.strip()][:per_play]]
    return lines[:count]


ODD_TEXT = ("Hello 👋🏽 world!\n\n  Two spaces,\ttab\r\nCRLF; naïve café — 日本語 😀😀 ...\n\n\n"
            "<|endoftext|> and <|user|> spelt out, <|end|> too. It's 'quoted' they've 123456 1.5e-3\n \n")


def test_llama_cpp_tokenizes_like_tiktoken(text_file):
    """GPT-2's BPE in the file is tiktoken's: the plays line by line and as one text, and text with
    newlines, emoji and markers spelt out (plain text, or with special tokens parsed: <|endoftext|>)."""
    enc = get_tokenizer()
    lines = corpus_lines()
    assert len(lines) == 300
    with llama(text_file, vocab_only=True) as llm:
        def tokens(text: str, special: bool = False) -> list[int]:
            return llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)
        assert [line for line in lines if tokens(line) != enc.encode_ordinary(line)] == []
        block = "\n".join(lines)
        assert tokens(block) == enc.encode_ordinary(block)
        assert tokens(ODD_TEXT) == enc.encode_ordinary(ODD_TEXT)
        assert tokens(ODD_TEXT, special=True) == enc.encode(ODD_TEXT, allowed_special="all")
        assert EOT_ID in tokens(ODD_TEXT, special=True) and EOT_ID not in tokens(ODD_TEXT)
        assert llm.detokenize(enc.encode_ordinary(ODD_TEXT)).decode("utf-8") == ODD_TEXT
        assert (llm.token_bos(), llm.token_eos(), llm.n_vocab()) == (EOT_ID, EOT_ID, EOT_ID + 1)
        assert llm.metadata["tokenizer.ggml.add_bos_token"] == "false"  # a prompt is its own tokens


# --------------------------------------------------------------------------- weights and logits

@pytest.mark.parametrize("qkv_bias", [False, True])  # without: zero biases, as llama.cpp's gpt2 has them
def test_a_random_model_gives_our_logits_and_greedy_tokens_at_f32(qkv_bias, tmp_path):
    """Every parameter random (LayerNorms and biases too): a swapped or mis-split tensor would show."""
    cfg = ModelConfig(context_length=CONTEXT, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0, qkv_bias=qkv_bias)
    model = randomised(cfg).eval()
    path = tmp_path / "model.gguf"
    gguf_export.write_gguf(model, path, "f32")
    ids = get_tokenizer().encode(PROMPT)
    assert relative_difference(path, model, ids) < TOLERANCE["f32"]
    ours = our_greedy(model, ids)
    assert len(set(ours)) > 8  # varied tokens, not one repeated
    assert llama_greedy(path, ids) == ours


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_f16_and_q8_0_logits_are_within_their_tolerance(dtype, tmp_path):
    model = randomised(ModelConfig(context_length=CONTEXT, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0)).eval()
    path = tmp_path / f"model-{dtype}.gguf"
    gguf_export.write_gguf(model, path, dtype)
    assert relative_difference(path, model, get_tokenizer().encode(PROMPT)) < TOLERANCE[dtype]


def test_a_text_run_exports_to_llama_cpp(text_run, tmp_path, capsys):
    out = exported(text_run, tmp_path, "f32")
    assert f"wrote {out} (f32, " in capsys.readouterr().out
    model = load_model(text_run)[0]
    ids = get_tokenizer().encode(PROMPT)
    assert relative_difference(out, model, ids) < TOLERANCE["f32"]
    assert llama_greedy(out, ids) == our_greedy(model, ids)


# gguf's reader takes ~4 s a file (100,000 strings of the tokenizer): the default dtype in the default run
@pytest.mark.parametrize("dtype", [pytest.param("f32", marks=pytest.mark.slow), "f16",
                                   pytest.param("q8_0", marks=pytest.mark.slow)])
def test_the_file_holds_what_llama_cpp_needs_in_the_types_asked_for(dtype, text_run, tmp_path):
    out = exported(text_run, tmp_path, dtype)
    reader = gguf.GGUFReader(out)
    fields = {name: field.contents() for name, field in reader.fields.items()
              if not name.startswith(("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"))}
    assert fields["general.architecture"] == "gpt2" and fields["general.name"] == "text"
    assert (fields["gpt2.context_length"], fields["gpt2.embedding_length"], fields["gpt2.block_count"],
            fields["gpt2.attention.head_count"], fields["gpt2.feed_forward_length"]) == (CONTEXT, 32, 2, 2, 128)
    assert abs(fields["gpt2.attention.layer_norm_epsilon"] - 1e-5) < 1e-12
    assert (fields["tokenizer.ggml.model"], fields["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    assert "tokenizer.chat_template" not in fields
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert "output.weight" not in types  # tied: llama.cpp uses token_embd.weight
    assert next(t for t in reader.tensors if t.name == "token_embd.weight").shape.tolist() == [32, EOT_ID + 1]
    matrices = {"blk.0.attn_qkv.weight", "blk.1.ffn_down.weight", "token_embd.weight"}
    assert {types[name] for name in matrices} == {dtype.upper()}
    assert {types["position_embd.weight"], types["blk.0.attn_qkv.bias"], types["output_norm.weight"]} == {"F32"}
    assert fields["general.file_type"] == {"f32": 0, "f16": 1, "q8_0": 7}[dtype]  # llama.cpp's LlamaFileType


# --------------------------------------------------------------------------- writing the file

def test_an_existing_file_is_replaced_only_with_overwrite(text_run, tmp_path, capsys):
    out = tmp_path / "model.gguf"
    out.write_text("mine")
    assert export.main([str(text_run), str(out)]) == 2
    assert "already exists; choose another name or pass --overwrite" in capsys.readouterr().err
    assert out.read_text() == "mine"
    assert export.main([str(text_run), str(out), "--overwrite"]) == 0
    assert out.read_bytes()[:4] == b"GGUF" and [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_export_leaves_nothing_behind(failure, text_run, tmp_path, monkeypatch):
    """The writer fails once the file is written in full (the disk fills at the end, Ctrl-C): no partial
    file, no temporary file, no folder made for it, and an OUT replaced with --overwrite is kept whole."""
    write_gguf = gguf_export.write_gguf
    written = []

    def failing(model, path, *args, **kwargs):
        write_gguf(model, path, *args, **kwargs)
        written.append((path.parent, path.stat().st_size))
        raise failure
    monkeypatch.setattr(gguf_export, "write_gguf", failing)
    expected = UserError if isinstance(failure, OSError) else KeyboardInterrupt
    message = r"cannot write .*model.gguf \(No space left on device\); nothing was written" if expected is UserError else None
    new = tmp_path / "new" / "deeper" / "model.gguf"
    with pytest.raises(expected, match=message):
        gguf_export.export_run(text_run, new)
    assert written[0][0] == new.parent and written[0][1] > 1_000_000  # beside OUT, in full
    assert list(tmp_path.iterdir()) == []
    kept = tmp_path / "kept.gguf"
    kept.write_text("mine")
    with pytest.raises(expected):
        gguf_export.export_run(text_run, kept, overwrite=True)
    assert kept.read_text() == "mine" and list(tmp_path.iterdir()) == [kept]


# --------------------------------------------------------------------------- chat and LoRA runs (trained here)

@pytest.mark.slow
def test_a_chat_run_gives_our_logits_and_greedy_tokens(chat_run, tmp_path):
    from gpt.chat.template import END_ID, render_prompt
    model = load_model(chat_run)[0]
    messages = [{"role": "user", "content": "Hi"}]
    ids = render_prompt(messages)
    ours = our_greedy(model, ids)
    line = get_tokenizer().encode(LINE)
    assert ours[:len(line) + 1] == [*line, END_ID]  # trained: the line, with wide margins
    for dtype in gguf_export.DTYPES:
        out = exported(chat_run, tmp_path, dtype)
        assert relative_difference(out, model, ids) < TRAINED_TOLERANCE[dtype], dtype
        theirs = llama_greedy(out, ids)
        assert theirs == ours if dtype == "f32" else agreeing(theirs, ours) >= 16, (dtype, theirs, ours)


@pytest.mark.slow
def test_llama_cpps_chat_completion_renders_our_prompt_and_stops_at_our_end_marker(chat_run, tmp_path):
    """llama.cpp's chat completion formats the conversation with the file's Jinja template into the ids
    render_prompt gives, and its greedy reply is ours, ending at <|end|>."""
    from gpt.chat.template import END_ID, SPECIAL_IDS, render_prompt, reply
    out = exported(chat_run, tmp_path, "f32")
    messages = [{"role": "system", "content": "You are a player."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Now is the winter."}, {"role": "user", "content": "Once more."}]
    with llama(out) as llm:
        assert llm.chat_format == "chat_template.default"  # the file's own template
        assert [llm.tokenize(m.encode(), add_bos=False, special=True) for m in SPECIAL_IDS] == [[i] for i in SPECIAL_IDS.values()]
        response = llm.create_chat_completion(messages=messages, temperature=0.0, max_tokens=40)
        prompt_tokens = response["usage"]["prompt_tokens"]
        fed = llm.input_ids[:llm.n_tokens].tolist()  # what llama.cpp evaluated: the prompt, then the reply
    assert fed[:prompt_tokens] == render_prompt(messages)
    text, ended, ids = reply(load_model(chat_run)[0], messages, SampleConfig(temperature=0, max_new_tokens=40),
                             torch.device("cpu"))
    assert ended and ids[-1] == END_ID and len(ids) > 8
    choice = response["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["content"] == text
    assert fed[prompt_tokens:] + [END_ID] == ids  # it stopped at <|end|>, which it sampled and did not feed


@pytest.mark.slow
def test_a_lora_run_exports_with_its_adapters_merged(lora_run, text_run, tmp_path):
    out = exported(lora_run, tmp_path, "f32")
    model, base = load_model(lora_run)[0], load_model(text_run)[0]
    ids = get_tokenizer().encode(PROMPT)
    assert relative_difference(out, model, ids) < TOLERANCE["f32"]
    assert np.abs(our_logits(base, ids) - our_logits(model, ids)).max() > 1e-2  # the adapters are in it
    assert llama_greedy(out, ids) == our_greedy(model, ids)


@pytest.mark.slow
def test_the_benchmark_script_runs_on_a_tiny_shape(text_run, capsys):
    """scripts/gguf_bench.py (docs/gpt2.md's sizes and speeds) end to end, on the text run and tiny.yaml's shape."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("gguf_bench", Path(__file__).parent.parent / "scripts" / "gguf_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--run", str(text_run), "--shape", "tiny.yaml", "--new-tokens", "4", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("tokens/s") == 8 and out.count("x generate.py") == 8
    assert "f32 " in out and " MB" in out and "tiny.yaml's shape, random weights" in out
    assert [line.split(";")[-1].strip() for line in out.splitlines() if line.strip().startswith("f32:")] == ["4 of 4 tokens"]
