"""`python -m gpt plot RUN_DIR`: a run's train and val loss against tokens seen, as `loss.png`.

A run that scores multiple-choice tasks (`train.eval_tasks`) gets a second panel: each task's
acc_norm, with chance and, for HellaSwag, the line GPT-2 124M's weights reach (0.2955). The drawing
is `gpt.metrics.plot_run`'s, which train.py calls at the end of a run; the command stops with an
error where matplotlib is missing.
"""

import sys
from pathlib import Path

from gpt.errors import ArgumentParser, run_cli
from gpt.metrics import METRICS_NAME, PLOT_NAME, plot_run, read_metrics
from gpt.tools.multiple_choice import reference_lines


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m gpt plot",
                            description=f"Draw RUN_DIR/{PLOT_NAME} from RUN_DIR/{METRICS_NAME}.")
    parser.add_argument("run_dir", help="a run folder (train.out_dir)")
    args = parser.parse_args(argv)

    def work() -> None:
        rows = read_metrics(Path(args.run_dir).expanduser() / METRICS_NAME)
        tasks = [name.removesuffix("_acc_norm") for name in (rows[0] if rows else {}) if name.endswith("_acc_norm")]
        print(f"wrote {plot_run(args.run_dir, reference_lines(tasks))}")

    return run_cli(work)


if __name__ == "__main__":
    sys.exit(main())
