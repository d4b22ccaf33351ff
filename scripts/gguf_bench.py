"""The GGUF export in llama.cpp against generate.py: file sizes, decoding speed, and agreement.

    python scripts/gguf_bench.py [--run runs/small] [--shape gpt2-124m.yaml] [--new-tokens 100] [--rounds 3]

Two models: a trained run (exported as `python -m gpt export RUN OUT.gguf` does) and a model of a
config's shape with random weights (GPT-2 small's by default: its speed does not depend on what the
weights are). Each is written as GGUF in f32, f16 and q8_0 (to a temporary folder), and llama.cpp
(llama-cpp-python, its default settings, as many threads as torch uses) and generate.py's decoding
(`gpt.sampling.generate`: float32 on a CPU, the KV cache, uncompiled, as generate.py runs there) each
decode `--new-tokens` greedy tokens after the same 8-token prompt. Printed: the file sizes; tokens/s
of decoding (the median of `--rounds`, after one call to warm up, and the fastest round, the one a
shared machine disturbed least; the prompt is not counted), with each one's ratio to generate.py's; and, for the trained run, how far llama.cpp's logits over the
prompt are from ours (max |difference| against the largest |logit|) and how many of the greedy tokens
agree with ours. The runs take turns, so a slow spell on a shared machine hits all of them.
"""

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpt.config import load_config  # noqa: E402
from gpt.gpt2 import gguf_export  # noqa: E402
from gpt.checkpoint import load_model  # noqa: E402
from gpt.cli import default_checkpoint  # noqa: E402
from gpt.model import GPTModel  # noqa: E402
from gpt.sampling import generate  # noqa: E402
from gpt.tokenizer import get_tokenizer  # noqa: E402

PROMPT = "Your journey starts with one step, and"  # 8 tokens


def llama(path: Path, threads: int, **options):
    import llama_cpp
    return contextlib.closing(llama_cpp.Llama(str(path), n_ctx=0, n_threads=threads, n_threads_batch=threads,
                                              verbose=False, **options))  # n_ctx 0: the model's own


def llama_decode(llm, prompt: list[int], new_tokens: int) -> tuple[float, list[int]]:
    """(seconds, tokens) of `new_tokens` greedy tokens after `prompt`; the prompt's evaluation not counted."""
    llm.reset()
    llm.eval(prompt)
    tokens, started = [], time.perf_counter()
    for _ in range(new_tokens):
        token = llm.sample(temp=0.0, repeat_penalty=1.0)
        tokens.append(token)
        llm.eval([token])
    return time.perf_counter() - started, tokens


def our_decode(model: GPTModel, prompt: list[int], new_tokens: int) -> tuple[float, list[int]]:
    """(seconds, tokens) as `llama_decode`, with generate.py's decoding (the prompt's forward pass not counted)."""
    idx = torch.tensor([prompt])
    started = time.perf_counter()
    with torch.no_grad():
        model(idx)  # the prompt alone, timed to take it out: generation starts with the same pass
    prompt_seconds = time.perf_counter() - started
    started = time.perf_counter()
    out = generate(model, idx, new_tokens, temperature=0)[0, len(prompt):].tolist()
    return time.perf_counter() - started - prompt_seconds, out


def agreeing(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def bench(name: str, model: GPTModel, files: dict[str, Path], prompt: list[int], new_tokens: int, rounds: int,
          threads: int, check: bool) -> None:
    print(f"\n{name}: {model.num_parameters() / 1e6:,.1f}M parameters, context {model.cfg.context_length}; files "
          + ", ".join(f"{dtype} {path.stat().st_size / 1e6:,.1f} MB" for dtype, path in files.items()))
    seconds: dict[str, list[float]] = {"generate.py": []}
    tokens = {}
    with contextlib.ExitStack() as stack:
        llms = {dtype: stack.enter_context(llama(path, threads, logits_all=check)) for dtype, path in files.items()}
        seconds.update({f"llama.cpp {dtype}": [] for dtype in llms})
        for _ in range(rounds + 1):  # the first round warms up
            elapsed, tokens["generate.py"] = our_decode(model, prompt, new_tokens)
            seconds["generate.py"].append(elapsed)
            for dtype, llm in llms.items():
                elapsed, tokens[dtype] = llama_decode(llm, prompt, new_tokens)
                seconds[f"llama.cpp {dtype}"].append(elapsed)
        ours_rate = new_tokens / statistics.median(seconds["generate.py"][1:])
        ours_best = new_tokens / min(seconds["generate.py"][1:])
        print(f"  greedy decoding, {new_tokens} tokens after {len(prompt)}, {threads} threads, median of {rounds} "
              "(and the fastest round):")
        for path_name, times in seconds.items():
            rate, best = new_tokens / statistics.median(times[1:]), new_tokens / min(times[1:])
            print(f"    {path_name + ':':<16} {rate:>8,.1f} tokens/s  {rate / ours_rate:>5.2f}x generate.py   "
                  f"(fastest {best:,.1f}, {best / ours_best:.2f}x)")
        if check:
            with torch.no_grad():
                ours = model(torch.tensor([prompt]))[0, :, :model.cfg.vocab_size].numpy()
            print("  llama.cpp against ours: max |logit difference| over the prompt / largest |logit|; greedy "
                  "tokens equal before the first difference")
            for dtype, llm in llms.items():
                llm.reset()
                llm.eval(prompt)
                theirs = np.array(llm.scores[:len(prompt)])
                difference = np.abs(theirs - ours).max()
                print(f"    {dtype + ':':<6} {difference:.2e} / {np.abs(ours).max():.1f} = "
                      f"{difference / np.abs(ours).max():.1e}; {agreeing(tokens[dtype], tokens['generate.py'])} "
                      f"of {new_tokens} tokens")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="GGUF files in llama.cpp against generate.py: sizes, speed, agreement")
    parser.add_argument("--run", default=None, help="a trained run (default: the one small.yaml writes)")
    parser.add_argument("--shape", default="gpt2-124m.yaml", help="a config whose model shape gets random weights")
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import llama_cpp
    print(f"llama-cpp-python {llama_cpp.__version__}, torch {torch.__version__}; {args.threads} threads")
    prompt = get_tokenizer().encode(PROMPT)
    run = args.run or default_checkpoint()
    with tempfile.TemporaryDirectory() as tmp:
        files = {dtype: gguf_export.export_run(run, Path(tmp) / f"run-{dtype}.gguf", dtype)
                 for dtype in gguf_export.DTYPES}
        bench(str(run), load_model(run)[0], files, prompt, args.new_tokens, args.rounds, args.threads, check=True)
        for path in files.values():
            path.unlink()
        torch.manual_seed(0)
        model = GPTModel(load_config(args.shape).model).eval()
        files = {}
        for dtype in gguf_export.DTYPES:
            files[dtype] = Path(tmp) / f"shape-{dtype}.gguf"
            gguf_export.write_gguf(model, files[dtype], dtype, name=Path(args.shape).stem)
        bench(f"{args.shape}'s shape, random weights", model, files, prompt, args.new_tokens, args.rounds,
              args.threads, check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
