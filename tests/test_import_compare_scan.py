"""After an import: a release scan queues only the new images, and ``compare``
pairs the published masks with ours (SQLite and PostgreSQL)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from chexmask.ingest.queue import Intake
from chexmask.ingest.registry import Registry
from chexmask.ingest.scanner import ReleaseScanner, ScanCounts
from chexmask.status import ImageStatus
from chexmask.storage.chexmask_import import import_csv
from chexmask.storage.layout import VALUE_COLUMNS, csv_line, numpy_text
from chexmask.storage.models import MaskComparison
from chexmask.storage.queries import QueryFilters
from chexmask.worker.compare import boundary_hausdorff, compare, plot_comparison

pytest_plugins = ["services"]

POINTS = [[i % 10, i % 10] for i in range(120)]


class ListQueue:
    def __init__(self):
        self.arrivals = []

    def put(self, arrivals):
        self.arrivals += arrivals


def published(path: Path, rows: list[tuple[str, float, str, str]]) -> Path:
    """A 10x10-pixel CheXmask CSV: (id, Dice RCA mean, right lung RLE, left lung RLE)."""
    lines = [csv_line(["Image Index", *VALUE_COLUMNS])]
    lines += [csv_line([i, mean, mean, numpy_text(POINTS), left, right, "", 10, 10]) for i, mean, right, left in rows]
    path.write_text("".join(lines))
    return path


def test_scan_queues_only_images_new_since_the_published_set(index, tmp_path):
    ids = ["00000001_000.png", "00000001_001.png"]
    import_csv(
        index,
        published(tmp_path / "p.csv", [(i, 0.9, "1 5", "") for i in ids]),
        dataset="nih",
        model="hybridgnet-official",
        weights_sha256="b7" * 32,
    )
    root = tmp_path / "release"
    for name in ("images_001/00000001_000.png", "images_001/00000001_001.png", "images_002/00000002_000.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(name.encode())
    queue = ListQueue()
    scanner = ReleaseScanner(Intake(Registry(index), queue), dataset="nih", progress=False)

    assert scanner.scan(str(root)) == ScanCounts(seen=3, new=1, covered=2)
    assert [a.dataset_image_id for a in queue.arrivals] == ["00000002_000.png"]
    # the covered files are registered as done and linked to the import by dataset image id
    linked = {i.dataset_image_id: i for i in index.images(QueryFilters(dataset="nih")) if i.uri.startswith("file:")}
    assert linked["00000001_000.png"].status == ImageStatus.DONE and linked["00000001_000.png"].sha256 is None
    assert scanner.scan(str(root)) == ScanCounts(seen=3, skipped=3)  # known URIs now
    assert len(queue.arrivals) == 1
    # our model can still be asked for them: their files are known, the imported rows are not queued
    missing = sorted(i.uri.rsplit("/", 1)[1] for i in index.images_missing_model("ours"))
    assert missing == ["00000001_000.png", "00000001_001.png", "00000002_000.png"]
    assert [i.uri.rsplit("/", 1)[1] for i in index.images_missing_model("hybridgnet-official")] == ["00000002_000.png"]


def test_compare_on_a_tiny_case_with_known_dice(index, tmp_path):
    # Published: right lung = rows 0-4 of a 10x10 image, left lung = row 5.
    # Ours: right lung = rows 0-3, left lung = row 6; no heart in either.
    names = ["00000001_000.png", "00000002_000.png", "00000003_000.png"]
    ours_rca = [0.85, 0.75, 0.5]
    import_csv(
        index,
        published(tmp_path / "p.csv", [(n, m, "1 50", "51 10") for n, m in zip(names, [0.9, 0.8, 0.7], strict=True)]),
        dataset="nih",
        model="hybridgnet-official",
        weights_sha256="b7" * 32,
    )
    for name, rca in zip(names, ours_rca, strict=True):
        seg = _add_ours(index, name, {"right_lung": "1 40", "left_lung": "61 10", "heart": ""})
        index.set_qc(seg.id, dice_rca_mean=rca, dice_rca_max=rca)

    result = compare(index, "nih", "hybridgnet-official", "ours")
    assert [p.image_id for p in result.pairs] == names and result.skipped == []
    pair = result.pairs[0]
    assert pair.frame == "original"
    assert pair.dice == pytest.approx({"right_lung": 2 * 40 / 90, "left_lung": 0.0, "heart": 1.0})
    assert pair.hausdorff == {"right_lung": 1.0, "left_lung": 1.0, "heart": 0.0}
    agreement = result.rca_agreement()
    assert agreement["n"] == 3 and agreement["mae"] == pytest.approx(0.1)
    assert agreement["spearman"] == pytest.approx(1.0)
    assert agreement["pearson"] == pytest.approx(np.corrcoef([0.9, 0.8, 0.7], ours_rca)[0, 1])
    plot_comparison(result, tmp_path / "compare.png")
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_boundary_hausdorff_of_empty_masks():
    empty, full = np.zeros((4, 4), bool), np.ones((4, 4), bool)
    assert boundary_hausdorff(empty, empty) == 0.0
    assert boundary_hausdorff(empty, full) == float("inf")
    point = np.zeros((4, 4), bool)
    point[0, 0] = True
    assert boundary_hausdorff(point, full) == pytest.approx(np.hypot(3, 3))


def _published_and_ours(index, tmp_path, ours: dict[str, dict[str, str]]) -> None:
    """Published masks right lung "1 50", left lung "51 10" for each image of ``ours``,
    which holds our model's masks of it (10x10 pixels)."""
    import_csv(
        index,
        published(tmp_path / "p.csv", [(name, 0.9, "1 50", "51 10") for name in ours]),
        dataset="nih",
        model="hybridgnet-official",
        weights_sha256="b7" * 32,
    )
    for name, masks in ours.items():
        _add_ours(index, name, masks)


def _add_ours(index, name: str, masks: dict[str, str]):
    """A 10x10 nih image ``name`` segmented by the model "ours" with ``masks``."""
    sha = hashlib.sha256(name.encode()).hexdigest()
    image = index.register_image(
        uri=f"file:///nih/{name}", dataset="nih", dataset_image_id=name, sha256=sha, height=10, width=10
    ).image
    segmentation, _ = index.add_segmentation(
        image_id=image.id,
        image_sha256=sha,
        model_version="ours",
        weights_sha256="0" * 64,
        landmarks_1024=POINTS,
        landmarks_original=POINTS,
        height=10,
        width=10,
        rle=masks,
        rle_1024=masks,
    )
    return segmentation


AGREEING = {"right_lung": "1 50", "left_lung": "51 10", "heart": ""}  # the published masks
DISAGREEING = {"right_lung": "1 40", "left_lung": "61 10", "heart": ""}  # left lung disjoint: Dice 0


def test_compare_stores_its_results_and_queries_filter_on_agreement(index, tmp_path):
    _published_and_ours(index, tmp_path, {"00000001_000.png": AGREEING, "00000002_000.png": DISAGREEING})
    compare(index, "nih", "hybridgnet-official", "ours")

    def ids(**filters):
        return [r.dataset_image_id for r in index.query(QueryFilters(dataset="nih", **filters))]

    # ours that disagree with the published masks, and the published ones that agree with ours
    assert ids(model="ours", compare_to="hybridgnet-official", max_agreement_dice=0.8) == ["00000002_000.png"]
    assert ids(model="hybridgnet-official", compare_to="ours", min_agreement_dice=0.99) == ["00000001_000.png"]
    assert ids(model="ours", compare_to="hybridgnet-official") == ["00000001_000.png", "00000002_000.png"]
    assert ids(compare_to="another-model") == []
    with pytest.raises(ValueError, match="needs compare_to"):
        QueryFilters(max_agreement_dice=0.8)

    # comparing again replaces the stored results: one per image and direction
    compare(index, "nih", "hybridgnet-official", "ours")
    with index.engine.connect() as connection:
        stored = connection.execute(
            sa.select(MaskComparison.other_model, MaskComparison.dice_min, MaskComparison.dice_left_lung).order_by(
                MaskComparison.segmentation_id
            )
        ).all()
    assert sorted(stored) == [
        ("hybridgnet-official", 0.0, 0.0),
        ("hybridgnet-official", 1.0, 1.0),
        ("ours", 0.0, 0.0),
        ("ours", 1.0, 1.0),
    ]


def test_agreement_filter_in_the_api_and_the_query_command(index, tmp_path, monkeypatch):
    from click.testing import CliRunner
    from test_storage_api import client_for

    from chexmask.app.cli import cli
    from chexmask.storage.objectstore import open_store

    _published_and_ours(index, tmp_path, {"00000001_000.png": AGREEING, "00000002_000.png": DISAGREEING})
    compare(index, "nih", "hybridgnet-official", "ours")

    with client_for(index, open_store((tmp_path / "store").as_uri())) as client:
        page = client.get(
            "/segmentations", params={"model": "ours", "compare_to": "hybridgnet-official", "max_agreement_dice": 0.8}
        )
        assert page.status_code == 200, page.text
        assert [i["dataset_image_id"] for i in page.json()["items"]] == ["00000002_000.png"]
        assert client.get("/segmentations", params={"max_agreement_dice": 0.8}).status_code == 422

    monkeypatch.setenv("CHEXMASK_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CHEXMASK_DATABASE_URL", index.engine.url.render_as_string(hide_password=False))
    runner = CliRunner()
    command = ["query", "--dataset", "nih", "--compare-to", "hybridgnet-official", "--format", "json"]
    result = runner.invoke(cli, [*command, "--max-agreement-dice", "0.8"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert [(r["dataset_image_id"], r["model_version"]) for r in json.loads(result.output)] == [
        ("00000002_000.png", "ours")
    ]
    result = runner.invoke(cli, ["query", "--max-agreement-dice", "0.8"])
    assert result.exit_code == 2 and "needs compare_to" in result.output


def test_comparison_migration_keeps_existing_rows(tmp_path):
    from alembic import command
    from alembic.script import ScriptDirectory

    from chexmask.storage.engine import alembic_config
    from chexmask.storage.index import MaskIndex

    index = MaskIndex(f"sqlite:///{tmp_path / 'index.db'}")
    try:
        index.upgrade()
        _published_and_ours(index, tmp_path, {"00000001_000.png": DISAGREEING})
        config = alembic_config()
        before = ScriptDirectory.from_config(config).get_revision("0008").down_revision
        with index.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.downgrade(config, before)
        assert "comparison" not in sa.inspect(index.engine).get_table_names()
        index.upgrade()
        assert index.current_revision() == MaskIndex.head_revision()
        assert len(index.query(QueryFilters(dataset="nih"))) == 2  # the published row and ours, untouched
        compare(index, "nih", "hybridgnet-official", "ours")
        assert len(index.query(QueryFilters(compare_to="ours", max_agreement_dice=0.5))) == 1
    finally:
        index.close()
