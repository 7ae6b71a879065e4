"""Uncertainty in the index, the API and the export: stored with the segmentation,
served as JSON, exported as extra columns only when asked (the default export keeps
the CheXmask layout), and migration 0007 keeps existing rows."""

from __future__ import annotations

import csv

import pytest
import sqlalchemy as sa

from chexmask.anatomy import LANDMARK_STD_COLUMN, UNCERTAINTY_COLUMNS
from chexmask.storage.export import export
from chexmask.storage.index import MaskIndex
from chexmask.storage.layout import header
from chexmask.storage.queries import QueryFilters

STD = [0.5] * 44 + [1.0] * 50 + [round(2.0 + i / 100, 2) for i in range(26)]


def test_uncertainty_round_trips_through_the_index_and_api(index, store, sample):
    from test_storage_api import client_for

    _, plain = sample("plain.png")
    _, with_std = sample("sampled.png", landmark_std=STD)
    row = index.get_segmentation(with_std.id)
    assert row.landmark_std == STD and row.uncertainty_samples == 20
    assert row.uncertainty_rl == pytest.approx(0.5) and row.uncertainty_ll == pytest.approx(1.0)
    assert row.uncertainty_h == pytest.approx(sum(STD[94:]) / 26)
    empty = index.get_segmentation(plain.id)
    assert empty.landmark_std is None and empty.uncertainty_h is None

    client = client_for(index, store)
    record = client.get(f"/segmentations/{with_std.id}").json()
    assert record["landmark_std"] == STD and record["uncertainty_samples"] == 20
    assert record["uncertainty_h"] == pytest.approx(row.uncertainty_h)
    listed = {r["id"]: r for r in client.get("/segmentations").json()["items"]}
    assert listed[with_std.id]["uncertainty_ll"] == pytest.approx(1.0)
    assert listed[plain.id]["uncertainty_ll"] is None


def test_index_refuses_a_std_of_the_wrong_length(index, sample):
    with pytest.raises(ValueError, match="120"):
        sample("short.png", landmark_std=[1.0] * 10)


def test_export_adds_uncertainty_columns_only_when_asked(index, sample, tmp_path):
    sample("plain.png")
    sample("sampled.png", landmark_std=STD)
    default, asked = tmp_path / "default.csv", tmp_path / "asked.csv"
    export(index, default, dataset="chestx-ray8")
    export(index, asked, dataset="chestx-ray8", uncertainty=True)
    with default.open() as fh:
        assert next(csv.reader(fh)) == header("chestx-ray8")
    with asked.open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == [*header("chestx-ray8"), *UNCERTAINTY_COLUMNS, LANDMARK_STD_COLUMN]
    by_id = {r[header("chestx-ray8")[0]]: r for r in rows}
    assert by_id["plain.png"]["Uncertainty Heart"] == "" and by_id["plain.png"][LANDMARK_STD_COLUMN] == ""
    assert float(by_id["sampled.png"]["Uncertainty Left Lung"]) == 1.0
    assert [float(v) for v in by_id["sampled.png"][LANDMARK_STD_COLUMN].split(",")] == STD
    # The CheXmask part of each row is the default export's, byte for byte.
    cut = len(header("chestx-ray8"))
    with default.open() as a, asked.open() as b:
        assert [r[:cut] for r in csv.reader(a)] == [r[:cut] for r in csv.reader(b)]


def test_uncertainty_migration_keeps_existing_rows(tmp_path):
    from alembic import command
    from alembic.script import ScriptDirectory
    from services import add_sample

    from chexmask.storage.engine import alembic_config

    index = MaskIndex(f"sqlite:///{tmp_path / 'index.db'}")
    try:
        index.upgrade()
        _, before = add_sample(index, "old.png", dice_mean=0.7)
        config = alembic_config()
        before_0007 = ScriptDirectory.from_config(config).get_revision("0007").down_revision
        with index.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.downgrade(config, before_0007)
        columns = {c["name"] for c in sa.inspect(index.engine).get_columns("segmentation")}
        assert "landmark_std" not in columns and index.current_revision() == before_0007
        index.upgrade()
        kept = index.get_segmentation(before.id)
        assert kept.dice_rca_mean == 0.7 and kept.landmark_std is None
        _, segmentation = add_sample(index, "a.png", dice_mean=0.8, landmark_std=STD)
        assert index.get_segmentation(segmentation.id).uncertainty_rl == pytest.approx(0.5)
    finally:
        index.close()


def test_serve_stores_uncertainty_and_export_writes_it(tmp_path, random_weights):
    import os
    import subprocess
    import sys

    import cv2
    import numpy as np

    inbox, home = tmp_path / "inbox", tmp_path / "home"
    inbox.mkdir()
    disc = np.hypot(*np.mgrid[-300:300, -300:300]) < 250
    cv2.imwrite(str(inbox / "x.png"), (disc * 150 + 40).astype(np.uint8))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHEXMASK_")}
    env.update(CHEXMASK_HOME=str(home), CHEXMASK_WEIGHTS=str(random_weights), CHEXMASK_QC_BANK="none")

    def chexmask(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "chexmask.app.cli", *args], env=env, capture_output=True, text=True
        )

    served = chexmask("serve", "--inbox", str(inbox), "--once", "--dataset", "test", "--uncertainty", "3")
    assert served.returncode == 0, served.stderr
    index = MaskIndex(f"sqlite:///{home / 'index.db'}")
    try:
        (row,) = index.query(QueryFilters())
        stored = index.get_segmentation(row.id)
        assert stored.uncertainty_samples == 3 and len(stored.landmark_std) == 120
        assert row.uncertainty_h == pytest.approx(np.mean(stored.landmark_std[94:]))
    finally:
        index.close()
    exported = chexmask("export", "--dataset", "test", "--uncertainty", "--out", str(tmp_path / "out.csv"))
    assert exported.returncode == 0, exported.stderr
    with open(tmp_path / "out.csv") as fh:
        (line,) = list(csv.DictReader(fh))
    assert len(line[LANDMARK_STD_COLUMN].split(",")) == 120


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_export_with_measurements_and_uncertainty_puts_measurements_first(index, sample, tmp_path, suffix):
    import pyarrow.parquet as pq

    from chexmask.storage.export import MEASUREMENT_HEADER

    sample("both.png", landmark_std=STD, measurements={"ctr": 0.45, "heart_area_px": 1000})
    out = tmp_path / f"both{suffix}"
    export(index, out, dataset="chestx-ray8", measurements=True, uncertainty=True)
    if suffix == ".csv":
        with out.open() as fh:
            row = next(csv.DictReader(fh))
    else:
        row = {k: v[0] for k, v in pq.read_table(out).to_pydict().items()}
    assert list(row) == [*header("chestx-ray8"), *MEASUREMENT_HEADER, *UNCERTAINTY_COLUMNS, LANDMARK_STD_COLUMN]
    assert float(row["ctr"]) == 0.45 and int(row["heart_area_px"]) == 1000
    assert float(row["Uncertainty Left Lung"]) == 1.0
