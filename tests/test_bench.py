import re
from pathlib import Path

import pytest
import torch

from gpt import bench
from gpt.bench import speed
from gpt.config import load_config
from gpt.model import GPTModel, ModelConfig


def test_flops_per_token_counts_every_matmul_weight():
    cfg = ModelConfig(vocab_size=1000, context_length=64, emb_dim=48, n_heads=4, n_layers=3)
    model = GPTModel(cfg)
    # Independent count: every Linear weight in the blocks, plus the head over the real vocabulary.
    block_weights = sum(m.weight.numel() for m in model.trf_blocks.modules() if isinstance(m, torch.nn.Linear))
    expected = 6 * (block_weights + cfg.vocab_size * cfg.emb_dim) + 12 * 3 * 64 * 48
    assert speed.flops_per_token(cfg) == expected


@pytest.mark.parametrize("name,dtype,peak", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989e12),
    ("NVIDIA H100 PCIe", torch.bfloat16, 756e12),
    ("NVIDIA H200", torch.float32, 494e12),
    ("NVIDIA A100-SXM4-40GB", torch.float16, 312e12),
    ("NVIDIA L4", torch.bfloat16, 121e12),
    ("NVIDIA GeForce RTX 4090", torch.bfloat16, 165.2e12),
    ("Tesla K80", torch.bfloat16, None),
])
def test_gpu_peak_table(name, dtype, peak, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    found, source = speed.gpu_peak_flops(torch.device("cuda"), dtype)
    assert found == peak
    assert name in source and (peak is not None or "unknown" in source)


@pytest.mark.slow  # a benchmark's whole flow: several training or preparation runs
def test_bench_runs_and_reports_against_the_baseline(capsys):
    code = bench.main(["--config", "tiny.yaml", "--steps", "1", "--warmup", "0", "--rounds", "2",
                       "--sample-tokens", "5", "--variants", "sdpa:float32:off,sdpa:float32:off:ckpt", "--ddp",
                       "--optimizer-steps"])
    out = capsys.readouterr().out
    assert code == 0
    rows = {line.strip().split("  ")[0]: line for line in out.splitlines() if line.endswith("x")}
    assert set(rows) >= {"baseline (plain path)", "sdpa:float32:off", "sdpa:float32:off:ckpt",
                         "default in DDP (1 process)"}
    assert rows["baseline (plain path)"].endswith(" 1.00x")
    assert "MFU" in out and "%" in rows["sdpa:float32:off"]  # a measured CPU peak gives an MFU
    assert "kv cache:" in out and "recompute:" in out
    assert "DDP wrapper: the default path inside DDP runs at " in out
    lines = out.split("optimizer step alone")[1].split("\nsampling:")[0].splitlines()[1:]  # below its title
    steps = {row.group(1): row.group(2) for row in map(re.compile(r"\s+(\S.+?)\s+(\d[\d.]* ms.*)").match, lines) if row}
    assert list(steps) == ["clip_grad_norm_ (train.grad_clip)", "adamw (fused)", "muon + adamw, as train.py builds it",
                           "its muon part alone", "torch.optim.Muon (bf16 inside)"]
    cells = {name: re.findall(r"[\d.]+ ms +[\d.]+% +(\d+)", row) for name, row in steps.items()}  # aten ops per path
    assert not cells["clip_grad_norm_ (train.grad_clip)"] and len(cells["torch.optim.Muon (bf16 inside)"]) == 1
    for name in ("adamw (fused)", "muon + adamw, as train.py builds it", "its muon part alone"):
        plain, skip_path = map(int, cells[name])  # step(), then steps_unless as train_step runs it
        assert 0 < plain <= skip_path, steps[name]


def test_bench_prints_the_settings_to_match_and_a_command_that_repeats_them(capsys):
    argv = ["--config", "tiny.yaml", "--model.drop_rate=0.2", "--train.grad_clip=0.5", "--data.batch_size=3"]
    assert bench.main([*argv, "--steps", "1", "--warmup", "0", "--rounds", "1", "--sample-tokens", "0"]) == 0
    out = capsys.readouterr().out
    assert "micro-batch 3 x " in out and "dropout 0.2" in out and "grad clip 0.5" in out
    repeat = next(line for line in out.splitlines() if "to repeat: " in line).split("to repeat: ")[1].split()
    assert repeat[:6] == ["python", "-m", "gpt", "bench", "--config", "tiny.yaml"]
    assert load_config("tiny.yaml", repeat[6:]) == load_config("tiny.yaml", argv[2:])  # the same run


@pytest.mark.slow
def test_memory_bench_measures_less_with_activation_checkpointing(capsys):
    """Each setting in its own process; at a size where the blocks' activations outweigh the
    logits (a 256-token vocabulary, context 256, 8 layers), checkpointing must cut training's peak
    memory (measured: to 0.50x-0.56x of it, once 0.78x; resident memory is noisy). The ratio is read
    from the bench's own line, computed before rounding: the GiB columns' two decimals alone can
    turn 0.78x into 0.80x."""
    code = bench.main(["memory", "--config", "tiny.yaml", "--model.vocab_size=256", "--model.context_length=256",
                       "--model.n_layers=8", "--data.batch_size=16", "--train.optimizer=adamw", "--steps", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    # off|on, peak, before training, training (GiB)
    rows = dict(re.findall(r"^(off|on) +[\d.]+ G +[\d.]+ G +([\d.]+) G ", out, re.MULTILINE))
    assert set(rows) == {"off", "on"} and all(float(value) > 0 for value in rows.values()), out
    ratio = re.search(r"^on / off +[\d.]+x +([\d.]+)x", out, re.MULTILINE)  # peak, then training's own
    assert "peak resident (RSS)" in out and ratio and float(ratio[1]) < 0.85, out


@pytest.mark.slow
def test_memory_bench_compares_full_fine_tuning_with_lora(capsys):
    """On random weights of the config's shape: LoRA trains a small fraction of the parameters, and its
    optimizer state and gradients are as small, so training's own peak memory is lower."""
    code = bench.main(["memory", "--config", "tiny.yaml", "--compare", "lora", "--train.optimizer=adamw",
                       "--model.emb_dim=256", "--model.n_heads=4", "--model.n_layers=4", "--steps", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    # full|lora, peak, before training, training (GiB), trainable (M), step (s)
    rows = {name: (float(training), float(trainable)) for name, training, trainable in re.findall(
        r"^(full|lora) +[\d.]+ G +[\d.]+ G +([\d.]+) G +([\d.]+)M +[\d.]+s$", out, re.MULTILINE)}
    assert set(rows) == {"full", "lora"}, out
    assert rows["lora"][1] < 0.05 * rows["full"][1], out  # rank 8 on every linear of 4 blocks 256 wide: ~1%
    assert rows["lora"][0] < rows["full"][0], out
    assert "LoRA rank 8, alpha 16 on attention, mlp" in out and re.search(r"^lora / full +[\d.]+x", out, re.MULTILINE)


def test_memory_bench_of_lora_with_muon_is_one_line(capsys):
    assert bench.main(["memory", "--config", "tiny.yaml", "--compare", "lora"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --compare lora: LoRA trains with AdamW and train.optimizer is muon; add "
                   "--train.optimizer=adamw so that both settings use it")


def test_bench_bad_variant_is_one_line_error(capsys):
    assert bench.main(["--config", "tiny.yaml", "--variants", "sdpa:fp8:on"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot read variant 'sdpa:fp8:on'") and "\n" not in err
    assert speed.parse_variant("sdpa:auto:auto:ckpt").activation_checkpointing
    assert not speed.parse_variant("sdpa:auto:auto").activation_checkpointing
    assert bench.main(["--config", "tiny.yaml", "--variants", "sdpa:auto:auto:fast"]) == 2


@pytest.mark.slow  # a benchmark's whole flow: several training or preparation runs
def test_race_trains_each_variant_in_turn_and_reports_loss_per_second(corpus_file, tmp_path, capsys):
    code = bench.main(["race", "--config", "tiny.yaml", "--variants", "adamw,muon+train.muon_lr=0.05",
                       f"--data.corpus={corpus_file}", f"--data.prepared_dir={tmp_path / 'prepared'}",
                       "--model.context_length=16", "--train.max_iters=6", "--eval-every", "3"])
    out = capsys.readouterr().out
    assert code == 0
    final = {line.split()[0]: line.split() for line in out.split("every window of the val split:")[1]
             .split("\n\n")[0].splitlines()[2:]}
    assert set(final) == {"adamw", "muon+train.muon_lr=0.05"}
    for columns in final.values():
        assert columns[1] == "6" and 0 < float(columns[-1]) < 11  # steps, whole-val loss
    assert "at equal seconds" in out and "time to reach val loss" in out
    assert out.count(": step 3, ") == 2 and out.count(": step 6, ") == 2  # both evaluated at 3 and 6


def test_race_reads_loss_curves_between_evaluations():
    from gpt.bench.race import loss_at, seconds_to
    curve = [(10, 100, 2.0, 6.0), (20, 200, 4.0, 5.0), (30, 300, 6.0, 4.5)]  # (step, tokens, s, loss)
    assert loss_at(curve, 3.0) == pytest.approx(5.5)
    assert loss_at(curve, 1.0) is None and loss_at(curve, 9.0) == 4.5
    assert seconds_to(curve, 5.5) == pytest.approx(3.0)
    assert seconds_to(curve, 6.5) == 2.0  # reached at the first evaluation
    assert seconds_to(curve, 4.0) is None


def test_race_bad_variant_is_one_line_error(capsys):
    assert bench.main(["race", "--config", "tiny.yaml", "--variants", "sgd"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot read variant 'sgd'") and "\n" not in err


def test_every_row_of_the_small_yaml_sweep_is_a_config_that_loads():
    """scripts/sweep_small.py: unique row names, each row's settings valid, the batch rows at BASE's tokens."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sweep_small", Path(__file__).parent.parent / "scripts" / "sweep_small.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    names = [name for name, _ in sweep.ROWS]
    assert len(names) == len(set(names)) and "adamw" in names
    base = load_config("small.yaml", sweep.BASE)
    for name, overrides in sweep.ROWS:
        cfg = load_config("small.yaml", [*sweep.BASE, *overrides])
        assert cfg.train.optimizer == name.split("-")[0]
        if "batch" in name:
            assert cfg.data.batch_size * cfg.train.max_iters == base.data.batch_size * base.train.max_iters
    assert sweep.main(["--rows", "no-such-row"]) == 2


@pytest.mark.slow  # a benchmark's whole flow: several training or preparation runs
def test_prep_bench_compares_process_counts_and_checks_the_token_files(capsys):
    # 2.5 MB of text: three tasks of ~1M characters, so 2 processes do start their workers.
    assert bench.main(["prep", "--megabytes", "2.5", "--num-proc", "1,2", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if re.fullmatch(r"\s+\d+ .+", line)}
    assert set(rows) == {"1", "2"} and rows["1"][3] == "1.00x"
    assert rows["1"][-1] == "-" and rows["2"][-1] == "MiB"  # one process has no workers; two have
    assert "token files identical for 1, 2 processes" in out
