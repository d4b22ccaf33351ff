"""Data-parallel training: N processes under torchrun train exactly as one process does.

The end-to-end tests start real `torchrun` runs of train.py with two gloo (CPU) processes and
compare them with plain `python train.py` runs of the same config: losses, weights, the data
position, resuming with another number of processes, stopping with a signal. The unit tests
check the pieces: how batches are dealt out, and that DDP exchanges gradients once per step.
"""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as torch_dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from gpt import distributed
from gpt.config import TrainConfig, load_config
from gpt.data import TokenWindows, TrainBatches, eval_loader
from gpt.distributed import BatchShare, Distributed, SINGLE
from gpt.errors import UserError
from gpt.metrics import read_metrics
from gpt.model import GPTModel
from gpt.optim import build_optimizer
from gpt.precision import Precision
from gpt.training import evaluate, score, train_step

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
TOLERANCE = 1e-5  # float32: the two runs add the same numbers in another order


# --------------------------------------------------------------------------- dealing out batches

@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("rounds_before", [0, 1, 3, 5])  # 7 batches an epoch: rounds straddle epochs
def test_processes_read_the_single_process_stream_between_them(world_size, rounds_before):
    ds = TokenWindows(np.arange(200, dtype=np.uint16), max_length=4, stride=4)  # 49 windows, 7 batches
    single = TrainBatches(ds, 7, seed=3)
    stream = iter(single)
    states = []  # the single process's position after each batch
    expected = []
    for _ in range((rounds_before + 6) * world_size):
        expected.append(next(stream)[0])
        states.append(single.state_dict())
    ranks = [TrainBatches(ds, 7, seed=3, share=BatchShare(rank, world_size)) for rank in range(world_size)]
    for batches in ranks:  # all start where the single process was after rounds_before rounds
        if rounds_before:
            batches.load_state_dict(states[rounds_before * world_size - 1])
    iterators = [iter(batches) for batches in ranks]
    for round_ in range(rounds_before, rounds_before + 6):
        for rank, it in enumerate(iterators):
            assert torch.equal(next(it)[0], expected[round_ * world_size + rank]), (round_, rank)
        # The position rank 0 would save is the group's: where the single process is now.
        assert ranks[0].state_dict() == states[(round_ + 1) * world_size - 1]


@pytest.mark.parametrize("world_size", [2, 3, 5])
def test_evaluation_batches_are_dealt_out_without_overlap_or_gaps(world_size):
    ds = TokenWindows(np.arange(1000, dtype=np.uint16), max_length=4, stride=4)
    single = [x for x, _ in eval_loader(ds, batch_size=5, max_batches=4)]
    shares = [[x for x, _ in eval_loader(ds, 5, 4, rank, world_size)] for rank in range(world_size)]
    dealt = [shares[i % world_size][i // world_size] for i in range(len(single))]
    assert sum(map(len, shares)) == len(single) == 4  # a fifth process gets none: allowed
    assert all(torch.equal(a, b) for a, b in zip(single, dealt))


@pytest.mark.parametrize("world_size, batches_each", [(2, [3, 2]), (3, [2, 2, 1]), (6, [1, 1, 1, 1, 1, 0])])
def test_every_process_evaluates_full_shaped_batches_and_the_sums_add_up(world_size, batches_each, tiny_model):
    # 18 windows of 16 in batches of 4: 4 full batches and one of 2 (batch 4, padded), dealt out in turn
    ds = TokenWindows((np.arange(300) * 7 % 101).astype(np.uint16), max_length=16, stride=16)
    loaders = [eval_loader(ds, 4, None, rank, world_size) for rank in range(world_size)]
    assert [len(list(loader)) for loader in loaders] == batches_each  # fewer for some, none for one of 6
    assert all(x.shape == (4, 16) for loader in loaders for x, _ in loader)
    whole = score(tiny_model, eval_loader(ds, 4, None), CPU)
    shares = [score(tiny_model, loader, CPU) for loader in loaders]  # what `dist.sum` then adds up
    assert (sum(s.windows for s in shares), sum(s.tokens for s in shares)) == (whole.windows, whole.tokens) == (18, 288)
    assert sum(s.nats for s in shares) == pytest.approx(whole.nats, rel=TOLERANCE)


@pytest.mark.parametrize("batch_size, accum, world_size", [
    (4, 1, 2), (4, 1, 4), (6, 1, 3),  # one micro-batch a step: every process takes a slice of it
    (4, 2, 4), (2, 6, 4),  # 2 groups of 2 processes: each group whole micro-batches, sliced in two
    (2, 4, 2),  # micro-batches dealt out whole, as before
])
def test_processes_share_each_step_s_windows_whatever_divides_the_global_batch(batch_size, accum, world_size):
    ds = TokenWindows(np.arange(120, dtype=np.uint16), max_length=4, stride=4)  # 29 distinct windows
    single = TrainBatches(ds, batch_size, seed=3)
    stream = iter(single)
    places = [Distributed(rank=rank, world_size=world_size) for rank in range(world_size)]
    shares = places[0].batch_shares(accum)
    ranks = [TrainBatches(ds, batch_size, seed=3, share=BatchShare(p.rank, world_size, shares)) for p in places]
    iterators = [iter(batches) for batches in ranks]
    for step in range(8):  # several epochs
        expected = torch.cat([next(stream)[0] for _ in range(accum)])  # the step's windows in one process
        taken = []
        for place, it in zip(places, iterators):
            micro_batches = [next(it)[0] for _ in range(place.local_accum_steps(accum))]
            assert [len(b) for b in micro_batches] == [place.local_batch_size(batch_size, accum)] * len(micro_batches)
            taken.append(torch.cat(micro_batches))
        assert {len(t) for t in taken} == {batch_size * accum // world_size}  # equal shares
        assert sorted(torch.cat(taken).tolist()) == sorted(expected.tolist()), step  # the same windows, once each
        assert ranks[0].state_dict() == single.state_dict()  # the position rank 0 saves is the group's


def test_a_global_batch_that_cannot_be_shared_is_a_clear_error_naming_values_that_work():
    four = Distributed(world_size=4)
    four.check_batch(2, 6)  # 12 windows: 2 groups of 2 processes, 3 micro-steps of 1 window each
    with pytest.raises(UserError, match=r"^the global batch, data.batch_size x train.grad_accum_steps = 3 x 3 = 9 "
                       r"windows, cannot be shared evenly by 4 processes; start 1, 3 or 9 processes "
                       r"\(--nproc_per_node\), or make the global batch a multiple of 4: --data.batch_size=4 or "
                       r"--train.grad_accum_steps=4$"):
        four.check_batch(3, 3)
    Distributed().check_batch(3, 3)  # one process takes any
    for n in range(1, 9):  # every suggestion works, and is the smallest that does
        place = Distributed(world_size=n)
        for batch_size in range(1, 13):
            for accum in range(1, 7):
                try:
                    place.check_batch(batch_size, accum)
                except UserError as e:
                    counts, batch, steps = re.search(r"start (.+) processes .*batch_size=(\d+) or .*steps=(\d+)$",
                                                     str(e)).groups()
                    for count in re.findall(r"\d+", counts):
                        Distributed(world_size=int(count)).check_batch(batch_size, accum)
                    assert min(b for b in range(batch_size, 99) if b * accum % n == 0) == int(batch)
                    assert min(a for a in range(accum, 99) if batch_size * a % n == 0) == int(steps)
                    continue
                shares = place.batch_shares(accum)
                assert batch_size % shares == 0 and n % shares == 0  # the slices are whole windows
                assert (place.local_accum_steps(accum) * place.local_batch_size(batch_size, accum) * n
                        == batch_size * accum)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_runs_on_1_2_4_or_8_processes(path):
    cfg = load_config(str(path))
    for n in (1, 2, 4, 8):
        Distributed(world_size=n).check_batch(cfg.data.batch_size, cfg.train.grad_accum_steps)


@pytest.mark.parametrize("device, message", [
    (torch.device("mps"), "train.device mps cannot train with several processes"),
    (torch.device("cuda", 1), "each process uses the GPU of its LOCAL_RANK; set train.device to auto or cuda"),
])
def test_devices_torchrun_cannot_use_are_refused_before_joining(monkeypatch, device, message):
    for key, value in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(UserError, match=message):
        distributed.start(device)
    assert not torch_dist.is_initialized()


def test_without_torchrun_there_is_no_process_group(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    place, device = distributed.start(CPU)
    assert place == SINGLE and device == CPU and not torch_dist.is_initialized()


# --------------------------------------------------------------------------- DDP, in one process

@pytest.fixture
def process_group(tmp_path):
    """A gloo process group of this one process (what `torchrun --nproc_per_node=1` gives)."""
    torch_dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                                  world_size=1)
    yield Distributed(launched=True)
    torch_dist.destroy_process_group()


def test_gradients_are_exchanged_once_per_step_however_many_micro_steps(process_group, tiny_cfg):
    torch.manual_seed(0)
    model = GPTModel(tiny_cfg)
    ddp = process_group.wrap(model, CPU)
    exchanges = []

    def counting_allreduce(state, bucket):
        exchanges.append(bucket.index())
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, counting_allreduce)
    windows = torch.randint(0, tiny_cfg.vocab_size, (64, 2, 8))
    batches = iter([(w[:, :7], w[:, 1:]) for w in windows.unbind(1)] * 8)
    optimizer = build_optimizer(model, TrainConfig(), CPU)
    precision = Precision(torch.float32, CPU)

    train_step(ddp, batches, optimizer, precision, TrainConfig(grad_accum_steps=1), dist=process_group)
    per_step = len(exchanges)
    assert per_step >= 1
    train_step(ddp, batches, optimizer, precision, TrainConfig(grad_accum_steps=4), dist=process_group)
    assert len(exchanges) == 2 * per_step  # not 5x: the first three micro-steps skip the exchange


def test_evaluation_and_stop_requests_go_through_the_group(process_group, tiny_model):
    ds = TokenWindows(np.arange(300, dtype=np.uint16) % 101, max_length=8, stride=8)
    loader = eval_loader(ds, 4, 3)
    assert evaluate(tiny_model, loader, CPU, dist=process_group) == pytest.approx(evaluate(tiny_model, loader, CPU))
    assert process_group.any(True, CPU) and not process_group.any(False, CPU)
    assert process_group.gather({"rank": 0}) == [{"rank": 0}]


# --------------------------------------------------------------------------- torchrun end to end

STEPS = 6


@pytest.fixture(scope="module")
def run_args(tmp_path_factory) -> list[str]:
    """A tiny run, 4 micro-batches of 2 per step (4 windows evaluated), without dropout (so runs can
    match), at a constant learning rate (so a run may stop at step 3 and be resumed to 6), in float32
    whatever `auto` would pick on this CPU: the bounds below are float32's (the bf16 runs compared
    in tests/test_cpu_bf16.py have their own)."""
    folder = tmp_path_factory.mktemp("corpus")
    corpus = folder / "lines.txt"
    corpus.write_text("\n".join(f"Line {i}: the quick brown fox, number {i * 7 % 13}, jumps over the dog."
                                for i in range(60)), encoding="utf-8")
    items = folder / "items.jsonl"  # 7 multiple-choice items, scored at each evaluation: 4 and 3 for two processes
    items.write_text("".join(json.dumps({"context": f"Line {i}: the quick brown fox, number",
                                         "endings": [f"{i * 7 % 13}, jumps", "over the dog", f"{i}"], "label": 0}) + "\n"
                             for i in range(7)), encoding="utf-8")
    return ["--config", "tiny.yaml", f"--data.corpus={corpus}", f"--data.prepared_dir={folder / 'prepared'}",
            f"--train.eval_tasks=[{items}]",
            "--model.context_length=16", "--model.drop_rate=0", "--data.batch_size=2",
            "--train.grad_accum_steps=4", "--train.eval_iters=2", "--train.eval_interval=1", "--train.warmup_iters=0",
            "--train.learning_rate=1e-3", "--train.min_lr=1e-3", "--sample.max_new_tokens=1", "--train.dtype=float32"]


def command(processes: int, args: list[str]) -> list[str]:
    """`python train.py ARGS` for one process, `torchrun --nproc_per_node=N train.py ARGS` for more."""
    script = str(ROOT / "train.py")
    if processes == 1:
        return [sys.executable, "-u", script, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            script, *args]


def launch(processes: int, args: list[str], cwd: Path) -> subprocess.Popen:
    # One thread each: these models are fastest so on a shared CPU (any fixed count is exact).
    return subprocess.Popen(command(processes, args), cwd=cwd, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                         "PYTHONUNBUFFERED": "1"})


def train_run(processes: int, args: list[str], cwd: Path) -> str:
    """Run to the end; its standard output."""
    out, err = launch(processes, args, cwd).communicate(timeout=300)
    assert "stopped at" not in out and "saved " in out, out + err
    return out


def losses(out_dir: Path) -> np.ndarray:
    """(steps, 2): the train and val loss of every evaluation in metrics.csv."""
    rows = (out_dir / "metrics.csv").read_text().splitlines()[1:]
    return np.array([[float(v) for v in row.split(",")[2:4]] for row in rows])


def largest_difference(a: Path, b: Path, same_batches: bool = True) -> float:
    """The largest difference between two checkpoints' weights (which must cover the same steps,
    and, unless told otherwise, count the data position in batches of the same size)."""
    first, second = (torch.load(p / "latest.pt", weights_only=True) for p in (a, b))
    assert first["step"] == second["step"] and (first["data"] == second["data"] or not same_batches)
    return max((first["model"][k] - second["model"][k]).abs().max().item() for k in first["model"])


@pytest.fixture(scope="module")
def one_process(run_args, tmp_path_factory) -> Path:
    """The single-process run (the default optimizer, Muon)."""
    out = tmp_path_factory.mktemp("one")
    train_run(1, [*run_args, f"--train.max_iters={STEPS}", f"--train.out_dir={out}"], out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_two_processes_train_exactly_like_one(run_args, one_process, tmp_path, optimizer):
    args = [*run_args, f"--train.max_iters={STEPS}", f"--train.optimizer={optimizer}"]
    if optimizer == "muon":
        single = one_process
    else:
        single = tmp_path / "one"
        train_run(1, [*args, f"--train.out_dir={single}"], tmp_path)
    out = tmp_path / "two"
    printed = train_run(2, [*args, f"--train.out_dir={out}"], tmp_path)
    assert ("global batch: 2 windows x 4 micro-steps = 128 tokens per step; each of 2 processes runs 2 micro-steps "
            "of 2 windows") in printed
    assert printed.count("step 1: train loss") == 1  # rank 0 alone reports
    two, one = losses(out), losses(single)
    assert two.shape == one.shape == (STEPS, 2)
    # the task's items split between the processes, their counts summed: the single process's figures
    tasks = [[(r["items_acc"], r["items_acc_norm"]) for r in read_metrics(run / "metrics.csv")] for run in (out, single)]
    assert tasks[0] == tasks[1] and len(tasks[0]) == STEPS and all(0 <= a <= 1 for a, _ in tasks[0])
    assert np.abs(two - one).max() < TOLERANCE
    assert one[-1, 0] < one[0, 0] - 0.1  # it did learn: the comparison is not of two idle runs
    assert largest_difference(out, single) < TOLERANCE
    checkpoint = torch.load(out / "latest.pt", weights_only=True)
    assert checkpoint["world_size"] == 2 and len(checkpoint["rank_rng"]) == 1
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in checkpoint["model"])
    assert set(checkpoint["optimizer"]) == ({"muon", "adamw"} if optimizer == "muon" else {"state", "param_groups"})

    if optimizer == "adamw":
        return
    # Sampling from it needs no processes, no DDP.
    sample = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--checkpoint", str(out),
                             "--max-new-tokens", "3", "Line 3"], capture_output=True, text=True, timeout=120)
    assert sample.returncode == 0 and sample.stdout.startswith("Line 3"), sample.stderr


@pytest.mark.slow
def test_four_processes_sharing_micro_batches_train_exactly_like_one(run_args, one_process, tmp_path):
    """2 micro-batches of 4 windows a step among 4 processes: 2 groups of 2, each process taking 2
    windows of one micro-batch. The same 8 windows a step as the single process's 4 micro-batches
    of 2, and the same 4 windows evaluated (1 batch of 4 for its 2 of 2). With activation
    checkpointing inside DDP, which must change nothing either."""
    out = tmp_path / "four"
    printed = train_run(4, [*run_args, "--data.batch_size=4", "--train.grad_accum_steps=2", "--train.eval_iters=1",
                            "--train.activation_checkpointing=true", f"--train.max_iters={STEPS}",
                            f"--train.out_dir={out}"], tmp_path)
    assert ("global batch: 4 windows x 2 micro-steps = 128 tokens per step; each of 4 processes runs 1 micro-step "
            "of 2 windows") in printed
    four, one = losses(out), losses(one_process)
    assert four.shape == one.shape == (STEPS, 2)
    assert np.abs(four - one).max() < TOLERANCE
    assert largest_difference(out, one_process, same_batches=False) < TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_a_run_resumes_with_another_number_of_processes(run_args, one_process, tmp_path, first, then):
    args = [*run_args, f"--train.out_dir={tmp_path}"]
    train_run(first, [*args, f"--train.max_iters={STEPS // 2}"], tmp_path)
    printed = train_run(then, [*args, f"--train.max_iters={STEPS}", "--resume"], tmp_path)
    assert f"written by {first} process" in printed and f"continues with {then}" in printed
    assert np.abs(losses(tmp_path) - losses(one_process)).max() < TOLERANCE
    assert largest_difference(tmp_path, one_process) < TOLERANCE


@pytest.mark.slow  # a training run in subprocesses: over 8 s on 2 cores
def test_ctrl_c_stops_every_process_at_one_step_and_saves(run_args, one_process, tmp_path):
    out = tmp_path / "run"
    proc = launch(2, [*run_args, "--train.max_iters=100000", "--train.eval_interval=5",
                     f"--train.out_dir={out}"], tmp_path)
    for line in proc.stdout:  # rank 0's output: training under way
        if line.startswith("step 5:"):
            break
    proc.send_signal(signal.SIGINT)  # what Ctrl-C does: torchrun passes it to both processes
    out_text, err = proc.communicate(timeout=120)
    stopped = [line for line in out_text.splitlines() if line.startswith("stopped at step ")]
    assert len(stopped) == 1, out_text + err
    step = int(stopped[0].split()[3].rstrip(";"))
    assert torch.load(out / "latest.pt", weights_only=True)["step"] == step
    resume = shlex.split(stopped[0].split("resume with: ", 1)[1])
    assert resume[:2] == ["torchrun", "--nproc_per_node=2"] and resume[-1] == "--resume"


@pytest.mark.slow
def test_two_processes_with_dropout_resume_bit_identical(run_args, tmp_path):
    """Each process's dropout RNG is saved (rank 0 gathers them) and given back to it on resume."""
    args = [*run_args, "--model.drop_rate=0.1"]
    unbroken, broken = tmp_path / "unbroken", tmp_path / "broken"
    train_run(2, [*args, f"--train.max_iters={STEPS}", f"--train.out_dir={unbroken}"], tmp_path)
    train_run(2, [*args, f"--train.max_iters={STEPS // 2}", f"--train.out_dir={broken}"], tmp_path)
    train_run(2, [*args, f"--train.max_iters={STEPS}", f"--train.out_dir={broken}", "--resume"], tmp_path)
    assert largest_difference(unbroken, broken) == 0.0


def test_out_of_memory_under_torchrun_names_each_process_s_share():
    """small.yaml's 16 windows on 4 processes: each ran out with its 4, and halving data.batch_size
    (with twice the accumulation) keeps the global batch, which 4 processes still share."""
    from gpt.resume import out_of_memory_error
    from gpt.training import OutOfMemory
    cfg = load_config("small.yaml", ["--train.activation_checkpointing=true"])
    error = OutOfMemory("training step", 7, torch.device("cuda", 1),
                        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB. GPU 1 has ..."))
    place = Distributed(rank=1, world_size=4, launched=True)
    message = str(out_of_memory_error(error, cfg, place, Path("runs/small/latest.pt"), 5))
    assert message == ("out of memory on cuda:1 during training step 7 (tried to allocate 1.50 GiB) with batches "
                       "of 4 windows x 128 tokens on each of 4 processes (data.batch_size 16, model.context_length "
                       "128); to fit, lower data.batch_size and raise train.grad_accum_steps to keep the global "
                       "batch (e.g. --data.batch_size=8 --train.grad_accum_steps=2), or lower "
                       "model.context_length; the last checkpoint, runs/small/latest.pt (step 5), is kept")
    place.check_batch(8, 2)  # the suggestion works with these processes
