"""The project's files as a fresh clone holds them (what git tracks, or would track), for
the tests and scripts that rebuild the project elsewhere: the Flower app bundle, the
loopback deployment and the mutation check."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def project_files() -> list[str]:
    """Paths relative to the repository: tracked files and untracked ones git does not ignore."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, text=True,
    )
    if listed.returncode != 0:
        raise RuntimeError(f"git ls-files failed in {REPO}: {listed.stderr.strip()}")
    return [name for name in listed.stdout.splitlines() if (REPO / name).is_file()]


def copy_project(dest: Path) -> Path:
    """Copy the project's files to ``dest`` (created); returns ``dest``."""
    for name in project_files():
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    return dest
