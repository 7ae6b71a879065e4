"""Check that imports flow one way through the layers of chexmask-stream.

    core (chexmask/) <- storage/ <- worker/ <- ingest/ <- app/

A module may import its own layer and the layers to its left, never one to its
right. Every import counts, also those inside functions. The folders are
mapped onto ``chexmask.*`` subpackages by pyproject.toml, so import-linter
(which walks the ``chexmask`` folder) cannot see them; this reads the sources.

    python scripts/check_layers.py      # prints the order; exit 1 on a violation
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Layer name, folder, and the dotted prefix of its modules; lowest first.
LAYERS: tuple[tuple[str, str, str], ...] = (
    ("core", "chexmask", "chexmask"),
    ("storage", "storage", "chexmask.storage"),
    ("worker", "worker", "chexmask.worker"),
    ("ingest", "ingest", "chexmask.ingest"),
    ("app", "app", "chexmask.app"),
)


@dataclass(frozen=True)
class Violation:
    path: Path
    line: int
    imported: str
    importer_layer: str
    imported_layer: str

    def __str__(self) -> str:
        return (
            f"{self.path.relative_to(ROOT)}:{self.line}: {self.importer_layer} imports "
            f"{self.imported} ({self.imported_layer}, a higher layer)"
        )


def layer_of(module: str) -> int | None:
    """Index in LAYERS of a dotted module name, or None outside the package."""
    if module != "chexmask" and not module.startswith("chexmask."):
        return None
    for rank in range(len(LAYERS) - 1, -1, -1):
        prefix = LAYERS[rank][2]
        if module == prefix or module.startswith(prefix + "."):
            return rank
    return None


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in a file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # "from chexmask import storage" names a subpackage, not a core symbol.
            found += [
                (node.lineno, f"{node.module}.{alias.name}")
                if node.module == "chexmask"
                else (node.lineno, node.module)
                for alias in node.names
            ]
    return found


def violations(root: Path = ROOT) -> list[Violation]:
    found = []
    for rank, (name, folder, _) in enumerate(LAYERS):
        for path in sorted((root / folder).rglob("*.py")):
            for line, module in imports(path):
                other = layer_of(module)
                if other is not None and other > rank:
                    found.append(Violation(path, line, module, name, LAYERS[other][0]))
    return found


def main() -> int:
    print(
        "layers (each imports only itself and those before it): "
        + " <- ".join(f"{name} ({folder}/)" for name, folder, _ in LAYERS)
    )
    found = violations()
    for violation in found:
        print(violation)
    print(f"{len(found)} import(s) against the order" if found else "imports flow one way")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
