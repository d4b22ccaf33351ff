"""`python -m gpt plot RUN_DIR`: a run's train and val loss against tokens seen, as `loss.png`.

A run that scores multiple-choice tasks (`train.eval_tasks`) gets a second panel: each task's
acc_norm, with chance and, for HellaSwag, the line GPT-2 124M's weights reach (0.2955).

Reads `<RUN_DIR>/metrics.csv` (`gpt/metrics.py`) and draws with matplotlib, an optional
dependency (`pip install matplotlib`, or the `[plot]` extra). train.py calls
`plot_after_training` at the end of a run, which prints a one-line hint instead when
matplotlib is missing; the command itself stops with an error. The chart is drawn on a
`matplotlib.figure.Figure` directly, not through pyplot: no display, no GUI backend, no global
state, so it works the same on a headless server.
"""

import os
import sys
from pathlib import Path

from gpt.errors import ArgumentParser, UserError, run_cli
from gpt.metrics import METRICS_NAME, read_metrics
from gpt.tools.multiple_choice import GPT2_HELLASWAG, HELLASWAG
from gpt.tools.next_words import NEXT_WORDS

PLOT_NAME = "loss.png"
INSTALL_HINT = "pip install matplotlib (or the [plot] extra)"


def draw_losses(rows: list[dict[str, float]], path: Path, title: str) -> Path:
    """Write a PNG of train and val loss against tokens seen; return its path."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import EngFormatter
    except ImportError:
        raise UserError(f"drawing {path.name} needs matplotlib: {INSTALL_HINT}") from None
    tokens = [row["tokens"] for row in rows]
    tasks = [name.removesuffix("_acc_norm") for name in rows[0] if name.endswith("_acc_norm")]
    fig = Figure(figsize=(6.4, 6.8 if tasks else 4.0), layout="constrained")
    ax, *task_ax = fig.subplots(2 if tasks else 1, 1, squeeze=False)[:, 0]
    ax.plot(tokens, [row["train_loss"] for row in rows], marker="o", label="train")
    ax.plot(tokens, [row["val_loss"] for row in rows], marker="o", label="val")
    ax.xaxis.set_major_formatter(EngFormatter())  # 1.2M, not 1200000
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (cross-entropy, nats)")
    last = rows[-1]
    ax.set_title(f"{title}: step {last['step']}, train {last['train_loss']:.3f}, val {last['val_loss']:.3f}")
    ax.grid(alpha=0.3)
    ax.legend()
    if tasks:
        draw_tasks(task_ax[0], tokens, rows, tasks)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)  # a reader never sees half a file
    return path


def draw_tasks(ax, tokens: list[int], rows: list[dict[str, float]], tasks: list[str]) -> None:
    """Each task's acc_norm against tokens seen, with chance and GPT-2's HellaSwag line."""
    from matplotlib.ticker import EngFormatter
    for task in tasks:
        ax.plot(tokens, [row[f"{task}_acc_norm"] for row in rows], marker="o", label=task)
    if HELLASWAG in tasks:
        ax.axhline(GPT2_HELLASWAG["gpt2"], color="grey", linestyle="--",
                   label=f"GPT-2 124M on {HELLASWAG} ({GPT2_HELLASWAG['gpt2']})")
    if set(tasks) & {HELLASWAG, NEXT_WORDS}:  # 4 endings each
        ax.axhline(0.25, color="grey", linestyle=":", label="chance (4 endings)")
    ax.xaxis.set_major_formatter(EngFormatter())
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("accuracy (acc_norm)")
    ax.grid(alpha=0.3)
    ax.legend()


def plot_run(run_dir: str | Path) -> Path:
    """Draw `<run_dir>/loss.png` from `<run_dir>/metrics.csv`; return its path."""
    run_dir = Path(run_dir).expanduser()
    rows = read_metrics(run_dir / METRICS_NAME)
    if not rows:
        raise UserError(f"{run_dir / METRICS_NAME} has no rows yet; the first comes at the first evaluation")
    return draw_losses(rows, run_dir / PLOT_NAME, run_dir.resolve().name)


def plot_after_training(run_dir: str | Path) -> str:
    """Draw the run's loss plot; the line to print: where it is, or why there is none."""
    try:
        return f"loss plot: {plot_run(run_dir)}"
    except UserError as e:
        return f"no loss plot: {e}"


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m gpt plot",
                            description=f"Draw RUN_DIR/{PLOT_NAME} from RUN_DIR/{METRICS_NAME}.")
    parser.add_argument("run_dir", help="a run folder (train.out_dir)")
    args = parser.parse_args(argv)
    return run_cli(lambda: print(f"wrote {plot_run(args.run_dir)}"))


if __name__ == "__main__":
    sys.exit(main())
