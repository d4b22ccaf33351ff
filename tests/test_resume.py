"""Exact resume: a run killed for real (SIGKILL) or stopped (SIGINT, SIGTERM) and continued
ends with the very weights of a run that never stopped; and the pieces that make it so."""

import os
import random
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt.resume import rng_state, seed_everything, set_rng_state

ROOT = Path(__file__).resolve().parent.parent
MAX_ITERS = 60  # ~9 epochs of the corpus below: resumes land mid-epoch and across epochs


def draws() -> tuple:
    return random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(3).tolist()


def test_rng_state_round_trips_through_a_safe_checkpoint(tmp_path):
    seed_everything(5)
    np.random.randn()  # leaves a cached gaussian in NumPy's state
    torch.save({"rng": rng_state()}, tmp_path / "rng.pt")
    expected = draws()
    seed_everything(6)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    assert draws() == expected


@pytest.fixture(scope="module")
def run_args(tmp_path_factory) -> list[str]:
    """A tiny run with dropout on, saving every 5 steps, on a corpus of 7 batches per epoch."""
    folder = tmp_path_factory.mktemp("corpus")
    corpus = folder / "lines.txt"
    speakers, animals = ["ROMEO", "JULIET", "NURSE"], ["fox", "owl", "cat"]
    corpus.write_text("\n".join(f"{speakers[i % 3]}:\nWherefore art thou {i * 7 % 13} times, said the "
                                f"{animals[i % 3]}.\n" for i in range(14)), encoding="utf-8")
    return ["--config", "tiny.yaml", f"--data.corpus={corpus}", f"--data.prepared_dir={folder / 'prepared'}",
            "--model.context_length=16", "--data.batch_size=2", "--model.drop_rate=0.1",
            f"--train.max_iters={MAX_ITERS}", "--train.eval_interval=5", "--sample.max_new_tokens=1"]


def train_process(args: list[str], cwd: Path) -> subprocess.Popen:
    # One thread: a model this small is fastest so on a shared CPU (any fixed count is exact).
    return subprocess.Popen([sys.executable, "-u", str(ROOT / "train.py"), *args], cwd=cwd,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def read_until(proc: subprocess.Popen, start: str) -> str:
    """Read the run's output until a line starting with `start`; the run must still be going."""
    for line in proc.stdout:
        if line.startswith(start):
            return line
    raise AssertionError(f"no line starting {start!r}: {finish(proc)}")


@pytest.fixture(scope="module")
def references(run_args, tmp_path_factory):
    """optimizer -> the final checkpoint of a run with that train.optimizer that never stopped."""
    finished = {}

    def reference(optimizer: str) -> dict:
        if optimizer not in finished:
            out = tmp_path_factory.mktemp(f"unbroken-{optimizer}")
            code, _, err = finish(train_process([*run_args, f"--train.optimizer={optimizer}",
                                                 f"--train.out_dir={out}"], out))
            assert code == 0, err
            finished[optimizer] = torch.load(out / "latest.pt", weights_only=True)
        return finished[optimizer]
    return reference


def optimizer_tensors(state: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of an optimizer's state_dict (AdamW's, or Muon's and AdamW's), by path."""
    if "state" not in state:  # {"muon": ..., "adamw": ...}
        return {k: v for name, part in state.items() for k, v in optimizer_tensors(part, f"{name}.").items()}
    return {f"{prefix}{param}.{key}": value for param, values in state["state"].items()
            for key, value in values.items() if isinstance(value, torch.Tensor)}


def assert_same_run(reference: dict, latest: Path) -> None:
    resumed = torch.load(latest, weights_only=True)
    assert resumed["step"] == reference["step"] == MAX_ITERS
    assert reference["model"].keys() == resumed["model"].keys()
    for name, tensor in reference["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name  # bit for bit
    expected, got = optimizer_tensors(reference["optimizer"]), optimizer_tensors(resumed["optimizer"])
    assert expected.keys() == got.keys() and len(expected) > 0
    for name, tensor in expected.items():
        assert torch.equal(tensor, got[name]), name
    assert resumed["val_loss"] == reference["val_loss"]


@pytest.mark.slow
@pytest.mark.precision  # exact in either of auto's precisions
@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_run_killed_with_sigkill_resumes_bit_identical(run_args, references, tmp_path, optimizer):
    out = tmp_path / "run"
    args = [*run_args, f"--train.optimizer={optimizer}", f"--train.out_dir={out}"]
    proc = train_process(args, tmp_path)
    read_until(proc, "step 10:")  # two checkpoints in: kill it now, perhaps while it saves
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    killed_at = torch.load(out / "latest.pt", weights_only=True)["step"]
    assert 0 < killed_at < MAX_ITERS

    code, out_text, err = finish(train_process([*args, "--resume"], tmp_path))
    assert code == 0, err
    assert f"at step {killed_at}\n" in out_text
    assert_same_run(references(optimizer), out / "latest.pt")


def stop_with(sig: int, proc: subprocess.Popen, out: Path) -> list[str]:
    """Send `sig` to a training run; check it saved and stopped; return its resume command."""
    proc.send_signal(sig)
    code, out_text, err = finish(proc)
    assert code == 128 + sig, err
    assert "Traceback" not in err
    stopped = [line for line in out_text.splitlines() if line.startswith("stopped at step ")]
    assert len(stopped) == 1, out_text
    step = int(stopped[0].split()[3].rstrip(";"))
    assert torch.load(out / "latest.pt", weights_only=True)["step"] == step < MAX_ITERS
    command = shlex.split(stopped[0].split("resume with: ", 1)[1])
    assert command[:2] == ["python", str(Path(os.path.relpath(ROOT / "train.py", out.parent)))]
    assert command[-1] == "--resume" and "--overwrite" not in command
    return command[2:]


@pytest.mark.slow
def test_sigterm_then_sigint_each_save_print_the_command_and_it_resumes_exactly(run_args, references, tmp_path):
    out = tmp_path / "run"
    proc = train_process([*run_args, f"--train.out_dir={out}", "--overwrite"], tmp_path)
    read_until(proc, "step 5:")  # training (and the signal handlers) under way
    args = stop_with(signal.SIGTERM, proc, out)
    proc = train_process(args, tmp_path)
    read_until(proc, "resuming ")  # the resumed run is stopped too, before any evaluation
    args = stop_with(signal.SIGINT, proc, out)
    code, _, err = finish(train_process(args, tmp_path))
    assert code == 0, err
    assert_same_run(references("muon"), out / "latest.pt")


@pytest.mark.slow  # a training run in subprocesses: over 8 s on 2 cores
def test_activation_checkpointing_changes_no_weight_and_resumes_exactly(run_args, references, tmp_path,
                                                                        monkeypatch):
    """With dropout on: the checkpointed blocks replay their masks in backward, so a run with
    activation checkpointing, stopped halfway and resumed, ends on the unbroken plain run's weights."""
    import train
    from gpt.resume import StopRequest

    class StopHalfway(StopRequest):  # as if SIGTERM came during step MAX_ITERS / 2
        asked = 0

        def __call__(self) -> bool:
            StopHalfway.asked += 1
            return StopHalfway.asked == MAX_ITERS // 2

    monkeypatch.setattr(train, "StopRequest", StopHalfway)
    args = [*run_args, f"--train.out_dir={tmp_path / 'run'}", "--train.activation_checkpointing=true"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the reference ran: sums in the same order
    try:
        assert train.main(args) == 128 + signal.SIGTERM
        assert torch.load(tmp_path / "run" / "latest.pt", weights_only=True)["step"] == MAX_ITERS // 2
        assert train.main([*args, "--resume"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert_same_run(references("muon"), tmp_path / "run" / "latest.pt")


def test_resume_allows_another_attention_path_but_not_another_model(tmp_path):
    """train.attn_impl changes how attention is computed, not the weights: a resume may switch it."""
    import dataclasses

    from gpt.config import Config
    from gpt.errors import UserError
    from gpt.resume import RESUME_KEYS, check_resumable
    saved = Config()
    checkpoint = {key: None for key in RESUME_KEYS} | {"config": dataclasses.asdict(saved), "step": 10,
                                                       "optimizer": {"muon": {}, "adamw": {}}}
    switched = dataclasses.replace(saved, train=dataclasses.replace(saved.train, attn_impl="explicit"))
    notes = check_resumable(checkpoint, tmp_path / "latest.pt", switched)
    assert notes == ["train.attn_impl: checkpoint 'sdpa', config 'explicit'"]
    deeper = dataclasses.replace(saved, model=dataclasses.replace(saved.model, n_layers=7))
    with pytest.raises(UserError, match="model.n_layers: checkpoint 6, config 7"):
        check_resumable(checkpoint, tmp_path / "latest.pt", deeper)


def test_resume_refuses_another_optimizer_whatever_the_config_says(tmp_path):
    """Which optimizer wrote a checkpoint is read from its state (older configs do not name it)."""
    import dataclasses

    from gpt.config import Config
    from gpt.errors import UserError
    from gpt.resume import RESUME_KEYS, check_resumable
    muon = Config()
    adamw = dataclasses.replace(muon, train=dataclasses.replace(muon.train, optimizer="adamw"))
    old_config = dataclasses.asdict(muon)
    del old_config["train"]["optimizer"]  # as written before train.optimizer existed (AdamW only)
    written_by_adamw = {key: None for key in RESUME_KEYS} | {"config": old_config, "step": 10,
                                                            "optimizer": {"state": {}, "param_groups": []}}
    assert check_resumable(written_by_adamw, tmp_path / "latest.pt", adamw) == []
    with pytest.raises(UserError, match=r"trained with train.optimizer adamw and the config asks for muon: .* "
                                        r"resume with --train.optimizer=adamw"):
        check_resumable(written_by_adamw, tmp_path / "latest.pt", muon)
