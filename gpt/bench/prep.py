"""Measure corpus preparation on 1 and N processes: `python -m gpt bench prep [options]`.

Writes a corpus of `--megabytes` (Shakespeare's plays, again and again, each copy under its own
heading) in a temporary folder, as one text file, as JSONL records of ~4 KB (the size of a web
page in FineWeb) or as Parquet, then prepares it with `gpt.corpus.prepare.prepare` (what train.py runs)
at each `--num-proc`, in turns, `--rounds` times. Each preparation runs in a child process of
its own, so the figures are its own: MB/s of text (UTF-8 bytes, whatever the format), and the
peak resident memory of the process that reads and writes (`VmHWM`) and of its largest
tokenising worker (`ru_maxrss`). The speed-up is against 1 process in the same run, so a busy machine slows
both alike. At the end, the token files of every process count are compared byte for byte.
Everything it wrote is deleted at the end.
"""

import hashlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from gpt.corpus.plays import shakespeare_documents
from gpt.corpus.sources import import_pyarrow
from gpt.corpus.writing import default_num_proc
from gpt.errors import ArgumentParser, UserError, run_cli

ROOT = Path(__file__).resolve().parents[2]  # the clone: gpt/bench/prep.py -> .
RECORD_CHARS = 4000  # JSONL and Parquet records of about this many characters
# Run as a child: prepare argv[2] into argv[3] with num_proc argv[4]; print what it took as JSON.
CHILD = """
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from gpt.config import DataConfig
from gpt.corpus.prepare import prepare
from gpt.bench.memory import resident_peak  # VmHWM: this program's own peak
from gpt.tokenizer import get_tokenizer

get_tokenizer()  # built before the clock starts, as a second preparation would find it
imports = resident_peak()
started = time.perf_counter()
prepare(DataConfig(corpus=sys.argv[2], prepared_dir=sys.argv[3], num_proc=int(sys.argv[4])))
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "imports": imports, "main": resident_peak(),
                  "worker": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
"""


def corpus_records(size: int) -> Iterator[str]:
    """Records of about RECORD_CHARS characters, cut at line ends, of at least `size` bytes in all."""
    plays = "\n\n".join(text for _, text in shakespeare_documents())
    written, copy = 0, 0
    while written < size:
        text = f"COPY {copy}\n\n{plays}"  # each copy under its own heading
        start = 0
        while start < len(text) and written < size:
            end = text.find("\n", start + RECORD_CHARS)
            end = len(text) if end < 0 else end + 1
            written += len(text[start:end].encode("utf-8"))
            yield text[start:end]
            start = end
        copy += 1


def write_corpus(folder: Path, size: int, kind: str) -> Path:
    """A corpus of at least `size` bytes of text (UTF-8), written as it is made: one .txt file, or
    records in .jsonl or .parquet (10,000 to a row group)."""
    records = corpus_records(size)
    path = folder / f"corpus.{kind}"
    if kind == "parquet":
        pq = import_pyarrow(path)
        import pyarrow as pa

        schema = pa.schema([("text", pa.string())])
        with pq.ParquetWriter(path, schema) as writer:
            while batch := list(itertools.islice(records, 10_000)):
                writer.write_table(pa.table({"text": batch}, schema=schema))
        return path
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(records if kind == "txt" else (json.dumps({"text": text}) + "\n" for text in records))
    return path


def run_child(corpus: Path, prepared: Path, num_proc: int) -> dict:
    """Prepare `corpus` into `prepared` (afresh) in a child process; seconds and peak memories."""
    for leftover in prepared.glob("*"):
        leftover.unlink()
    result = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(corpus), str(prepared), str(num_proc)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise UserError(f"preparing with {num_proc} processes failed: "
                        f"{(result.stderr.strip().splitlines() or ['no message'])[-1]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def digest(prepared: Path) -> str:
    """sha256 of train.bin and val.bin together."""
    sha = hashlib.sha256()
    for split in ("train", "val"):
        sha.update((prepared / f"{split}.bin").read_bytes())
    return sha.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m gpt bench prep", allow_abbrev=False,
                            description="Measure corpus preparation (MB/s, memory) on 1 and N processes.")
    parser.add_argument("--megabytes", type=float, default=100.0, help="size of the generated corpus")
    parser.add_argument("--format", choices=("txt", "jsonl", "parquet"), default="jsonl",
                        help="one text file, JSONL records of ~4 KB, or the same records in Parquet")
    parser.add_argument("--num-proc", default=f"1,{default_num_proc()}",
                        help="comma-separated process counts to compare; the first is the baseline")
    parser.add_argument("--rounds", type=int, default=2, help="preparations per process count, taken in turns")
    parser.add_argument("--dir", help="where to write the temporary files (default: the system's)")
    args = parser.parse_args(argv)

    def work() -> None:
        try:
            counts = [int(n) for n in args.num_proc.split(",")]
        except ValueError:
            raise UserError(f"--num-proc {args.num_proc!r} is not a list of numbers, e.g. 1,2,4") from None
        if min(counts) < 1 or args.rounds < 1 or args.megabytes <= 0:
            raise UserError("--num-proc counts and --rounds must be at least 1, --megabytes more than 0")
        with tempfile.TemporaryDirectory(dir=args.dir, prefix="prep-bench-") as tmp:
            folder = Path(tmp)
            size = int(args.megabytes * 1e6)  # bytes of text: what MB/s counts, whatever the format
            corpus = write_corpus(folder, size, args.format)
            print(f"corpus: {size / 1e6:.1f} MB of text in {corpus.stat().st_size / 1e6:.1f} MB of {args.format}; "
                  f"{default_num_proc()} cores; load average {os.getloadavg()[0]:.2f} before", flush=True)
            runs: dict[int, list[dict]] = {n: [] for n in counts}
            for round_ in range(args.rounds):
                for n in counts:
                    runs[n].append(run_child(corpus, folder / f"prepared-{n}", n))
                    print(f"  round {round_ + 1}, {n} processes: {runs[n][-1]['seconds']:.2f} s", flush=True)
            digests = {n: digest(folder / f"prepared-{n}") for n in counts}
            meta = json.loads((folder / f"prepared-{counts[0]}" / "meta.json").read_text())
        base = statistics.median(r["seconds"] for r in runs[counts[0]])
        print(f"\nprepared {meta['train_tokens'] + meta['val_tokens']:,} tokens from {meta['documents']:,} "
              f"documents; median of {args.rounds} rounds; load average {os.getloadavg()[0]:.2f} after")
        header = f"{'processes':>9} {'seconds':>8} {'MB/s':>7} {'speed-up':>8} {'main peak':>10} {'worker peak':>12}"
        print(header)
        print("-" * len(header))
        for n in counts:
            seconds = statistics.median(r["seconds"] for r in runs[n])
            main_peak = max(r["main"] for r in runs[n]) / 2**20
            workers = max(r["worker"] for r in runs[n]) / 2**20
            worker = f"{workers:.0f} MiB" if workers else "-"  # 1 process: no workers
            print(f"{n:>9} {seconds:>8.2f} {size / 1e6 / seconds:>7.1f} {base / seconds:>7.2f}x "
                  f"{main_peak:>6.0f} MiB {worker:>12}")
        imports = max(r["imports"] for rounds in runs.values() for r in rounds) / 2**20
        print(f"  peak: resident memory of the process that reads and writes, and of its largest "
              f"worker (forked: it counts the pages it shares with that process); before preparing, with "
              f"torch, NumPy and tiktoken imported, the process held {imports:.0f} MiB")
        same = len(set(digests.values())) == 1
        print(f"  token files {'identical' if same else 'DIFFERENT'} for {', '.join(map(str, counts))} processes "
              f"(sha256 of train.bin + val.bin: {', '.join(sorted(set(d[:12] for d in digests.values())))})")
        if not same:
            raise UserError("the token files differ between process counts; this is a bug")

    return run_cli(work)
