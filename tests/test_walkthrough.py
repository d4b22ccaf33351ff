"""docs/walkthrough.md names functions as `path.py:Name` or `path.py:Class.method`; each must exist."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WALKTHROUGH = ROOT / "docs" / "walkthrough.md"
REFERENCE = re.compile(r"([\w./-]+\.py):([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)")


def names_defined(statement: ast.stmt) -> list[str]:
    """The names a statement defines at its own level: def, class, `x = ...`, `x: int = ...`."""
    if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [statement.name]
    targets = statement.targets if isinstance(statement, ast.Assign) else (
        [statement.target] if isinstance(statement, ast.AnnAssign) else [])
    return [target.id for target in targets if isinstance(target, ast.Name)]


def defines(path: str, dotted: str) -> bool:
    """True when the file at `path` (from the repository root) defines `dotted`, e.g. `GPTModel.forward`."""
    file = ROOT / path
    if not file.is_file():
        return False
    body = ast.parse(file.read_text(encoding="utf-8")).body
    for part in dotted.split("."):
        found = next((s for s in body if part in names_defined(s)), None)
        if found is None:
            return False
        body = getattr(found, "body", [])  # a class's methods and fields
    return True


def test_every_reference_in_the_walkthrough_exists():
    references = REFERENCE.findall(WALKTHROUGH.read_text(encoding="utf-8"))
    assert len(set(references)) >= 40  # the pattern does find them
    stale = sorted({f"{path}:{name}" for path, name in references if not defines(path, name)})
    assert not stale, f"docs/walkthrough.md names what the code no longer has: {stale}"


def test_a_stale_reference_is_caught():
    assert defines("gpt/model.py", "GPTModel.forward")
    assert defines("gpt/model.py", "ModelConfig.emb_dim")  # a dataclass field
    assert defines("train.py", "main")
    assert not defines("gpt/model.py", "GPTModel.fly")  # no such method
    assert not defines("gpt/model.py", "forward")  # a method, not a module-level name
    assert not defines("gpt/modle.py", "GPTModel")  # no such file
    assert REFERENCE.findall("see `gpt/model.py:GPTModel.forward`.") == [("gpt/model.py", "GPTModel.forward")]


def test_the_readme_links_the_walkthrough():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme.count("](docs/walkthrough.md)") >= 2  # near the top and in the Layout table
