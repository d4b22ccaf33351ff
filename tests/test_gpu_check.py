"""scripts/gpu_check.sh as far as a machine without a GPU can check it: what `--speed` plans to run
fits its budget, the install step (python3 as it is where it has what the check needs, else one line
on what is missing), and the check of data/ before any long stage."""

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def test_the_speed_check_s_stages_fit_its_eight_minutes():
    done = subprocess.run(["bash", str(SCRIPT), "--speed", "--plan"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    stages = dict(re.findall(r"^(\S.*?)\s+(\d+)s$", done.stdout, re.MULTILINE))
    total, budget = map(int, re.search(r"limits: (\d+)s of a (\d+)s budget", done.stdout).groups())
    assert total == sum(map(int, stages.values())) and budget <= 8 * 60
    assert total <= budget, done.stdout
    assert "gpt bench matched with nanoGPT (no clipping) + sampling" in stages and "tests/test_cuda.py" in stages
    assert "decoding kernels: cuDNN avoided and allowed" in stages
    # room for a cold compile: GPT-2's training step (40-60 s) with the sampling paths', the tests' ~8 models
    assert int(stages["gpt bench matched with nanoGPT (no clipping) + sampling"]) >= 100
    assert int(stages["tests/test_cuda.py"]) >= 150


def stub_commands(folder: Path, missing: str, venv_exit: int = 0, pip_exit: int = 1, gpu: bool = True) -> dict:
    """An environment whose `python3` says `missing` is what it lacks (the install step's question), makes a
    venv or fails with `venv_exit`, and whose pip exits with `pip_exit`; `nvidia-smi` finds a GPU or not."""
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    python = bin_dir / "python3"
    python.write_text(f"""#!/bin/sh
case "$1 $2" in
    "- "*) echo "{missing}" ;;
    "-m venv") [ {venv_exit} = 0 ] || exit {venv_exit}
        mkdir -p .venv-gpu/bin && cp "$0" .venv-gpu/bin/python3 && echo 'PATH="$PWD/.venv-gpu/bin:$PATH"' > .venv-gpu/bin/activate ;;
    "-m pip") exit {pip_exit} ;;
    "-c "*getsitepackages*) echo "/outer/venv/site-packages" ;;  # this python3 is a venv's
    "-c "*sysconfig*) mkdir -p site && echo "$PWD/site" ;;  # the new venv's site-packages
esac
exit 0
""")
    (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\nexit {0 if gpu else 1}\n")
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def run_install(folder: Path, **stub) -> subprocess.CompletedProcess:
    """gpu_check.sh's install step in `folder`, with `stub_commands(**stub)`."""
    source = SCRIPT.read_text()
    functions = [re.search(rf"^{name}\(\) \{{.*?^\}}", source, re.MULTILINE | re.DOTALL).group(0)
                 for name in ("missing_packages", "install")]
    return subprocess.run(["bash", "-c", "\n".join([*functions, "install"])], cwd=folder,
                          env=stub_commands(folder, **stub), capture_output=True, text=True, timeout=60)


def test_a_python_with_what_the_check_needs_is_used_as_it_is(tmp_path):
    done = run_install(tmp_path, missing="")
    assert done.returncode == 0 and "no venv, no pip" in done.stdout, done.stdout
    assert not (tmp_path / ".venv-gpu").exists()


def test_what_is_missing_and_cannot_be_installed_is_one_line(tmp_path):
    done = run_install(tmp_path, missing="tiktoken, pytest")  # the venv is made; pip finds no network
    assert done.returncode == 1 and (tmp_path / ".venv-gpu").is_dir()
    errors = [line for line in done.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "lacks tiktoken, pytest" in errors[0] and "pip could not install" in errors[0]
    assert "copy data/" not in done.stdout
    (tmp_path / "again").mkdir()
    no_venv = run_install(tmp_path / "again", missing="torch", venv_exit=1)
    errors = [line for line in no_venv.stdout.splitlines() if line.startswith("error:")]
    assert no_venv.returncode == 1 and len(errors) == 1 and "lacks torch" in errors[0] and "python3-venv" in errors[0]


def test_a_venv_made_from_a_venv_s_python_sees_that_venv_s_packages(tmp_path):
    """The venv (pip succeeding this time) gets a .pth naming the outer python's site-packages, where it has some."""
    done = run_install(tmp_path, missing="tiktoken", pip_exit=0)
    assert done.returncode == 0, done.stdout
    assert "lacks tiktoken: installing into .venv-gpu" in done.stdout
    assert (tmp_path / "site" / "outer-site-packages.pth").read_text() == "/outer/venv/site-packages\n"


def test_no_gpu_here_is_said_and_nothing_is_installed(tmp_path):
    done = run_install(tmp_path, missing="a CUDA build of torch that sees a GPU (torch 2.13.0+cpu sees none)", gpu=False)
    assert done.returncode == 0 and "no NVIDIA GPU here" in done.stdout
    assert not (tmp_path / ".venv-gpu").exists()


def test_the_check_stops_at_a_failed_install_with_its_line_not_the_data_s(tmp_path):
    env = stub_commands(tmp_path, missing="tiktoken", venv_exit=1)
    done = subprocess.run(["bash", str(SCRIPT), "--speed", str(tmp_path / "report.txt")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "error: " in done.stdout and "lacks tiktoken" in done.stdout and "copy data/" not in done.stdout
    assert "tokenizer files and prepared corpus" not in done.stdout  # stopped before the data check


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


def test_the_decoding_and_muon_scripts_the_speed_check_runs_work_on_a_cpu(capsys, monkeypatch):
    """Their flow, on tiny.yaml's shape: the GPU gives the figures (docs/performance.md)."""
    import importlib.util

    from gpt import sampling
    monkeypatch.setattr(sampling, "DECODING_KERNELS", sampling.DECODING_KERNELS)  # `allowed` changes it: set back after

    def script(name: str):
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    decoding, muon_add = script("sdpa_decoding"), script("muon_add")
    assert decoding.main(["kernels", "--config", "tiny.yaml", "--device", "cpu"]) == 0
    kernels = capsys.readouterr().out
    assert "training call, 8 windows of 32, causal:" in kernels and "in DECODING_KERNELS (generate.py's):" in kernels
    for cudnn in ("avoided", "allowed"):
        assert decoding.main(["time", "--cudnn", cudnn, "--config", "tiny.yaml", "--tokens", "4", "--device", "cpu"]) == 0
        assert re.search(rf"cuDNN {cudnn} in decoding .*first call [\d.]+ s .*then [\d,]+ tokens/s", capsys.readouterr().out)
    assert muon_add.main(["--config", "tiny.yaml", "--rounds", "2", "--device", "cpu"]) == 0
    assert re.search(r"over 12 matrices on cpu.* ms .*\(\d+\.\d\dx\)", capsys.readouterr().out)
