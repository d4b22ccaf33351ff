"""Measure the memory that preparing a corpus larger than RAM takes: `python scripts/prep_memory_check.py`.

Writes a text file of `--gigabytes` (default 2) into a temporary folder (Shakespeare's plays,
repeated, each copy under its own heading; `--format jsonl` or `parquet` for records of ~4 KB),
prepares it in a child process with `gpt.corpus.prepare.prepare` (the code train.py runs) on
`--num-proc` processes, and prints the peak resident memory of the process that
reads and writes (and what it held before preparing: its imports) and of its largest tokenising
worker, and the time taken. Everything it wrote is deleted at the end. Needs about
3.5 x the size in free disk space. (`python -m gpt bench prep` compares process counts.)
"""

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpt.corpus.writing import default_num_proc  # noqa: E402
from gpt.bench.prep import run_child, write_corpus  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gigabytes", type=float, default=2.0, help="size of the generated text")
    parser.add_argument("--format", choices=("txt", "jsonl", "parquet"), default="txt", help="how it is stored")
    parser.add_argument("--num-proc", type=int, default=default_num_proc(), help="processes that tokenise")
    parser.add_argument("--dir", help="where to write the temporary files (default: the system's)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="prep-check-") as tmp:
        corpus = write_corpus(Path(tmp), int(args.gigabytes * 1e9), args.format)
        print(f"wrote {corpus.stat().st_size / 1e9:.2f} GB ({corpus.name}); preparing it on {args.num_proc} "
              "processes ...", flush=True)
        prepared = Path(tmp) / "prepared"
        prepared.mkdir()
        run = run_child(corpus, prepared, args.num_proc)
        tokens = sum(p.stat().st_size // 2 for p in prepared.glob("*.bin"))
    worker = f"{run['worker'] / 2**20:.0f} MiB" if run["worker"] else "none (one process)"
    print(f"prepared {tokens:,} tokens in {run['seconds']:.0f} s: peak resident memory {run['main'] / 2**20:.0f} "
          f"MiB (the process that reads and writes; {run['imports'] / 2**20:.0f} MiB of it held before "
          f"preparing: torch, NumPy, tiktoken), largest worker {worker}")


if __name__ == "__main__":
    main()
