"""Every relative link in README.md and docs/*.md resolves, anchors included.

A Markdown link `[text](target)` whose target is not a web or mail address must name a file or
folder that exists, relative to the Markdown file that holds it. If it carries an anchor
(`guide.md#section`, or `#section` for the same file), the Markdown file it names must have a
heading with that GitHub slug. Links inside fenced code blocks and inline code are not links.
The README stays a front door (at most 260 lines) and links every guide in docs/.

No package imports and no network: this runs in well under a second.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GUIDES = ["install.md", "training.md", "data.md", "gpus.md", "generating.md", "chat.md",
          "evaluation.md", "gpt2.md", "lora.md", "performance.md", "bad-input.md"]
README_MAX_LINES = 260

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)  # `code`, ``code with ` inside``, over lines
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
EXTERNAL = ("http://", "https://", "mailto:")


def prose(text: str) -> list[str]:
    """The paragraphs of `text` outside fenced code blocks, inline code removed.

    Inline code may run over a line break but never past a blank line, as in GitHub's Markdown.
    """
    lines, in_fence = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            lines.append("")
        else:
            lines.append("" if in_fence else line)
    paragraphs = re.split(r"\n\s*\n", "\n".join(lines))
    return [INLINE_CODE.sub("", paragraph) for paragraph in paragraphs]


def link_targets(text: str) -> list[str]:
    """The targets of the Markdown links and images in `text`, in order, code left out."""
    return [m.group(1) for paragraph in prose(text) for m in LINK.finditer(paragraph)]


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lowercase, punctuation dropped, spaces to hyphens."""
    text = INLINE_CODE.sub(lambda m: m.group(0).strip("`"), heading)  # code keeps its text
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link keeps its text
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading anchor of a Markdown text; a repeated slug gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    in_fence = False
    for line in text.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        match = None if in_fence else HEADING.match(line)
        if match:
            slug = github_slug(match.group(2))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def broken_links(text: str, where: Path) -> list[str]:
    """The links of `text` (a Markdown file in the folder `where`) that do not resolve."""
    broken = []
    for target in link_targets(text):
        if target.startswith(EXTERNAL):
            continue
        path_part, _, anchor = target.partition("#")
        path = (where / path_part).resolve() if path_part else None
        if path is not None and not path.exists():
            broken.append(f"{target} (no such file)")
        elif anchor:
            page = text if path is None else path.read_text(encoding="utf-8") if path.suffix == ".md" else None
            if page is not None and anchor not in anchors(page):
                broken.append(f"{target} (no such heading)")
    return broken


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(path: Path):
    broken = broken_links(path.read_text(encoding="utf-8"), path.parent)
    assert not broken, f"{path.relative_to(ROOT)}: {broken}"


def test_a_broken_link_or_anchor_is_reported(tmp_path: Path):
    (tmp_path / "guide.md").write_text("# Guide\n\n## Two words: here\n", encoding="utf-8")
    text = "\n".join([
        "# Page", "## Same", "## Same",
        "[good](guide.md#two-words-here) [good](#same-1) [web](https://example.com/none)",
        "[missing file](nowhere.md) [missing anchor](guide.md#three-words) [missing here](#same-2)",
        "`[in code](nowhere-either.md)` and `code over a",
        "line break [in code](nowhere-too.md)`",
        "```", "[in a fence](nowhere-at-all.md)", "```",
    ])
    assert broken_links(text, tmp_path) == ["nowhere.md (no such file)", "guide.md#three-words (no such heading)",
                                            "#same-2 (no such heading)"]


def test_github_slugs():
    assert github_slug("Optimizer: Muon") == "optimizer-muon"
    assert github_slug("Stopping, crashing and resuming") == "stopping-crashing-and-resuming"
    assert github_slug("Apple GPUs (MPS)") == "apple-gpus-mps"
    assert github_slug("Starting from GPT-2's weights") == "starting-from-gpt-2s-weights"
    assert github_slug("2. Tokens to windows") == "2-tokens-to-windows"
    assert github_slug("`chat.py`") == "chatpy"
    assert anchors("# A\n## A\n```\n# A\n```\n## A\n") == {"a", "a-1", "a-2"}


def test_the_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail to a guide in docs/"


@pytest.mark.parametrize("guide", GUIDES)
def test_every_guide_exists_and_the_readme_links_it(guide: str):
    assert (ROOT / "docs" / guide).is_file()
    targets = {t.partition("#")[0] for t in link_targets((ROOT / "README.md").read_text(encoding="utf-8"))}
    assert f"docs/{guide}" in targets
