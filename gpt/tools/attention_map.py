"""`python -m gpt attention-map PROMPT --checkpoint RUN`: the attention weights of a trained model.

For every layer and head: how much each position of the prompt (a query, a row) takes from
itself and each position before it (the keys, the columns). Drawn as a grid of heatmaps, one
row of heads per layer, into a PNG; or printed as matrices, the way the seed notebook prints
`attn_weights`.

Design choices:
- The weights come from `CausalAttention.attention_weights`, the explicit path's own masked
  softmax, so there is no second implementation to keep in step with the model. A forward
  pre-hook on each block's attention catches its input (the LayerNorm'd residual stream)
  while the model runs its ordinary forward pass, with whichever `attn_impl` it was trained
  with; nothing in the model changes, and the hooks are removed afterwards.
- Eval mode (dropout off), and the weights before attention dropout: what the model does
  when it samples.
- The checkpoint is read as generate.py reads it (`gpt.cli.load_for_sampling`): a run
  folder or checkpoint file, GPT-2's weights or a Hugging Face folder. A prompt longer than the
  context is cropped to its last `context_length` tokens, as generation crops it.
- matplotlib is optional, as in `gpt.metrics`' plot: `--print` works without it. The figure is drawn on
  a `matplotlib.figure.Figure` directly (no pyplot, no GUI backend), masked cells in grey so
  they are not mistaken for weights near 0, one colour scale (0 to 1) for every head.
"""

import math
import os
import sys
from pathlib import Path

import torch

from gpt.cli import DEFAULT_RUN_CONFIG, default_checkpoint, load_for_sampling
from gpt.errors import ArgumentParser, UserError, run_cli
from gpt.gpt2.pretrained import is_pretrained_source
from gpt.metrics import INSTALL_HINT
from gpt.model import GPTModel
from gpt.sampling import check_prompt
from gpt.tokenizer import get_tokenizer

PLOT_NAME = "attention.png"
EXAMPLE_PROMPT = "Your journey starts with one step"  # the seed notebook's six tokens
MAX_TICKS = 32  # label at most this many tokens per axis; longer prompts label every k-th


@torch.no_grad()
def attention_weights(model: GPTModel, idx: torch.Tensor) -> torch.Tensor:
    """(B, T) token ids -> (B, n_layers, n_heads, T, T) attention weights, in eval mode."""
    captured = []  # one (B, n_heads, T, T) per layer, in order

    def keep(attention: torch.nn.Module, args: tuple) -> None:
        captured.append(attention.attention_weights(args[0]))  # args[0]: norm1(x), (B, T, emb_dim)

    hooks = [block.att.register_forward_pre_hook(keep) for block in model.trf_blocks]
    was_training = model.training
    model.eval()
    try:
        model(idx)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return torch.stack(captured, dim=1)


def prompt_ids(prompt: str, context_length: int) -> tuple[list[int], int]:
    """The prompt's token ids, cropped to the last `context_length` as generation crops; and how many were cut."""
    ids = get_tokenizer().encode(prompt, allowed_special={"<|endoftext|>"})
    kept = ids[-context_length:]
    return kept, len(ids) - len(kept)


def token_texts(ids: list[int]) -> list[str]:
    """Each token's text on its own (a piece of a multi-byte character shows as U+FFFD)."""
    enc = get_tokenizer()
    return [enc.decode_single_token_bytes(i).decode("utf-8", errors="replace") for i in ids]


def format_weights(weights: torch.Tensor) -> str:
    """A (T, T) matrix as torch prints it, `tensor([[1.0000, 0.0000], ...])`, never in e-notation."""
    rows = ["[" + ", ".join(f"{w:.4f}" for w in row) + "]" for row in weights.tolist()]
    return "tensor([" + ",\n        ".join(rows) + "])"


def format_all(weights: torch.Tensor, texts: list[str], layers: list[int], heads: list[int]) -> str:
    """The tokens, then one matrix per (layer, head) of `weights`, (len(layers), len(heads), T, T)."""
    lines = ["tokens (rows: queries, columns: keys): " + " ".join(repr(t) for t in texts)]
    for i, layer in enumerate(layers):
        for j, head in enumerate(heads):
            lines += ["", f"layer {layer}, head {head}:", format_weights(weights[i, j])]
    return "\n".join(lines)


def _label(text: str) -> str:
    """A token as an axis label: newlines and tabs visible, `$` not taken for mathtext."""
    return repr(text)[1:-1].replace("$", r"\$")


def draw_attention(weights: torch.Tensor, texts: list[str], layers: list[int], heads: list[int],
                   path: Path, title: str) -> Path:
    """Write a PNG of (len(layers), len(heads), T, T) weights, one heatmap per head; return its path."""
    try:
        from matplotlib import colormaps
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError(f"drawing {path.name} needs matplotlib: {INSTALL_HINT}; "
                        "--print shows the weights without it") from None
    num_tokens = len(texts)
    masked = weights.float().clone()
    masked[..., torch.ones(num_tokens, num_tokens, dtype=torch.bool).triu(1)] = math.nan  # the future
    ticks = list(range(0, num_tokens, math.ceil(num_tokens / MAX_TICKS)))
    labels = [_label(texts[t]) for t in ticks]
    panel = min(max(1.9, 0.22 * min(num_tokens, MAX_TICKS)), 5.0)  # inches per heatmap
    fig = Figure(figsize=(panel * len(heads) + 1.8, panel * len(layers) + 1.2), layout="constrained")
    axes = fig.subplots(len(layers), len(heads), sharex=True, sharey=True, squeeze=False)
    cmap = colormaps["viridis"].with_extremes(bad="#d9d9d9")  # masked (future) cells: grey
    for i, layer in enumerate(layers):
        for j, head in enumerate(heads):
            ax = axes[i, j]
            image = ax.imshow(masked[i, j].numpy(), cmap=cmap, vmin=0.0, vmax=1.0)
            ax.set_title(f"layer {layer}, head {head}", fontsize=9)
            ax.set_xticks(ticks, labels=labels, rotation=90, fontsize=7)
            ax.set_yticks(ticks, labels=labels, fontsize=7)
        axes[i, 0].set_ylabel("query")
    for ax in axes[-1]:
        ax.set_xlabel("key")
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight")
    fig.suptitle(_label(title))
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)  # a reader never sees half a file
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path} ({e.strerror or e}); choose another --out") from None
    return path


def _pick(option: str, value: int | None, count: int, what: str, source: str) -> list[int]:
    """All of `count` indices, or the one the option names; a UserError when it is out of range."""
    if value is None:
        return list(range(count))
    if not 0 <= value < count:
        raise UserError(f"{option} {value} is out of range: {source} has {count} {what}, "
                        f"numbered 0 to {count - 1}")
    return [value]


def default_out(location: str, source: str) -> Path:
    """attention.png beside a run's checkpoint (where loss.png is); in the current folder for GPT-2's weights."""
    return Path(PLOT_NAME) if is_pretrained_source(location) else Path(source).parent / PLOT_NAME


def main(argv: list[str] | None = None) -> int:
    """Draw (or print) the attention weights for the command line's prompt; the exit code."""
    parser = ArgumentParser(prog="python -m gpt attention-map",
                            description="Draw (or print) the attention weights of a trained model for a prompt.")
    parser.add_argument("prompt", help=f'text to look at, e.g. "{EXAMPLE_PROMPT}"')
    parser.add_argument("--checkpoint", help="run folder (its best.pt, else latest.pt) or checkpoint file "
                        f"(default: the run configs/{DEFAULT_RUN_CONFIG} writes); or GPT-2's weights: gpt2, "
                        "gpt2-medium, gpt2-large, gpt2-xl or a Hugging Face GPT-2 folder")
    parser.add_argument("--layer", type=int, help="only this layer, counted from 0 (default: all)")
    parser.add_argument("--head", type=int, help="only this head, counted from 0 (default: all)")
    parser.add_argument("--out", help=f"the PNG to write (default: {PLOT_NAME} in the run folder; for "
                        "GPT-2's weights, in the current folder)")
    parser.add_argument("--print", action="store_true", dest="print_weights",
                        help="print the weights as matrices instead of drawing them (with --out: both)")
    args = parser.parse_args(argv)

    def work() -> None:
        check_prompt(args.prompt, "the prompt", f'some text to look at, e.g. "{EXAMPLE_PROMPT}"')
        location = args.checkpoint or default_checkpoint()
        model, _, source = load_for_sampling(location, torch.device("cpu"))
        layers = _pick("--layer", args.layer, model.cfg.n_layers, "layers", source)
        heads = _pick("--head", args.head, model.cfg.n_heads, "heads", source)
        ids, cut = prompt_ids(args.prompt, model.cfg.context_length)
        print(f"attention of {source}", file=sys.stderr)
        if cut:
            print(f"note: the prompt has {len(ids) + cut} tokens; the model sees its last {len(ids)} "
                  "(context_length), as when it generates", file=sys.stderr)
        weights = attention_weights(model, torch.tensor([ids]))[0]  # (n_layers, n_heads, T, T)
        weights = weights[layers][:, heads]  # (len(layers), len(heads), T, T)
        texts = token_texts(ids)
        if args.print_weights:
            print(format_all(weights, texts, layers, heads))
        if args.out or not args.print_weights:
            path = Path(args.out).expanduser() if args.out else default_out(location, source)
            title = f"attention weights of {source}, {len(ids)} tokens"
            print(f"wrote {draw_attention(weights, texts, layers, heads, path, title)}")

    return run_cli(work)


if __name__ == "__main__":
    sys.exit(main())
