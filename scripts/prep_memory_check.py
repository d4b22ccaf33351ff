"""Measure the memory that preparing a corpus larger than RAM takes: `python scripts/prep_memory_check.py`.

Writes a text file of `--gigabytes` (default 2) into a temporary folder (Shakespeare's plays,
repeated, each copy under its own heading), prepares it in a child process with
`gpt.data.prepare` (the code train.py runs), and prints the child's peak resident memory
(`ru_maxrss`), beside that of a child that only imports the same modules, and the time taken.
Everything it wrote is deleted at the end. Needs about 3.5 x the size in free disk space.
"""

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpt.data import shakespeare_documents  # noqa: E402

IMPORTS = "import sys; sys.path.insert(0, sys.argv[1]); from gpt.data import DataConfig, prepare"
PREPARE = IMPORTS + "; prepare(DataConfig(corpus=sys.argv[2], prepared_dir=sys.argv[3]))"


def write_corpus(path: Path, size: int) -> None:
    """A UTF-8 text file of at least `size` bytes: the plays, again and again."""
    plays = "\n\n".join(text for _, text in shakespeare_documents()).encode("utf-8")
    written, copy = 0, 0
    with open(path, "wb") as f:
        while written < size:
            heading = f"\n\nCOPY {copy}\n\n".encode()
            f.write(heading + plays)
            written += len(heading) + len(plays)
            copy += 1


def child_peak_rss(code: str, *args: str) -> tuple[int, float]:
    """(peak resident memory in bytes, seconds) of `python -c code args`, run as a child.

    RUSAGE_CHILDREN reports the largest child so far, so measure the smaller one first.
    """
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, *args], check=True)
    seconds = time.perf_counter() - started
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, seconds  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gigabytes", type=float, default=2.0, help="size of the generated text")
    parser.add_argument("--dir", help="where to write the temporary files (default: the system's)")
    args = parser.parse_args()
    baseline, _ = child_peak_rss(IMPORTS, str(ROOT))
    print(f"importing gpt.data (torch, numpy, tiktoken): peak resident memory {baseline / 2**20:.0f} MiB")
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="prep-check-") as tmp:
        corpus, prepared = Path(tmp) / "corpus.txt", Path(tmp) / "prepared"
        write_corpus(corpus, int(args.gigabytes * 1e9))
        print(f"wrote {corpus.stat().st_size / 1e9:.2f} GB of text; preparing it ...", flush=True)
        peak, seconds = child_peak_rss(PREPARE, str(ROOT), str(corpus), str(prepared))
        tokens = sum(p.stat().st_size // 2 for p in prepared.glob("*.bin"))
    print(f"prepared {tokens:,} tokens in {seconds:.0f} s: peak resident memory {peak / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
