"""pyproject.toml: the commands point at the scripts' own main, and the dependency lists agree."""

import importlib
import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def names(requirements: list[str]) -> set[str]:
    """Package names without versions, extras or comments."""
    return {re.split(r"[\s<>=!~\[;#]", line.strip(), maxsplit=1)[0].lower()
            for line in requirements if line.strip() and not line.lstrip().startswith(("#", "-r"))}


@pytest.mark.parametrize("command,script", [("gpt-train", "train.py"), ("gpt-generate", "generate.py"),
                                                   ("gpt-chat", "chat.py")])
def test_commands_run_the_scripts_main(command, script, capsys):
    target = PROJECT["project"]["scripts"][command]
    module_name, _, function = target.partition(":")
    assert f"{module_name}.py" == script and module_name in PROJECT["tool"]["setuptools"]["py-modules"]
    main = getattr(importlib.import_module(module_name), function)
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "usage:" in capsys.readouterr().out


def test_package_holds_every_module():
    """Every folder of gpt/ with Python files is a package pyproject.toml installs (none is left behind)."""
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "gpt").rglob("*.py")}
    assert set(PROJECT["tool"]["setuptools"]["packages"]) == folders
    assert all((ROOT / name.replace(".", "/") / "__init__.py").is_file() for name in folders)


def test_dependency_lists_agree():
    runtime = (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()
    dev = (ROOT / "requirements-dev.txt").read_text(encoding="utf-8").splitlines()
    assert names(PROJECT["project"]["dependencies"]) == names(runtime)
    assert names(PROJECT["project"]["optional-dependencies"]["dev"]) == names(dev)
    assert "torch>=" in " ".join(PROJECT["project"]["dependencies"])  # a bound, not a pin: keeps CUDA builds
