"""Imports flow one way: core <- storage <- worker <- ingest <- app (scripts/check_layers.py)."""

from __future__ import annotations

from pathlib import Path

from scripts import check_layers


def test_the_package_imports_flow_one_way():
    found = check_layers.violations()
    assert found == [], "\n".join(map(str, found))


def test_an_upward_import_is_caught_wherever_it_hides(tmp_path: Path):
    for _, folder, _ in check_layers.LAYERS:
        (tmp_path / folder).mkdir()
    (tmp_path / "storage" / "index.py").write_text("from chexmask.worker.model import HybridGNet\n")
    (tmp_path / "worker" / "service.py").write_text("def f():\n    import chexmask.ingest.fetch\n")
    (tmp_path / "chexmask" / "config.py").write_text("from chexmask import app\nfrom chexmask import errors\n")
    (tmp_path / "app" / "cli.py").write_text("from chexmask.storage.index import MaskIndex\n")  # downward: fine
    found = {(v.path.name, v.line, v.imported_layer) for v in check_layers.violations(tmp_path)}
    assert found == {("index.py", 1, "worker"), ("service.py", 2, "ingest"), ("config.py", 1, "app")}
