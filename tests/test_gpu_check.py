"""scripts/gpu_check.sh as far as a machine without a GPU can check it: what `--speed` plans to run
fits its budget, and the check of data/ before any long stage."""

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def test_the_speed_check_s_stages_fit_its_budget_with_a_fifth_to_spare():
    done = subprocess.run(["bash", str(SCRIPT), "--speed", "--plan"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    stages = dict(re.findall(r"^(\S.*?)\s+(\d+)s$", done.stdout, re.MULTILINE))
    total, budget = map(int, re.search(r"limits: (\d+)s of a (\d+)s budget", done.stdout).groups())
    assert total == sum(map(int, stages.values())) and budget <= 8 * 60
    assert total <= 0.8 * budget, done.stdout
    assert "gpt bench matched with nanoGPT (no clipping) + sampling" in stages and "tests/test_cuda.py" in stages


def run_data_check(folder: Path, python_exit: int) -> subprocess.CompletedProcess:
    """gpu_check.sh's data_ready in `folder`, with a `python3` that only exits with `python_exit`."""
    source = SCRIPT.read_text()
    function = re.search(r"^data_ready\(\) \{.*?^\}", source, re.MULTILINE | re.DOTALL).group(0)
    stub = folder / "bin" / "python3"
    stub.parent.mkdir()
    stub.write_text(f"#!/bin/sh\nexit {python_exit}\n")
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{stub.parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", "-c", f"{function}\ndata_ready"], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=60)


def test_missing_data_is_one_line_saying_what_to_copy(tmp_path):
    done = run_data_check(tmp_path, python_exit=1)  # nothing in data/, and no download possible
    assert done.returncode == 1
    errors = [line for line in done.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "data/gpt2/" in errors[0] and "data/shakespeare/" in errors[0]
    assert "copy data/" in errors[0]


def test_data_in_place_passes_the_check(tmp_path):
    for name in ("gpt2/vocab.bpe", "gpt2/encoder.json", "shakespeare/train.bin", "shakespeare/val.bin",
                 "shakespeare/meta.json"):
        (tmp_path / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / name).write_text("")
    assert run_data_check(tmp_path, python_exit=0).returncode == 0
