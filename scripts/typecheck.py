"""Run mypy over the package as it is imported: ``chexmask.*``.

The top-level folders storage/, worker/, ingest/ and app/ are the subpackages
chexmask.storage, .worker, .ingest and .app (pyproject's package-dir), which
mypy cannot follow; it checks a tree of links laid out as the package instead
(build/typecheck/chexmask), so every import resolves as at run time.

    python scripts/typecheck.py [extra mypy arguments]
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("storage", "worker", "ingest", "app")


def link_tree(out: Path) -> Path:
    package = out / "chexmask"
    shutil.rmtree(out, ignore_errors=True)
    package.mkdir(parents=True)
    for path in (ROOT / "chexmask").glob("*.py"):
        (package / path.name).symlink_to(path)
    for name in SUBPACKAGES:
        (package / name).symlink_to(ROOT / name, target_is_directory=True)
    return out


def main() -> int:
    tree = link_tree(ROOT / "build" / "typecheck")
    command = [
        sys.executable,
        "-m",
        "mypy",
        "--config-file",
        str(ROOT / "pyproject.toml"),
        "-p",
        "chexmask",
        *sys.argv[1:],
    ]
    return subprocess.run(command, cwd=tree).returncode


if __name__ == "__main__":
    sys.exit(main())
