"""How much a reader has to read: code lines of the learner's path and of the core, and the functions
over the readability guide's limits (40 lines, 6 parameters). A report for contributors, not a test.

Usage: python scripts/code_lines.py [--limits]

A code line is a line holding code: blank lines, comments and docstrings are not counted. The core is
`gpt/*.py` and the three scripts; the learner's path is what a run of `configs/tiny.yaml` runs through
from train.py to its sample: the script, the config's sections and loading, building the model,
attention and the model, the training loop and its step, the default optimizer (Muon with AdamW) and
its schedule, precision, the windows and batches, saving the checkpoints, and the sampler with its
cache. It leaves out what such a run never calls: the strict loader's checks behind `load_config`,
resuming, the errors of a stop, and the final whole-val pass (tiny.yaml skips it).
"""

import argparse
import ast
import io
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ("train.py", "generate.py", "chat.py")
# (file, the top-level functions and classes of it on the path; None: all of it)
LEARNER_PATH = (
    ("train.py", None),
    ("gpt/config.py", ("DataConfig", "TrainConfig", "Config", "load_config", "build_config")),
    ("gpt/checkpoint.py", ("save_checkpoint", "model_weights", "run_model", "build_model")),
    ("gpt/attention.py", None),
    ("gpt/model.py", None),
    ("gpt/training.py", ("to_device", "batch_to_device", "token_losses", "LossSums", "loss_sums", "evaluate",
                         "TrainState", "gradient_sync", "counted_targets", "train_step", "optimizer_step",
                         "step_unless_on_device", "Run", "new_run", "TrainData", "train_data", "Progress", "measure",
                         "save_if_finite", "train")),
    ("gpt/optim.py", ("orthogonalise", "muon_lr_ratio", "Muon", "MuonWithAdamW", "muon_parameters", "adamw",
                      "build_optimizer", "learning_rate", "set_learning_rate")),
    ("gpt/precision.py", None),
    ("gpt/data.py", ("TokenWindows", "load_split", "TrainBatches", "full_batch", "eval_loader", "TextFormat")),
    ("gpt/resume.py", ("RunCheckpoints", "training_checkpoint", "best_checkpoint")),
    ("gpt/sampling.py", None),
)
MAX_LINES, MAX_PARAMETERS = 40, 6


def docstring_lines(tree: ast.AST) -> set[int]:
    """The line numbers that docstrings take up."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def code_lines(source: str) -> set[int]:
    """The line numbers of `source` that hold code (not blank, not only a comment, not a docstring)."""
    lines = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
                              tokenize.DEDENT, tokenize.ENDMARKER):
            lines.update(range(token.start[0], token.end[0] + 1))
    return lines - docstring_lines(ast.parse(source))


def count(path: Path, names: tuple[str, ...] | None = None) -> int:
    """Code lines of the file at `path`, or of its top-level definitions `names` only."""
    source = path.read_text()
    lines = code_lines(source)
    if names is None:
        return len(lines)
    spans = set()
    for node in ast.parse(source).body:
        if getattr(node, "name", None) in names:
            start = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
            spans.update(range(start, node.end_lineno + 1))
    return len(lines & spans)


def core_files() -> list[Path]:
    return sorted((ROOT / "gpt").glob("*.py")) + [ROOT / name for name in SCRIPTS]


def over_limits(path: Path) -> list[str]:
    """Each function of `path` with more than MAX_LINES code lines or MAX_PARAMETERS parameters."""
    source = path.read_text()
    lines = code_lines(source)
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        args = node.args
        names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
        parameters = len([n for n in names if n not in ("self", "cls")])
        length = len(lines & set(range(node.lineno, node.end_lineno + 1)))
        if length > MAX_LINES or parameters > MAX_PARAMETERS:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length} lines, "
                         f"{parameters} parameters")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limits", action="store_true", help="also list the functions over the limits")
    args = parser.parse_args()
    path_total = 0
    for name, names in LEARNER_PATH:
        lines = count(ROOT / name, names)
        path_total += lines
        print(f"  {name}{'' if names is None else ' (' + ', '.join(names) + ')'}: {lines}")
    print(f"learner's path: {path_total} code lines")
    print(f"core (gpt/*.py and {', '.join(SCRIPTS)}): {sum(count(p) for p in core_files())} code lines")
    over = [line for p in core_files() for line in over_limits(p)]
    print(f"functions over {MAX_LINES} code lines or {MAX_PARAMETERS} parameters: {len(over)}")
    if args.limits:
        for line in over:
            print(f"  {line}")


if __name__ == "__main__":
    main()
