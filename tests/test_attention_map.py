"""`python -m gpt attention-map`: the weights it shows are the model's, and it draws and prints them."""

from dataclasses import asdict
import re
import struct
import sys

import pytest
import torch
import torch.nn.functional as F

from gpt.checkpoint import BEST_NAME, save_checkpoint
from gpt.cli import load_for_sampling
from gpt.config import Config, TrainConfig
from gpt.model import GPTModel, ModelConfig
from gpt.tokenizer import get_tokenizer
from gpt.tools import attention_map
from gpt.tools.attention_map import attention_weights, prompt_ids

PROMPT = "Your journey starts with one step"  # 6 tokens
LONG_PROMPT = "To be, or not to be, that is the question: whether 'tis nobler in the mind"
# Dropout on: a map drawn in train mode would differ from the eval-mode recomputation below.
CFG = dict(context_length=8, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.5)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def save_run(folder, attn_impl: str):
    """A run folder holding a best.pt of a tiny model whose weights make sharp attention."""
    cfg = ModelConfig(**CFG)
    torch.manual_seed(0)
    model = GPTModel(cfg).use_attention(attn_impl)
    with torch.no_grad():  # N(0, 0.02) gives near-uniform weights; these give peaked ones
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.3)
    save_checkpoint(folder / BEST_NAME, {"model": model.state_dict(), "config": asdict(Config(model=cfg, train=TrainConfig(attn_impl=attn_impl)))})
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The same tiny model saved twice: trained with the sdpa path, and with the explicit one."""
    return {impl: save_run(tmp_path_factory.mktemp(f"run-{impl}"), impl) for impl in ("sdpa", "explicit")}


@pytest.fixture
def run(runs):
    return runs["sdpa"]  # the default path: the one the map does not run itself


@pytest.fixture(params=["sdpa", "explicit"])
def any_run(request, runs):
    return runs[request.param]


def ids_of(text: str) -> list[int]:
    return get_tokenizer().encode(text)


def weights_of(location, ids: list[int] | None = None) -> torch.Tensor:
    """(n_layers, n_heads, T, T) for `ids` (default: PROMPT's), through the module's own function."""
    model, _, _ = load_for_sampling(str(location), torch.device("cpu"))
    return attention_weights(model, torch.tensor([ids or ids_of(PROMPT)]))[0]


def recomputed(location, ids: list[int] | None = None) -> torch.Tensor:
    """softmax(QK^T / sqrt(d)) with the causal mask, from each layer's weights and its real input."""
    model, _, _ = load_for_sampling(str(location), torch.device("cpu"))
    ids = ids or ids_of(PROMPT)
    residuals = []  # what enters each block: the residual stream, (1, T, emb_dim)
    hooks = [block.register_forward_pre_hook(lambda module, args: residuals.append(args[0]))
             for block in model.trf_blocks]
    with torch.no_grad():
        model.eval()(torch.tensor([ids]))
    for hook in hooks:
        hook.remove()
    maps = []
    heads, num_tokens = model.cfg.n_heads, len(ids)
    head_dim = model.cfg.emb_dim // heads
    future = torch.ones(num_tokens, num_tokens, dtype=torch.bool).triu(1)
    for block, x in zip(model.trf_blocks, residuals):
        norm, att = block.norm1, block.att
        h = F.layer_norm(x[0], (x.shape[-1],), norm.weight, norm.bias, norm.eps)  # (T, emb_dim)
        q = (h @ att.W_query.weight.T).view(num_tokens, heads, head_dim).transpose(0, 1)  # (H, T, D)
        k = (h @ att.W_key.weight.T).view(num_tokens, heads, head_dim).transpose(0, 1)
        scores = (q @ k.transpose(1, 2) / head_dim ** 0.5).masked_fill(future, -torch.inf)
        maps.append(torch.softmax(scores, dim=-1))
    return torch.stack(maps).detach()  # (n_layers, H, T, T)


def test_every_row_sums_to_one_and_the_future_is_exactly_zero(any_run):
    weights = weights_of(any_run)
    assert weights.shape == (2, 4, 6, 6)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 4, 6), atol=1e-6)
    future = torch.ones(6, 6, dtype=torch.bool).triu(1)
    assert torch.equal(weights[..., future], torch.zeros_like(weights[..., future]))
    assert (weights[..., ~future] > 0).all()  # the past is seen
    assert weights[..., 1:, 0].max() > 0.3 and weights[..., 1:, 0].min() < 0.1  # not uniform: heads differ


def test_the_weights_equal_an_independent_recomputation(any_run):
    assert torch.allclose(weights_of(any_run), recomputed(any_run), atol=1e-6)


def test_both_attention_paths_give_the_same_map(runs):
    assert torch.allclose(weights_of(runs["sdpa"]), weights_of(runs["explicit"]), atol=1e-6)


def test_the_model_is_left_as_it_was(run):
    model, _, _ = load_for_sampling(str(run), torch.device("cpu"))
    model.train()
    logits = model.eval()(torch.tensor([[1, 2, 3]]))
    model.train()
    attention_weights(model, torch.tensor([[1, 2, 3]]))
    assert model.training  # mode restored
    assert all(not block.att._forward_pre_hooks for block in model.trf_blocks)  # hooks removed
    assert torch.equal(model.eval()(torch.tensor([[1, 2, 3]])), logits)


def parse_printed(text: str) -> dict[tuple[int, int], torch.Tensor]:
    """{(layer, head): matrix} from --print's output."""
    blocks = re.findall(r"layer (\d+), head (\d+):\ntensor\((\[\[.*?\]\])\)", text, flags=re.S)
    return {(int(layer), int(head)): torch.tensor([[float(v) for v in re.findall(r"\d+\.\d+", row)]
                                                   for row in body.split("],")])
            for layer, head, body in blocks}


def test_print_shows_the_weights_as_matrices_and_draws_nothing(run, capsys):
    assert attention_map.main([PROMPT, "--checkpoint", str(run), "--print"]) == 0
    out, err = capsys.readouterr()
    assert "tokens (rows: queries, columns: keys): 'Your' ' journey' ' starts' ' with' ' one' ' step'" in out
    assert "tensor([[1.0000, 0.0000, 0.0000, 0.0000, 0.0000, 0.0000],\n        [0." in out  # torch's layout
    printed = parse_printed(out)
    weights = weights_of(run)
    assert sorted(printed) == [(layer, head) for layer in range(2) for head in range(4)]
    for (layer, head), matrix in printed.items():
        assert torch.allclose(matrix, weights[layer, head], atol=5.1e-5), (layer, head)
    assert f"attention of {run / BEST_NAME}" in err
    assert not (run / attention_map.PLOT_NAME).exists()


def test_layer_and_head_pick_one_map(run, capsys):
    assert attention_map.main([PROMPT, "--checkpoint", str(run), "--print", "--layer", "1", "--head", "3"]) == 0
    printed = parse_printed(capsys.readouterr().out)
    assert list(printed) == [(1, 3)]
    assert torch.allclose(printed[1, 3], weights_of(run)[1, 3], atol=5.1e-5)


def test_a_prompt_longer_than_the_context_is_cropped_to_its_end(run, capsys):
    everything = ids_of(LONG_PROMPT)
    assert prompt_ids(LONG_PROMPT, CFG["context_length"]) == (everything[-8:], len(everything) - 8)
    assert attention_map.main([LONG_PROMPT, "--checkpoint", str(run), "--print", "--layer", "0"]) == 0
    out, err = capsys.readouterr()
    assert f"note: the prompt has {len(everything)} tokens; the model sees its last 8" in err
    printed = parse_printed(out)
    assert printed[0, 2].shape == (8, 8)
    assert torch.allclose(printed[0, 2], recomputed(run, everything[-8:])[0, 2], atol=5.1e-5)


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_the_png_is_written_beside_the_checkpoint_and_is_an_image(run, capsys):
    image = pytest.importorskip("matplotlib.image")
    assert attention_map.main([PROMPT, "--checkpoint", str(run)]) == 0
    path = run / attention_map.PLOT_NAME
    assert capsys.readouterr().out.strip() == f"wrote {path}"
    width, height = png_size(path)
    pixels = image.imread(path)
    assert pixels.shape[:2] == (height, width) and width > 400 and height > 200
    assert pixels[..., :3].std() > 0.05  # something is drawn
    one = run / "one" / "map.png"  # --out, into a folder that does not exist yet
    assert attention_map.main([PROMPT, "--checkpoint", str(run), "--layer", "0", "--head", "1",
                               "--out", str(one)]) == 0
    assert png_size(one)[0] < width and png_size(one)[1] < height  # one heatmap, not 2 x 4
    path.unlink()


def test_gpt2_format_weights_give_the_same_map(run, tmp_path, monkeypatch, capsys):
    pytest.importorskip("safetensors")
    from gpt.gpt2.export import export_model
    model, _, _ = load_for_sampling(str(run), torch.device("cpu"))
    export_model(model, tmp_path / "hf")
    assert torch.allclose(weights_of(tmp_path / "hf"), weights_of(run), atol=1e-6)
    monkeypatch.chdir(tmp_path)
    assert attention_map.main([PROMPT, "--checkpoint", str(tmp_path / "hf"), "--layer", "0"]) == 0
    assert png_size(tmp_path / attention_map.PLOT_NAME)[0] > 0  # GPT-2 weights: in the current folder
    assert not (tmp_path / "hf" / attention_map.PLOT_NAME).exists()


def test_without_matplotlib_print_works_and_drawing_says_what_to_install(run, monkeypatch, capsys):
    for module in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    assert attention_map.main([PROMPT, "--checkpoint", str(run), "--print"]) == 0
    assert parse_printed(capsys.readouterr().out)
    assert attention_map.main([PROMPT, "--checkpoint", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("error: drawing attention.png needs matplotlib: pip install matplotlib (or the [plot] "
                       "extra); --print shows the weights without it")
    assert not (run / attention_map.PLOT_NAME).exists()


@pytest.mark.parametrize("argv,message", [
    (lambda run, empty: [PROMPT, "--checkpoint", str(empty)], r"no checkpoint in .* \(looked for best.pt"),
    (lambda run, empty: ["", "--checkpoint", str(run)], r'the prompt is empty; give some text to look at, e.g. "Your'),
    (lambda run, empty: [PROMPT, "--checkpoint", str(run), "--layer", "2"],
     r"--layer 2 is out of range: .*best.pt has 2 layers, numbered 0 to 1$"),
    (lambda run, empty: [PROMPT, "--checkpoint", str(run), "--layer", "-1"], r"--layer -1 is out of range"),
    (lambda run, empty: [PROMPT, "--checkpoint", str(run), "--head", "4"],
     r"--head 4 is out of range: .*best.pt has 4 heads, numbered 0 to 3$"),
    (lambda run, empty: [PROMPT, "--checkpoint", str(run), "--head", "one"], r"argument --head: invalid int value"),
], ids=["no checkpoint", "empty prompt", "layer too large", "negative layer", "head too large", "head not a number"])
def test_bad_input_is_one_line_and_exit_2(run, tmp_path, argv, message, capsys):
    try:
        code = attention_map.main(argv(run, tmp_path))
    except SystemExit as e:  # argparse stops this way
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2 and not out
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err
    assert re.search(message, err.strip()), err
    assert not (run / attention_map.PLOT_NAME).exists()
