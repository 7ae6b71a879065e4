"""Measurements (worker/measure.py): CTR and areas on a shape of known geometry and
on JSRT's ground-truth landmarks, pixel spacing from DICOM headers, and the index
columns, query filters and export columns they feed."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy import update

from chexmask.anatomy import ORGAN_SIZES
from chexmask.app.cli import cli
from chexmask.config import Settings
from chexmask.storage.api import create_app
from chexmask.storage.export import MEASUREMENT_HEADER, export
from chexmask.storage.models import Segmentation
from chexmask.storage.queries import QueryFilters
from chexmask.worker.decode import decode_image
from chexmask.worker.measure import PixelSpacing, cardiothoracic_ratio, measure_landmarks, spacing_of

# Rectangles (x0, y0, x1, y1), inclusive pixel corners, of a thorax drawn by hand:
# right lung (image left) 100..399, left lung 600..899, heart 350..649 wide.
RECTANGLES = {"RL": (100, 200, 399, 799), "LL": (600, 150, 899, 799), "H": (350, 500, 649, 749)}


def rectangle_contour(x0: int, y0: int, x1: int, y1: int, count: int) -> np.ndarray:
    """``count`` points around the rectangle's border, corners included, clockwise."""
    corners = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float64)
    lengths = np.hypot(*np.diff(corners, axis=0).T)
    at = np.linspace(0, lengths.sum(), count, endpoint=False)
    at[[0, 1, 2, 3]] = np.cumsum([0, *lengths[:3]])  # the four corners exactly
    at.sort()
    edge = np.searchsorted(np.cumsum(lengths), at, side="right")
    start = np.concatenate(([0], np.cumsum(lengths)))[edge]
    fraction = ((at - start) / lengths[edge])[:, None]
    return np.round(corners[edge] + fraction * (corners[edge + 1] - corners[edge])).astype(np.int64)


def synthetic_landmarks() -> np.ndarray:
    return np.concatenate([rectangle_contour(*RECTANGLES[o], ORGAN_SIZES[o]) for o in ("RL", "LL", "H")])


def test_synthetic_thorax_of_known_geometry():
    points = synthetic_landmarks()
    measured = measure_landmarks(points, 1000, 1000, PixelSpacing(0.2, 0.15, "PixelSpacing"))
    assert measured.ctr == pytest.approx((649 - 350) / (899 - 100))  # 299 / 799
    # OpenCV's fill of an axis-aligned rectangle covers its border pixels too
    assert measured.right_lung_area_px == 300 * 600
    assert measured.left_lung_area_px == 300 * 650
    assert measured.heart_area_px == 300 * 250
    assert measured.heart_lung_area_ratio == pytest.approx(300 * 250 / (300 * 600 + 300 * 650))
    assert measured.heart_area_mm2 == pytest.approx(300 * 250 * 0.2 * 0.15)
    assert measured.right_lung_area_mm2 == pytest.approx(300 * 600 * 0.03)
    assert (measured.pixel_spacing_row_mm, measured.pixel_spacing_col_mm) == (0.2, 0.15)
    assert measured.pixel_spacing_source == "PixelSpacing"


def test_without_spacing_areas_stay_in_pixels():
    measured = measure_landmarks(synthetic_landmarks(), 1000, 1000)
    assert measured.heart_area_px == 300 * 250
    assert measured.heart_area_mm2 is None and measured.pixel_spacing_source is None


def test_a_thorax_of_no_width_has_no_ratio():
    points = np.zeros((120, 2), dtype=np.int64)
    assert cardiothoracic_ratio(points) is None
    assert measure_landmarks(points, 64, 64).heart_lung_area_ratio == pytest.approx(1 / 2)  # one pixel each


def jsrt_landmarks(jsrt: Path, image_id: str) -> dict[str, np.ndarray]:
    return {organ: np.load(jsrt / "landmarks" / organ / f"{image_id}.npy") for organ in ("RL", "LL", "H")}


def shoelace(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


@pytest.fixture(scope="module")
def jsrt(shared_dir: Path) -> Path:
    folder = shared_dir / "data" / "jsrt"
    if not (folder / "landmarks" / "H").is_dir():
        pytest.skip("JSRT landmarks not available (../shared/data/jsrt)")
    return folder


def test_ctr_and_areas_on_jsrt_ground_truth(jsrt: Path):
    ids = sorted(p.stem for p in (jsrt / "landmarks" / "H").glob("*.npy"))[:40]
    ratios = []
    for image_id in ids:
        truth = jsrt_landmarks(jsrt, image_id)
        # by hand: the heart's widest extent over the lungs' outermost borders
        heart = truth["H"][:, 0].max() - truth["H"][:, 0].min()
        thorax = truth["LL"][:, 0].max() - truth["RL"][:, 0].min()
        points = np.concatenate([truth["RL"], truth["LL"], truth["H"]])
        assert cardiothoracic_ratio(points) == pytest.approx(heart / thorax, abs=1e-12), image_id
        measured = measure_landmarks(np.round(points).astype(np.int64), 1024, 1024)
        # the filled masks against the contours' own (shoelace) areas: the fill covers
        # the border pixels, so it is larger by about half the perimeter
        for organ, area in (("RL", measured.right_lung_area_px), ("LL", measured.left_lung_area_px)):
            assert area == pytest.approx(shoelace(truth[organ]), rel=0.04), (image_id, organ)
        assert measured.heart_area_px == pytest.approx(shoelace(truth["H"]), rel=0.04), image_id
        ratios.append(heart / thorax)
    # JSRT is mostly normal hearts: a CTR around 0.45, none above 0.7 or below 0.3
    assert 0.40 < float(np.mean(ratios)) < 0.52 and min(ratios) > 0.3 and max(ratios) < 0.7


# ---------------------------------------------------------------------------
# Pixel spacing from the DICOM header


def dicom_bytes(path: Path, tmp_path: Path, **values) -> bytes:
    ds = pydicom.dcmread(path)
    for keyword, value in values.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    out = tmp_path / "edited.dcm"
    ds.save_as(out)
    return out.read_bytes()


@pytest.mark.parametrize(
    "values, used, source",
    [
        ({"PixelSpacing": [0.2, 0.25], "ImagerPixelSpacing": [0.3, 0.3]}, [0.2, 0.25], "PixelSpacing"),
        ({"PixelSpacing": None, "ImagerPixelSpacing": [0.3, 0.35]}, [0.3, 0.35], "ImagerPixelSpacing"),
        ({"PixelSpacing": [0, 0], "ImagerPixelSpacing": [0.3, 0.35]}, [0.3, 0.35], "ImagerPixelSpacing"),
        (
            {"PixelSpacing": None, "ImagerPixelSpacing": None, "NominalScannedPixelSpacing": [0.1, 0.1]},
            [0.1, 0.1],
            "NominalScannedPixelSpacing",
        ),
        ({"PixelSpacing": None, "ImagerPixelSpacing": None}, None, "none"),
    ],
)
def test_pixel_spacing_in_provenance(samples_dir: Path, tmp_path: Path, values, used, source):
    data = dicom_bytes(samples_dir / "sitk_cxr_ExplicitLE.dcm", tmp_path, **values)
    provenance = decode_image(data).provenance
    assert provenance["pixel_spacing_source"] == source
    assert provenance.get("pixel_spacing_mm") == used
    if values.get("ImagerPixelSpacing"):
        assert provenance["imager_pixel_spacing"] == values["ImagerPixelSpacing"]
    spacing = spacing_of(provenance)
    assert (None if spacing is None else [spacing.row_mm, spacing.column_mm]) == used


def test_raster_images_have_no_spacing(samples_dir: Path):
    assert spacing_of(decode_image((samples_dir / "00000001_000.png").read_bytes()).provenance) is None


# ---------------------------------------------------------------------------
# In the index: query filters, export columns


def add_measured(index, name: str, ctr: float):
    from services import add_sample

    image, segmentation = add_sample(index, name, dice_mean=0.8, dice_max=0.9)
    with index.engine.begin() as connection:
        connection.execute(
            update(Segmentation)
            .where(Segmentation.id == segmentation.id)
            .values(ctr=ctr, heart_area_px=1000, right_lung_area_px=2000, left_lung_area_px=2100)
        )
    return segmentation


def test_query_by_ctr(index):
    for name, ctr in (("a.png", 0.42), ("b.png", 0.55), ("c.png", 0.61)):
        add_measured(index, name, ctr)
    found = index.query(QueryFilters(min_ctr=0.5))
    assert [row.dataset_image_id for row in found] == ["b.png", "c.png"]
    assert [row.ctr for row in index.query(QueryFilters(max_ctr=0.55, min_ctr=0.5))] == [0.55]
    assert found[0].heart_area_px == 1000


def test_export_measurement_columns_only_when_asked(index, tmp_path: Path):
    add_measured(index, "a.png", 0.42)
    plain, measured = tmp_path / "plain.csv", tmp_path / "measured.csv"
    export(index, plain, dataset="chestx-ray8")
    export(index, measured, dataset="chestx-ray8", measurements=True)
    plain_rows = list(csv.reader(plain.open()))
    rows = list(csv.reader(measured.open()))
    assert rows[0] == plain_rows[0] + MEASUREMENT_HEADER
    assert rows[1][: len(plain_rows[1])] == plain_rows[1]  # the CheXmask columns unchanged
    extra = dict(zip(MEASUREMENT_HEADER, rows[1][len(plain_rows[1]) :], strict=True))
    assert extra["ctr"] == "0.42" and extra["heart_area_px"] == "1000" and extra["heart_area_mm2"] == ""


def test_export_parquet_with_measurements(index, tmp_path: Path):
    import pyarrow.parquet as pq

    add_measured(index, "a.png", 0.42)
    out = tmp_path / "m.parquet"
    export(index, out, dataset="chestx-ray8", measurements=True)
    table = pq.read_table(out)
    assert table.column("ctr").to_pylist() == [0.42]
    assert table.column("heart_area_px").to_pylist() == [1000]


def test_measurements_migration_keeps_existing_rows(tmp_path: Path):
    from alembic import command
    from services import add_sample

    from chexmask.storage.engine import alembic_config
    from chexmask.storage.index import MaskIndex

    index = MaskIndex(f"sqlite:///{tmp_path / 'index.db'}")
    try:
        config = alembic_config()
        index.upgrade()
        _, segmentation = add_sample(index, "a.png", dice_mean=0.8)
        before = index.get_segmentation(segmentation.id).model_dump()
        with index.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.downgrade(config, "0004")
        index.upgrade()
        after = index.get_segmentation(segmentation.id).model_dump()
        assert index.current_revision() == MaskIndex.head_revision()
        assert after == before and after["ctr"] is None
    finally:
        index.close()


def test_api_filters_by_ctr_and_returns_measurements(index, tmp_path: Path):
    for name, ctr in (("a.png", 0.42), ("b.png", 0.55)):
        add_measured(index, name, ctr)
    settings = Settings(
        database_url=index.engine.url.render_as_string(hide_password=False), store_url=tmp_path.as_uri()
    )
    with TestClient(create_app(settings)) as client:
        items = client.get("/segmentations", params={"min_ctr": 0.5}).json()["items"]
        assert [(i["dataset_image_id"], i["ctr"], i["heart_area_px"]) for i in items] == [("b.png", 0.55, 1000)]
        one = client.get(f"/segmentations/{items[0]['id']}").json()
        assert one["ctr"] == 0.55 and one["heart_area_mm2"] is None


def test_query_command_min_ctr(index, monkeypatch):
    for name, ctr in (("a.png", 0.42), ("b.png", 0.55)):
        add_measured(index, name, ctr)
    monkeypatch.setenv("CHEXMASK_DATABASE_URL", index.engine.url.render_as_string(hide_password=False))
    result = CliRunner().invoke(cli, ["query", "--min-ctr", "0.5", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert [(row["dataset_image_id"], row["ctr"]) for row in json.loads(result.output)] == [("b.png", 0.55)]
