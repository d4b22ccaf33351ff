"""Seeing a run: metrics.csv rows at every evaluation, loss.png, TensorBoard scalars."""

import sys

import numpy as np
import pytest
import torch

import train
from conftest import SavesOnly
from gpt import metrics
from gpt.config import TrainConfig
from gpt.data import TokenWindows, TrainBatches, eval_loader
from gpt.errors import UserError
from gpt.metrics import COLUMNS, RunLog, append_metrics, read_metrics, start_metrics
from gpt.model import GPTModel
from gpt.optim import learning_rate
from gpt.tools import plot
from gpt.training import TrainData, new_run, train as train_loop

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def row(step: int, loss: float) -> dict:
    return {"step": step, "tokens": step * 512, "train_loss": loss, "val_loss": loss + 0.25,
            "lr": 1e-3 / step, "tokens_per_s": 1234.5}


def test_rows_round_trip_through_the_csv(tmp_path):
    path = tmp_path / "metrics.csv"
    rows = [row(10, 7.123456789), row(20, 6.5), row(30, float("nan"))]
    for r in rows:
        append_metrics(path, r)  # the first one writes the header
    back = read_metrics(path)
    assert [r["step"] for r in back] == [10, 20, 30] and isinstance(back[0]["tokens"], int)
    assert back[:2] == rows[:2]  # floats exactly as written
    assert np.isnan(back[2]["train_loss"])
    assert path.read_text().splitlines()[0] == ",".join(COLUMNS)
    start_metrics(path)  # a fresh run starts again
    assert read_metrics(path) == []
    with pytest.raises(ValueError, match="lacks val_loss"):
        append_metrics(path, {k: v for k, v in row(1, 1.0).items() if k != "val_loss"})


@pytest.mark.parametrize("text,message", [
    ("step,loss\n1,2\n", "does not start with the header"),
    (",".join(COLUMNS) + "\n1,2,3.0,4.0,0.1,9\nx,2,3,4,5,6\n", "line 3 is not a row of numbers"),
])
def test_a_file_that_is_not_metrics_is_a_clear_error(tmp_path, text, message):
    path = tmp_path / "metrics.csv"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        read_metrics(path)


def test_the_loop_logs_every_evaluation(tiny_cfg):
    tokens = (np.arange(3000) * 7 % 101).astype(np.uint16)
    ds = TokenWindows(tokens, 12, 12)
    cfg = TrainConfig(max_iters=9, eval_interval=4, eval_iters=1, warmup_iters=2, grad_accum_steps=2)
    torch.manual_seed(0)
    rows, saves = [], []
    loaders = {"train": eval_loader(ds, 3, 1), "val": eval_loader(ds, 3, 1)}
    state = train_loop(new_run(GPTModel(tiny_cfg), cfg, torch.device("cpu")), cfg,
                       TrainData(TrainBatches(ds, 3, seed=1), loaders), SavesOnly(lambda s: saves.append(s.val_loss)), log=rows.append)
    assert [r["step"] for r in rows] == [4, 8, 9]
    assert [r["val_loss"] for r in rows] == saves
    assert rows[-1]["train_loss"] == state.train_loss
    assert [r["lr"] for r in rows] == [learning_rate(s - 1, cfg) for s in (4, 8, 9)]  # the last step's
    assert all(r["tokens_per_s"] > 0 for r in rows)


def test_run_log_counts_tokens_from_steps(tmp_path):
    log = RunLog(tmp_path, tensorboard=False, fresh=True, tokens_per_step=96)
    for r in (row(4, 5.0), row(8, 4.0)):
        log({k: v for k, v in r.items() if k != "tokens"})
    assert [(r["step"], r["tokens"]) for r in read_metrics(tmp_path / "metrics.csv")] == [(4, 384), (8, 768)]
    append_metrics(tmp_path / "metrics.csv", row(9, 3.0))
    RunLog(tmp_path, tensorboard=False, fresh=False, tokens_per_step=96)  # a resumed run keeps the rows
    assert len(read_metrics(tmp_path / "metrics.csv")) == 3
    RunLog(tmp_path, tensorboard=False, fresh=True, tokens_per_step=96)
    assert read_metrics(tmp_path / "metrics.csv") == []


def test_training_writes_metrics_and_the_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "run"
    args = ["--config", "tiny.yaml", f"--train.out_dir={out}", "--sample.max_new_tokens=2"]
    assert train.main(args) == 0
    rows = read_metrics(out / "metrics.csv")
    assert [(r["step"], r["tokens"]) for r in rows] == [(5, 5 * 8 * 32), (10, 10 * 8 * 32)]  # tiny.yaml
    assert f"loss plot: {out / 'loss.png'}" in capsys.readouterr().out
    assert (out / "loss.png").read_bytes().startswith(PNG_MAGIC)
    assert train.main(args + ["--train.max_iters=15", "--resume"]) == 0  # a resumed run appends
    assert [r["step"] for r in read_metrics(out / "metrics.csv")] == [5, 10, 15]
    assert train.main(args + ["--train.max_iters=5", "--overwrite"]) == 0  # a new run starts afresh
    assert [r["step"] for r in read_metrics(out / "metrics.csv")] == [5]


def test_plot_command(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    for r in (row(100, 6.0), row(200, 5.0), row(300, 4.5)):
        append_metrics(tmp_path / "metrics.csv", r)
    assert plot.main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'loss.png'}"
    png = (tmp_path / "loss.png").read_bytes()
    assert png.startswith(PNG_MAGIC)
    assert int.from_bytes(png[16:20], "big") == 640 and int.from_bytes(png[20:24], "big") == 400
    assert plot.main([str(tmp_path / "nowhere")]) == 2
    assert "error: no metrics.csv at" in capsys.readouterr().err


def test_without_matplotlib_training_prints_a_hint_and_the_command_fails(tmp_path, monkeypatch, capsys):
    append_metrics(tmp_path / "metrics.csv", row(10, 5.0))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert metrics.plot_after_training(tmp_path) == (
        "no loss plot: drawing loss.png needs matplotlib: pip install matplotlib (or the [plot] extra)")
    assert plot.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: drawing loss.png needs matplotlib") and len(err.splitlines()) == 1
    assert not (tmp_path / "loss.png").exists()


def test_tensorboard_gets_the_same_numbers(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    for attempt in range(2):  # the second, fresh run replaces the first one's curves
        log = RunLog(tmp_path, tensorboard=True, fresh=True, tokens_per_step=512)
        for r in (row(10, 5.0), row(20, 4.0 - attempt)):
            log(r)
        log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("val_loss")] == [(10, 5.25), (20, 3.25)]
    assert set(events.Tags()["scalars"]) == set(COLUMNS[2:])


def test_tensorboard_missing_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    assert train.main(["--config", "tiny.yaml", f"--train.out_dir={tmp_path / 'run'}",
                       "--train.tensorboard=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: train.tensorboard is true but tensorboard is not installed; "
                   "pip install tensorboard, or set train.tensorboard: false")
