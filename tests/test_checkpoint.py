"""Checkpoints survive kills and full disks, and the run folder's latest/best layout."""

import errno
import os
import random
import signal
import time

import pytest
import torch

from gpt import checkpoint
from gpt.checkpoint import BEST_NAME, LATEST_NAME, checkpoint_path, load_checkpoint, save_checkpoint
from gpt.errors import UserError

KILLS = 40


@pytest.mark.skipif(not hasattr(os, "fork"), reason="kills forked children")
def test_killed_while_saving_again_and_again_the_checkpoint_stays_loadable(tmp_path):
    path = tmp_path / LATEST_NAME
    # Two different 4 MB states, so a file mixing old and new bytes cannot pass for either.
    weights = [torch.full((1 << 20,), float(i)) for i in range(2)]
    save_checkpoint(path, {"model": {"w": weights[0]}, "config": {}, "step": 0})
    rng = random.Random(0)
    partial_files = 0
    for kill in range(KILLS):
        pid = os.fork()
        if pid == 0:  # the child saves without pause until it is killed
            try:
                step = 1
                while True:
                    save_checkpoint(path, {"model": {"w": weights[step % 2]}, "config": {}, "step": step})
                    step += 1
            finally:
                os._exit(1)  # never return into pytest, whatever happens
        started = os.stat(path).st_mtime_ns
        while os.stat(path).st_mtime_ns == started:  # it has replaced the file at least once
            time.sleep(0.001)
        time.sleep(rng.uniform(0, 0.02))  # then a random moment: mostly mid-save, as it is always saving
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        partial_files += path.with_name(path.name + ".tmp").exists()
        state = load_checkpoint(path)  # whole, and the one it claims to be
        assert torch.equal(state["model"]["w"], weights[state["step"] % 2])
    print(f"{KILLS} kills while saving, {partial_files} left a partial temporary file")


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / LATEST_NAME
    save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "config": {}, "step": 1})
    before = path.read_bytes()

    def full_disk(state, f):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(UserError, match=r"cannot write checkpoint .*latest.pt \(No space left on device\); "
                                        r"the previous checkpoint is kept; free some disk space"):
        save_checkpoint(path, {"model": {"w": torch.ones(3)}, "config": {}, "step": 2})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == [LATEST_NAME]  # no temporary file left behind


def test_a_run_folder_samples_from_best_then_latest(tmp_path):
    with pytest.raises(UserError, match=f"no checkpoint in .*looked for {BEST_NAME} and {LATEST_NAME}"):
        checkpoint_path(tmp_path)
    save_checkpoint(tmp_path / LATEST_NAME, {"model": {}, "config": {}})
    assert checkpoint_path(tmp_path) == tmp_path / LATEST_NAME
    save_checkpoint(tmp_path / BEST_NAME, {"model": {}, "config": {}})
    assert checkpoint_path(tmp_path) == tmp_path / BEST_NAME
    assert checkpoint_path(tmp_path / LATEST_NAME) == tmp_path / LATEST_NAME  # a file as given
