"""The scripts, end to end, as a user runs them; and bad input as a user makes it."""

import math
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import generate
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


class Payload:
    """Unpickling this runs code (it creates a file): what weights_only=True must refuse."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


@pytest.fixture
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert train.main(["--config", "tiny.yaml", f"--train.out_dir={out}", "--train.max_iters=2",
                       "--sample.max_new_tokens=2"]) == 0
    return out


def bad_train_inputs(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model:\n  n_layer: 2\n", encoding="utf-8")
    typed = tmp_path / "typed.yaml"
    typed.write_text("train:\n  max_iters: many\n", encoding="utf-8")
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    short = tmp_path / "short.txt"
    short.write_text("Too short to train on. " * 3, encoding="utf-8")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("Ophélie".encode("latin-1") * 100)
    base = ["--config", "tiny.yaml", f"--train.out_dir={tmp_path / 'out'}"]
    return {
        "missing config": (["--config", str(tmp_path / "nope.yaml")], "not found"),
        "unknown key": (["--config", str(cfg)], "unknown key model.n_layer"),
        "mistyped value": (["--config", str(typed)], "train.max_iters .* must be int"),
        "unknown override": (base + ["--train.lr=1"], "unknown key train.lr"),
        "unknown option": (base + ["--fast"], "unknown option --fast"),
        "missing data path": (base + [f"--data.corpus={tmp_path / 'none.txt'}"], "does not exist"),
        "empty corpus": (base + [f"--data.corpus={empty}"], "is empty"),
        "short corpus": (base + [f"--data.corpus={short}"], "fewer than one window"),
        "not utf-8": (base + [f"--data.corpus={latin}"], "not UTF-8"),
        "bad value": (base + ["--model.n_heads=3"], "divisible"),
        "unwritable out_dir": (["--config", "tiny.yaml", f"--train.out_dir={cfg}/run"],
                               "cannot create train.out_dir"),
        "no cuda": (base + ["--train.device=cuda"], "CUDA is not available") if not torch.cuda.is_available()
        else (base + ["--train.device=tpu"], "train.device must be"),
    }


BAD_TRAIN_CASES = ["missing config", "unknown key", "mistyped value", "unknown override",
                   "unknown option", "missing data path", "empty corpus", "short corpus",
                   "not utf-8", "bad value", "unwritable out_dir", "no cuda"]


@pytest.mark.parametrize("case", BAD_TRAIN_CASES)
def test_bad_train_input_is_one_clear_line(case, tmp_path, capsys):
    argv, message = bad_train_inputs(tmp_path)[case]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize("script,argv,message", [
    (generate, [], "the following arguments are required: prompt"),
    (generate, ["Hi", "--max-new-tokens", "many"], "invalid int value: 'many'"),
    (train, ["--config"], "expected one argument"),
])
def test_bad_command_line_is_one_clear_line(script, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err


def test_bad_generate_input_is_one_clear_line(trained_run, tmp_path, capsys):
    before = (trained_run / "latest.pt").read_bytes()
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(before[: len(before) // 2])
    state = torch.load(trained_run / "latest.pt", weights_only=True)
    state["config"]["model"]["emb_dim"] = 64
    mismatched = tmp_path / "mismatched.pt"
    torch.save(state, mismatched)
    evil = tmp_path / "evil.pt"
    torch.save({"model": Payload(tmp_path / "pwned"), "config": {}}, evil)
    cases = [
        (["Hi", "--checkpoint", str(evil)], "cannot read checkpoint"),
        (["", "--checkpoint", str(trained_run)], "prompt is empty"),
        (["Hi", "--checkpoint", str(mismatched)], "do not fit the model its config describes (size mismatch"),
        (["Hi", "--checkpoint", str(tmp_path / "nowhere")], "no checkpoint at"),
        (["Hi", "--checkpoint", str(garbage)], "cannot read checkpoint"),
        (["Hi", "--checkpoint", str(truncated)], "cannot read checkpoint"),
        (["Hi", "--checkpoint", str(trained_run), "--top-p", "2"], "--top-p"),
        (["Hi", "--checkpoint", str(trained_run), "--max-new-tokens", "0"], "--max-new-tokens"),
        (["Hi", "--checkpoint", str(trained_run), "--device", "tpu"], "--device must be auto, cpu"),
    ]
    for argv, message in cases:
        assert generate.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
    assert (trained_run / "latest.pt").read_bytes() == before
    assert not (tmp_path / "pwned").exists()  # the pickle's code never ran


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
    from gpt import training
    schedule = training.learning_rate
    monkeypatch.setattr(training, "learning_rate", lambda step, cfg: math.nan if step == 3 else schedule(step, cfg))
    out = tmp_path / "run"
    assert train.main(["--config", "tiny.yaml", f"--train.out_dir={out}", "--train.eval_interval=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: loss is nan at step 5; last good checkpoint: {out / 'latest.pt'} (step 3); ")
    assert "lower train.learning_rate" in err and len(err.splitlines()) == 1
    for name in ("latest.pt", "best.pt"):
        state = torch.load(out / name, weights_only=True)
        assert state["step"] == 3 and all(t.isfinite().all() for t in state["model"].values())
