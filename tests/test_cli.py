"""The scripts, end to end, as a user runs them (bad input: tests/test_hostile_inputs.py)."""

import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train

ROOT = Path(__file__).resolve().parent.parent


def run_script(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / args[0]), *args[1:]], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_train_then_generate_on_tiny(tmp_path):
    out = tmp_path / "run"
    result = run_script("train.py", "--config", "tiny.yaml", f"--train.out_dir={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "parameters" in result.stdout and "val loss" in result.stdout
    assert "--- sample ---\nYour journey" in result.stdout
    state = torch.load(out / "latest.pt", weights_only=True)
    assert state["step"] == 10
    assert state["config"]["model"]["n_layers"] == 2
    assert not any(k.startswith("_orig_mod") or k.endswith("mask") for k in state["model"])
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["step"] == best["best_step"] == state["best_step"]  # the run's lowest val loss
    assert "optimizer" not in best and "rng" not in best  # weights for sampling only

    gen = run_script("generate.py", "To be", "--checkpoint", str(out), "--max-new-tokens", "12",
                     "--seed", "5", cwd=tmp_path)
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith("To be") and len(gen.stdout) > len("To be\n")
    assert f"sampling from {out / 'best.pt'}" in gen.stderr
    again = run_script("generate.py", "To be", "--checkpoint", str(out / "best.pt"),
                       "--max-new-tokens", "12", "--seed", "5", cwd=tmp_path)
    assert again.stdout == gen.stdout  # same seed, same text
    many = run_script("generate.py", "To be", "--checkpoint", str(out), "--num-samples", "2",
                      "--max-new-tokens", "5", "--temperature", "0", "--top-k", "0", cwd=tmp_path)
    assert many.returncode == 0, many.stderr
    assert "--- sample 1 ---" in many.stdout and "--- sample 2 ---" in many.stdout


def test_end_of_training_sample_with_several_samples(tmp_path, capsys):
    assert train.main(["--config", "tiny.yaml", f"--train.out_dir={tmp_path}", "--train.max_iters=1",
                       "--sample.num_samples=2", "--sample.max_new_tokens=3", "--sample.prompt=Hark"]) == 0
    out = capsys.readouterr().out
    assert "--- sample 1 ---\nHark" in out and "--- sample 2 ---\nHark" in out


def test_bad_input_through_a_real_process(tmp_path):
    result = run_script("train.py", "--config", "missing.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: config 'missing.yaml' not found")
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow  # a training run in subprocesses: over 8 s on 2 cores
def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-u", str(ROOT / "train.py"), "--config", "tiny.yaml", f"--train.out_dir={out}",
         "--train.max_iters=1000000", "--train.eval_interval=2"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    evaluations = 0
    for line in proc.stdout:  # the second evaluation comes after the first checkpoint
        evaluations += line.startswith("step ")
        if evaluations == 2:
            break
    proc.send_signal(signal.SIGINT)
    for line in proc.stderr:  # the first Ctrl-C asks for a stop after the step ...
        if line.startswith("SIGINT: finishing this step"):
            break
    proc.send_signal(signal.SIGINT)  # ... the second one (if it comes in time) stops at once
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in err
    assert torch.load(out / "latest.pt", weights_only=True)["step"] >= 2
    assert not (out / "latest.pt.tmp").exists()


def test_nan_loss_stops_naming_the_step_and_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    from gpt import optim
    schedule = optim.learning_rate
    monkeypatch.setattr(optim, "learning_rate", lambda step, cfg: math.nan if step == 3 else schedule(step, cfg))
    out = tmp_path / "run"
    assert train.main(["--config", "tiny.yaml", f"--train.out_dir={out}", "--train.eval_interval=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: loss is nan at step 5; last good checkpoint: {out / 'latest.pt'} (step 3); ")
    assert "lower train.learning_rate" in err and len(err.splitlines()) == 1
    for name in ("latest.pt", "best.pt"):
        state = torch.load(out / name, weights_only=True)
        assert state["step"] == 3 and all(t.isfinite().all() for t in state["model"].values())


def test_overwrite_replaces_the_run_in_the_folder(tmp_path):
    args = ["--config", "tiny.yaml", f"--train.out_dir={tmp_path}", "--sample.max_new_tokens=1"]
    assert train.main([*args, "--train.max_iters=2"]) == 0
    assert train.main([*args, "--train.max_iters=1"]) == 2  # refused: the folder holds a run
    assert torch.load(tmp_path / "latest.pt", weights_only=True)["step"] == 2
    assert train.main([*args, "--train.max_iters=1", "--model.n_layers=1", "--overwrite"]) == 0
    for name in ("latest.pt", "best.pt"):
        state = torch.load(tmp_path / name, weights_only=True)
        assert state["step"] == 1 and state["config"]["model"]["n_layers"] == 1


@pytest.mark.slow  # two training runs and a whole-split evaluation in this process
def test_the_final_val_loss_covers_every_window_of_the_val_split(tmp_path, corpus_file, capsys):
    """The figure printed at the end is the mean loss over every val window, computed independently here."""
    import re

    import numpy as np

    from gpt.checkpoint import load_model
    out = tmp_path / "run"
    assert train.main(["--config", "tiny.yaml", f"--data.corpus={corpus_file}", "--train.whole_val_at_end=true",
                       f"--data.prepared_dir={tmp_path / 'prepared'}", "--model.context_length=8",
                       "--data.val_fraction=0.3", "--data.batch_size=3", "--train.eval_iters=1",
                       f"--train.out_dir={out}", "--sample.max_new_tokens=1"]) == 0
    printed = re.search(r"val loss over all ([\d,]+) windows of the val split: (([\d.]+).*)", capsys.readouterr().out)
    model, _ = load_model(out / "latest.pt")
    tokens = np.fromfile(tmp_path / "prepared" / "val.bin", dtype=np.uint16).astype(np.int64)
    windows = (len(tokens) - 1) // 8  # non-overlapping windows of 8 and their next-token targets
    assert int(printed.group(1).replace(",", "")) == windows > 3 * 1  # more than the periodic subset
    x = torch.from_numpy(tokens[:windows * 8].reshape(windows, 8))
    y = torch.from_numpy(tokens[1:windows * 8 + 1].reshape(windows, 8))
    with torch.no_grad():
        expected = model.eval()(x, targets=y).item()
    assert float(printed.group(3)) == pytest.approx(expected, abs=1e-4)
    # python -m gpt evaluate on the same run prints the same figures: one code path for both.
    from gpt.tools import evaluate
    assert evaluate.main(["--checkpoint", str(out / "latest.pt")]) == 0
    scored = re.search(r"loss over all ([\d,]+) windows of the val split of .*corpus.txt: (.*)", capsys.readouterr().out)
    assert scored.group(1) == printed.group(1) and scored.group(2) == printed.group(2)
