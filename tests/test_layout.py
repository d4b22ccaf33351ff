"""The package shows its plan: the core at the top of gpt/, the tools in subpackages, no import cycles."""

import ast
from pathlib import Path

import pytest

import gpt.__main__ as commands

ROOT = Path(__file__).resolve().parent.parent
CORE = {"attention", "model", "tokenizer", "data", "config", "training", "optim", "precision", "checkpoint",
        "resume", "distributed", "device", "sampling", "compiled", "metrics", "errors", "lora"}
TOOLS = {"bench", "chat", "corpus", "gpt2", "tools"}


def module_name(path: Path) -> str:
    """gpt/bench/race.py -> gpt.bench.race; gpt/bench/__init__.py -> gpt.bench."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The project modules a file imports anywhere in it: at the top, in a function, under TYPE_CHECKING."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # `from gpt.bench import race` imports the module gpt.bench.race
                full = f"{node.module}.{alias.name}"
                found.add(full if full in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found & modules


def import_graph() -> dict[str, set[str]]:
    files = {module_name(path): path for path in (ROOT / "gpt").rglob("*.py")}
    return {name: imports_of(path, set(files)) - {name} for name, path in files.items()}


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
    """Top-level modules are the core; folders are tools. The core uses no tool but the corpus readers."""
    top = {path.stem for path in (ROOT / "gpt").glob("*.py")} - {"__init__", "__main__"}
    folders = {path.parent.name for path in (ROOT / "gpt").glob("*/__init__.py")}
    assert top == CORE and folders == TOOLS
    graph = import_graph()
    for name in CORE:
        used = {target.split(".")[1] for target in graph[f"gpt.{name}"] if target.count(".") >= 2}
        assert used <= {"corpus"}, f"gpt/{name}.py imports from the tools: {used}"


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
    """gpt/corpus/downloads.py and gpt/config.py find data/ and configs/ beside gpt/, not inside it."""
    from gpt.config import CONFIG_DIR
    from gpt.corpus.downloads import DATA_DIR
    assert DATA_DIR == ROOT / "data" and CONFIG_DIR == ROOT / "configs"
