"""The package shows its plan: the core at the top of gpt/, the tools and features in subpackages, no import
cycles, and a plain text run that reads only the core."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import gpt.__main__ as commands

ROOT = Path(__file__).resolve().parent.parent
CORE = {"attention", "model", "tokenizer", "data", "config", "training", "optim", "precision", "checkpoint",
        "resume", "distributed", "device", "sampling", "compiled", "metrics", "errors", "downloads", "cli"}
TOOLS = {"bench", "chat", "corpus", "gpt2", "lora", "tools"}
SCRIPTS = ("train", "generate", "chat")
FEATURES = ("gpt.chat", "gpt.gpt2", "gpt.tools", "gpt.bench", "gpt.lora")  # what a plain text run never loads
# The seams: where the core imports a feature's package, inside the function that picks it, only when
# a config or a location asks for it.
SEAMS = {"gpt.checkpoint": {"gpt.gpt2.pretrained", "gpt.lora"}, "gpt.cli": {"gpt.gpt2.pretrained"},
         "gpt.data": {"gpt.chat.format"}, "gpt.training": {"gpt.tools.multiple_choice"}}


def module_name(path: Path) -> str:
    """gpt/bench/race.py -> gpt.bench.race; gpt/bench/__init__.py -> gpt.bench."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str], top_only: bool = False) -> set[str]:
    """The project modules a file imports anywhere in it (at the top, in a function, under TYPE_CHECKING), or
    with `top_only` where it is imported (at the top)."""
    found = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in (tree.body if top_only else ast.walk(tree)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # `from gpt.bench import race` imports the module gpt.bench.race
                full = f"{node.module}.{alias.name}"
                found.add(full if full in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found & modules


def project_files() -> dict[str, Path]:
    """Every module of the package and the scripts, by name."""
    files = {module_name(path): path for path in (ROOT / "gpt").rglob("*.py")}
    return {**files, **{name: ROOT / f"{name}.py" for name in SCRIPTS}}


def import_graph(top_only: bool = False) -> dict[str, set[str]]:
    files = project_files()
    return {name: imports_of(path, set(files), top_only) - {name} for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle found by a depth-first walk, each as the list of modules around it."""
    found, done, path = [], set(), []

    def walk(node: str) -> None:
        if node in path:
            found.append(path[path.index(node):] + [node])
            return
        if node in done:
            return
        path.append(node)
        for target in sorted(graph[node]):
            walk(target)
        path.pop()
        done.add(node)

    for node in sorted(graph):
        walk(node)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()
    assert {"gpt.training", "gpt.optim", "gpt.config"} <= set(graph)  # the walk sees the package
    assert cycles(graph) == []


def test_the_core_stands_apart_from_the_tools():
    """Top-level modules are the core; folders are tools and features. The core and the scripts train.py and
    generate.py import no tool but the corpus readers at the top; a feature's package only in its seam."""
    top = {path.stem for path in (ROOT / "gpt").glob("*.py")} - {"__init__", "__main__"}
    folders = {path.parent.name for path in (ROOT / "gpt").glob("*/__init__.py")}
    assert top == CORE and folders == TOOLS
    at_top, anywhere = import_graph(top_only=True), import_graph()
    for name in [f"gpt.{core}" for core in CORE] + ["train", "generate"]:
        used = {target for target in at_top[name] if target.count(".") >= 2}
        assert {target.split(".")[1] for target in used} <= {"corpus"}, f"{name} imports from the tools: {used}"
        lazy = {target for target in anywhere[name] - at_top[name] if target.startswith(FEATURES)}
        assert lazy <= SEAMS.get(name, set()), f"{name} imports {lazy - SEAMS.get(name, set())} outside its seams"
    assert all(feature.startswith(FEATURES) for seam in SEAMS.values() for feature in seam)


LOADED = """
import json, sys
sys.path.insert(0, {root!r})
script = __import__({script!r})
code = script.main({argv!r})
names = sorted(n for n, m in sys.modules.items() if n in ("train", "generate") or n == "gpt" or n.startswith("gpt."))
print(json.dumps({{"code": code, "modules": names}}))
"""


def loaded_by(script: str, argv: list[str]) -> list[str]:
    """The modules of this project that running `script` (train or generate) with `argv` loads, in a fresh
    process."""
    result = subprocess.run([sys.executable, "-c", LOADED.format(root=str(ROOT), script=script, argv=argv)],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["code"] in (0, None)
    return loaded["modules"]


def code_lines_of(modules: list[str]) -> int:
    sys.path.insert(0, str(ROOT / "scripts"))
    from code_lines import count
    files = project_files()
    return sum(count(files[name]) for name in modules)


def test_a_text_run_and_its_sampling_load_only_the_core(tmp_path):
    """train.py on tiny.yaml (its corpus prepared by a first run) and generate.py on that run load no module of
    chat, GPT-2, the tools, the benchmarks or LoRA, and stay within what a reader can follow."""
    run = ["--config", "tiny.yaml", f"--train.out_dir={tmp_path / 'run'}", "--train.max_iters=2",
           "--train.eval_interval=2", "--sample.max_new_tokens=4"]
    loaded_by("train", run)  # prepares the corpus where this clone has not yet
    trained = loaded_by("train", [*run, "--overwrite"])
    sampled = loaded_by("generate", ["Your journey", "--checkpoint", str(tmp_path / "run"), "--max-new-tokens", "4"])
    for modules in (trained, sampled):
        assert not [name for name in modules if name.startswith(FEATURES)]
    assert {"gpt.corpus", "gpt.corpus.prepare", "gpt.corpus.shakespeare"} <= set(trained)  # its corpus kind's
    assert len(trained) <= 22 and code_lines_of(trained) <= 2600, (len(trained), code_lines_of(trained))
    assert len(sampled) <= 13 and code_lines_of(sampled) <= 1300, (len(sampled), code_lines_of(sampled))


def test_every_command_is_listed_with_a_guide_that_exists(capsys):
    assert commands.main([]) == 0
    listing = capsys.readouterr().out
    for name, (module, _, _, guide) in commands.COMMANDS.items():
        assert f"python -m gpt {name} " in listing and (ROOT / guide).is_file(), name
        assert (ROOT / module.replace(".", "/")).with_suffix(".py").is_file() or (
            ROOT / module.replace(".", "/") / "__init__.py").is_file()
    for usage, _, guide in commands.SCRIPTS:
        assert usage in listing and (ROOT / guide).is_file()
        assert (ROOT / usage.split()[1]).is_file()  # train.py, generate.py, chat.py, scripts/gpu_check.sh


def test_a_command_runs_and_an_unknown_one_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        commands.main(["evaluate", "--help"])
    assert exit_info.value.code == 0 and "usage: python -m gpt evaluate" in capsys.readouterr().out
    assert commands.main(["evaluat"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "'evaluat'" in error and "evaluate" in error


def test_the_package_finds_the_clones_folders_from_any_depth():
    """gpt/downloads.py and gpt/config.py find data/ and configs/ beside gpt/, not inside it."""
    from gpt.config import CONFIG_DIR
    from gpt.downloads import DATA_DIR
    assert DATA_DIR == ROOT / "data" and CONFIG_DIR == ROOT / "configs"
