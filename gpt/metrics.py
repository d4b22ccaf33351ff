"""What a run records at each evaluation: `metrics.csv` in its folder, and TensorBoard if asked.

One row per evaluation: step, tokens seen, train and val loss, learning rate and tokens/s, then
each multiple-choice task's acc and acc_norm (`train.eval_tasks`: `<task>_acc`, `<task>_acc_norm`).
CSV because everything reads it (a spreadsheet, pandas, `python -m gpt plot`), and because a
row is appended and flushed at once: a crash loses at most the row being written. A fresh run
starts the file again; rows are only ever appended, so a resumed run can carry it on.

With `train.tensorboard: true` the same numbers also go to `<out_dir>/tensorboard/` as scalars
(`torch.utils.tensorboard`, which needs the `tensorboard` package): `tensorboard --logdir runs`.

At the end of training, and with `python -m gpt plot RUN_DIR`, the file is drawn as `loss.png`: train
and val loss against tokens seen, and a second panel of each task's acc_norm where the run scores
tasks. matplotlib is optional (`pip install matplotlib`, or the `[plot]` extra): training prints a
one-line hint instead when it is missing. The chart is drawn on a `matplotlib.figure.Figure`
directly, not through pyplot: no display, no GUI backend, no global state.
"""

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path

from gpt.errors import UserError

METRICS_NAME = "metrics.csv"
PLOT_NAME = "loss.png"
INSTALL_HINT = "pip install matplotlib (or the [plot] extra)"

COLUMNS = ("step", "tokens", "train_loss", "val_loss", "lr", "tokens_per_s")
INT_COLUMNS = ("step", "tokens")
TENSORBOARD_DIR = "tensorboard"


def start_metrics(path: Path, columns: tuple[str, ...] = COLUMNS) -> None:
    """Create (or empty) the metrics file at `path`: the header and no rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerow(columns)


def _header(path: Path) -> tuple[str, ...]:
    with open(path, newline="", encoding="utf-8") as f:
        return tuple(next(csv.reader(f), ()))


def _widen(path: Path, columns: tuple[str, ...]) -> None:
    """Rewrite the file under the header `columns` (a resumed run scoring other tasks); old rows keep
    their values, and a column they lack is left empty."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    partial = path.with_name(path.name + ".tmp")
    with open(partial, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, columns, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(partial, path)


def append_metrics(path: Path, row: dict, columns: tuple[str, ...] = COLUMNS) -> None:
    """Append one evaluation's `row` (a value for each of `columns`); the header first if new."""
    missing = [name for name in columns if name not in row]
    if missing:
        raise ValueError(f"metrics row lacks {', '.join(missing)}")
    if not path.exists() or path.stat().st_size == 0:
        start_metrics(path, columns)
    elif (header := _header(path)) != columns:
        columns = tuple(dict.fromkeys(header + columns))  # the file's columns, then any new ones
        _widen(path, columns)
    with open(path, "a", newline="", encoding="utf-8") as f:
        csv.writer(f).writerow([row.get(name, "") for name in columns])


def read_metrics(path: Path) -> list[dict[str, float]]:
    """The rows of a metrics file, as numbers (step and tokens as ints)."""
    if not path.is_file():
        raise UserError(f"no {path.name} at {path.parent}; train.py writes it at every evaluation")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = tuple(reader.fieldnames or ())
        if columns[:len(COLUMNS)] != COLUMNS:
            raise UserError(f"{path} does not start with the header {','.join(COLUMNS)}; "
                            "it is not a metrics file written by train.py")
        try:  # a task column a row lacks (a task added on resuming) reads as NaN
            return [{name: (int if name in INT_COLUMNS else float)(row[name] or "nan") for name in columns}
                    for row in reader]
        except (TypeError, ValueError) as e:
            raise UserError(f"{path} line {reader.line_num} is not a row of numbers ({e})") from None


def open_tensorboard(log_dir: Path, fresh: bool):
    """A TensorBoard `SummaryWriter` for `log_dir`; a fresh run first removes the old curves."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("train.tensorboard is true but tensorboard is not installed; "
                        "pip install tensorboard, or set train.tensorboard: false") from None
    if fresh:  # otherwise TensorBoard draws the old run and the new one as one tangled line
        for old in log_dir.glob("events.out.tfevents.*"):
            old.unlink()
    return SummaryWriter(log_dir=str(log_dir))


@dataclass
class Figures:
    """What an evaluation beyond the loss measured: `metrics` by name (the run log's columns) and `line`,
    what it adds to the evaluation's printed line."""

    metrics: dict[str, float]
    line: str = ""


class RunLog:
    """Records each evaluation: a row of metrics.csv, and scalars for TensorBoard when enabled."""

    def __init__(self, out_dir: Path, tensorboard: bool, fresh: bool, tokens_per_step: int,
                 task_columns: list[str] = ()):
        self.path = Path(out_dir) / METRICS_NAME
        self.tokens_per_step = tokens_per_step
        self.columns = (*COLUMNS, *task_columns)
        self.writer = open_tensorboard(Path(out_dir) / TENSORBOARD_DIR, fresh) if tensorboard else None
        if fresh:
            start_metrics(self.path, self.columns)

    def __call__(self, evaluation: dict) -> None:
        """Record one evaluation (every column but `tokens`, which follows from the step)."""
        # Every step is the same number of tokens, so tokens seen follow from the step count,
        # and a resumed run counts on from where it was.
        row = {**evaluation, "tokens": evaluation["step"] * self.tokens_per_step}
        append_metrics(self.path, row, self.columns)
        if self.writer is not None:
            for name in self.columns[2:]:
                if math.isfinite(row[name]):
                    self.writer.add_scalar(name, row[name], global_step=row["step"])
            self.writer.flush()

    def close(self) -> None:
        """Close the TensorBoard writer, if any (the CSV is closed after every row)."""
        if self.writer is not None:
            self.writer.close()


# --------------------------------------------------------------------------- the plot

def draw_losses(rows: list[dict[str, float]], path: Path, title: str, references: dict | None = None) -> Path:
    """Write a PNG of train and val loss against tokens seen (and each task's acc_norm, with its
    `references`, label: (value, line style)); return its path."""
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
        draw_tasks(task_ax[0], tokens, rows, tasks, references or {})
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)  # a reader never sees half a file
    return path



def draw_tasks(ax, tokens: list[int], rows: list[dict[str, float]], tasks: list[str], references: dict) -> None:
    """Each task's acc_norm against tokens seen, with the tasks' reference lines (chance, GPT-2's score:
    `gpt.tools.multiple_choice.reference_lines`)."""
    from matplotlib.ticker import EngFormatter
    for task in tasks:
        ax.plot(tokens, [row[f"{task}_acc_norm"] for row in rows], marker="o", label=task)
    for label, (value, style) in references.items():
        ax.axhline(value, color="grey", linestyle=style, label=label)
    ax.xaxis.set_major_formatter(EngFormatter())
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("accuracy (acc_norm)")
    ax.grid(alpha=0.3)
    ax.legend()



def plot_run(run_dir: str | Path, references: dict | None = None) -> Path:
    """Draw `<run_dir>/loss.png` from `<run_dir>/metrics.csv` (`references`: as `draw_losses`); return its path."""
    run_dir = Path(run_dir).expanduser()
    rows = read_metrics(run_dir / METRICS_NAME)
    if not rows:
        raise UserError(f"{run_dir / METRICS_NAME} has no rows yet; the first comes at the first evaluation")
    return draw_losses(rows, run_dir / PLOT_NAME, run_dir.resolve().name, references)



def plot_after_training(run_dir: str | Path, references: dict | None = None) -> str:
    """Draw the run's loss plot; the line to print: where it is, or why there is none."""
    try:
        return f"loss plot: {plot_run(run_dir, references)}"
    except UserError as e:
        return f"no loss plot: {e}"
