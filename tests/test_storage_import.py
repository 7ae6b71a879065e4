"""Importing published CheXmask CSVs: keys, frames, bad rows, re-imports, and the
export of published and new rows together (SQLite and PostgreSQL)."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from chexmask.datasets import ID_COLUMNS
from chexmask.errors import ConfigError
from chexmask.status import ImageStatus
from chexmask.storage.chexmask_csv import Imported
from chexmask.storage.chexmask_import import Frame, import_csv, import_sha256, import_uri
from chexmask.storage.export import export
from chexmask.storage.index import MaskIndex
from chexmask.storage.layout import VALUE_COLUMNS, csv_line, numpy_text
from chexmask.storage.queries import QueryFilters

pytest_plugins = ["services"]

OFFICIAL = "hybridgnet-official"
WEIGHTS = "b7" * 32
REFERENCE_FILES = [
    ("mimic-cxr-jpg", "mimic_original_resolution_verbatim.csv", "original"),
    ("mimic-cxr-jpg", "mimic_original_resolution_consistent_hw.csv", "original"),
    ("mimic-cxr-jpg", "mimic_preprocessed_1024.csv", "1024"),
    ("vindr-cxr", "vindr_original_resolution.csv", "original"),
    ("vindr-cxr", "vindr_preprocessed_1024.csv", "1024"),
]
POINTS = [[10 + i, 20 + 2 * i] for i in range(120)]


def run_import(index: MaskIndex, path: Path, dataset: str, **options):
    return import_csv(
        index, path, dataset=dataset, model=options.pop("model", OFFICIAL), weights_sha256=WEIGHTS, **options
    )


def write_csv(path: Path, id_header: str, rows: list[list[object]]) -> Path:
    """A CheXmask CSV written with the exporter's own line writer."""
    text = csv_line([id_header, *VALUE_COLUMNS]) + "".join(csv_line(row) for row in rows)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def original_row(
    image_id: str,
    *,
    rle: str = "1 5 20 3",
    height: int = 300,
    width: int = 200,
    points=POINTS,
    mean: object = 0.91,
    max_: object = 0.95,
) -> list[object]:
    return [image_id, mean, max_, numpy_text(points), rle, "7 2", "", height, width]


@pytest.mark.parametrize("dataset, name, frame", REFERENCE_FILES)
def test_reference_files_come_back_byte_for_byte(index, postprocessing_dir, tmp_path, dataset, name, frame):
    source = postprocessing_dir / name
    report = run_import(index, source, dataset)
    assert report.frame == Frame(frame) and report.skipped == 0 and report.taken > 0
    out = tmp_path / "export.csv"
    assert export(index, out, dataset=dataset, resolution=frame) == report.taken
    assert out.read_bytes() == source.read_bytes()
    # the other frame is not in the file, so an export of it has no rows rather than wrong ones
    other = "1024" if frame == "original" else "original"
    assert export(index, tmp_path / "other.csv", dataset=dataset, resolution=other) == 0


@pytest.mark.parametrize("dataset, id_header", [*ID_COLUMNS.items(), ("padchest", "Image ID")])
def test_each_databases_id_column_and_the_data_dictionarys(index, tmp_path, dataset, id_header):
    ids = ["a/b/view1_frontal.jpg", "216840111366964012_00-064-025.png"]
    path = write_csv(tmp_path / "in.csv", id_header, [original_row(i) for i in ids])
    report = run_import(index, path, dataset)
    assert (report.taken, report.skipped) == (2, 0)
    images = index.images(QueryFilters(dataset=dataset))
    assert [i.dataset_image_id for i in images] == ids
    assert [i.uri for i in images] == [import_uri(dataset, i) for i in ids]
    assert {i.status for i in images} == {ImageStatus.DONE}
    assert [i.sha256 for i in images] == [import_sha256(dataset, i) for i in ids]
    rows = index.query(QueryFilters(dataset=dataset, model=OFFICIAL))
    assert [(r.dice_rca_mean, r.dice_rca_max, r.height, r.width) for r in rows] == [(0.91, 0.95, 300, 200)] * 2
    out = tmp_path / "out.csv"
    export(index, out, dataset=dataset)
    # the header names the dataset's own id column; the rows are the file's bytes
    assert out.read_text().split("\n", 1)[1] == path.read_text().split("\n", 1)[1]


@pytest.mark.parametrize("name", ["in.csv", "in.csv.gz"])
def test_a_byte_order_mark_as_spreadsheets_write_it_is_not_part_of_the_header(index, tmp_path, name):
    plain = write_csv(tmp_path / "plain.csv", "Image Index", [original_row(f"{i:08d}_000.png") for i in range(3)])
    marked = b"\xef\xbb\xbf" + plain.read_bytes()
    (tmp_path / name).write_bytes(gzip.compress(marked) if name.endswith(".gz") else marked)
    report = run_import(index, tmp_path / name, "nih")
    assert (report.taken, report.skipped) == (3, 0)
    out = tmp_path / "out.csv"
    export(index, out, dataset="nih")
    assert out.read_bytes() == plain.read_bytes()


def test_gzip_file(index, tmp_path):
    path = write_csv(tmp_path / "in.csv.gz", "Image Index", [original_row(f"{i:08d}_000.png") for i in range(5)])
    assert run_import(index, path, "nih").taken == 5
    out = tmp_path / "out.csv"
    export(index, out, dataset="nih")
    assert out.read_bytes() == gzip.decompress(path.read_bytes())


def test_bad_rows_are_reported_with_their_line_numbers(index, tmp_path):
    rows = [
        original_row("good1.png"),  # lines 2-121: a numpy landmark text spans 120 lines
        original_row("bad_rle.png", rle="1 5 x"),  # 122-241
        original_row("past_end.png", rle="1 5 599 3", height=20, width=30),  # 242-361: 600 px
        original_row("few_points.png", points=POINTS[:119]),  # 362-480
        original_row("bad_dice.png", mean="high"),  # 481-600
        original_row("good2.png"),
    ]
    path = write_csv(tmp_path / "in.csv", "Image Index", rows)
    report = run_import(index, path, "nih")
    assert (report.taken, report.skipped) == (2, 4)
    lines = dict(report.bad)
    assert set(lines) == {122, 242, 362, 481}
    assert "unparsable RLE" in lines[122]
    assert "past Height x Width = 600" in lines[242]
    assert "238 landmark coordinates" in lines[362]
    assert "Dice" in lines[481]
    assert [i.dataset_image_id for i in index.images()] == ["good1.png", "good2.png"]


def test_a_child_process_reads_large_files_with_the_same_outcome(index, tmp_path):
    # the path large files take: reading and parsing in a spawned child, batches handed over
    rows = [original_row(f"{i:08d}_000.png") for i in range(7)]
    rows[3] = original_row("bad_rle.png", rle="1 5 x")
    path = write_csv(tmp_path / "in.csv", "Image Index", rows)
    seen: list[int] = []
    report = run_import(index, path, "nih", parse_in_child=True, batch_size=2, progress=seen.append)
    assert (report.taken, report.skipped, report.frame) == (6, 1, Frame.ORIGINAL)
    assert report.bad[0][0] == 2 + 3 * 120 and "unparsable RLE" in report.bad[0][1]
    assert seen == [2, 2, 2, 1]  # every record counted once, batch by batch
    out = tmp_path / "out.csv"
    export(index, out, dataset="nih")
    assert out.read_bytes() == write_csv(tmp_path / "good.csv", "Image Index", rows[:3] + rows[4:]).read_bytes()


def test_a_header_error_in_the_child_process_is_raised_to_the_caller(index, tmp_path):
    path = tmp_path / "in.csv"
    path.write_text(csv_line(["Image Index", "Landmarks"]) + csv_line(["a.png", "[]"]))
    with pytest.raises(ConfigError, match="not a CheXmask CSV"):
        run_import(index, path, "nih", parse_in_child=True)
    assert index.images() == []


def test_reimport_changes_nothing_and_a_newer_file_updates_its_changed_rows(index, tmp_path):
    ids = [f"{i:08d}_000.png" for i in range(4)]
    first = write_csv(tmp_path / "v1.csv", "Image Index", [original_row(i) for i in ids])
    assert run_import(index, first, "nih").taken == 4
    before = {r.dataset_image_id: r for r in index.query(QueryFilters(dataset="nih"))}

    again = run_import(index, first, "nih")
    assert (again.taken, again.updated, again.unchanged) == (0, 0, 4)
    assert {r.dataset_image_id: r for r in index.query(QueryFilters(dataset="nih"))} == before

    rows = [original_row(i) for i in ids]
    rows[2] = original_row(ids[2], rle="3 4", mean=0.5)
    newer = write_csv(tmp_path / "v2.csv", "Image Index", [*rows, original_row("00000009_000.png")])
    report = run_import(index, newer, "nih")
    assert (report.taken, report.updated, report.unchanged) == (1, 1, 3)
    after = {r.dataset_image_id: r for r in index.query(QueryFilters(dataset="nih"))}
    assert after[ids[2]].dice_rca_mean == 0.5 and after[ids[2]].id == before[ids[2]].id
    assert index.get_segmentation(after[ids[2]].id).rle_left_lung == "3 4"
    out = tmp_path / "out.csv"
    export(index, out, dataset="nih")
    assert out.read_bytes() == newer.read_bytes()


def test_rows_imported_before_are_recognised_before_they_are_parsed(index, tmp_path):
    from chexmask.storage.chexmask_csv import read_batches
    from chexmask.storage.chexmask_import import _imported_etags

    ids = [f"{i:08d}_000.png" for i in range(4)]
    rows = [original_row(i, mean=0.97) for i in ids]  # Mean above Max: counted even when left out
    run_import(index, write_csv(tmp_path / "v1.csv", "Image Index", rows), "nih")
    imported = Imported(OFFICIAL, _imported_etags(index, "nih"))
    assert set(imported.etags) == set(ids)

    rows[1] = original_row(ids[1], rle="3 4")  # changed
    rows.append(original_row(ids[2], rle="9 1"))  # id 2 again: left to the writer, which reports it
    newer = write_csv(tmp_path / "v2.csv", "Image Index", rows)
    (batch,) = read_batches(newer, Frame.AUTO, 100, imported)
    assert [row.image_id for row in batch.parsed.rows] == [ids[1], ids[2], ids[2]]
    assert (batch.parsed.unchanged, batch.parsed.mean_above_max) == (2, 3)  # ids 0 and 3 left out, 2 parsed
    # under another model every row is new to the index
    (other,) = read_batches(newer, Frame.AUTO, 100, Imported("ours", imported.etags))
    assert (len(other.parsed.rows), other.parsed.unchanged) == (5, 0)

    report = run_import(index, newer, "nih")
    assert (report.taken, report.updated, report.unchanged, report.skipped) == (0, 2, 2, 1)
    assert "again at line" in report.bad[0][1]
    segmentations = {r.dataset_image_id: index.get_segmentation(r.id) for r in index.query(QueryFilters(dataset="nih"))}
    assert segmentations[ids[1]].rle_left_lung == "3 4" and segmentations[ids[2]].rle_left_lung == "9 1"


def test_1024_file_without_size_columns(index, tmp_path):
    header = ["dicom_id", "Dice RCA (Mean)", "Dice RCA (Max)", "Landmarks", "Left Lung", "Right Lung", "Heart"]
    landmarks = ",".join(str(v) for point in POINTS for v in point)
    path = tmp_path / "in.csv"
    path.write_text(csv_line(header) + csv_line(["abc", "", "", landmarks, "1 1048576", "", ""]))
    report = run_import(index, path, "mimic")
    assert (report.frame, report.taken) == (Frame.R1024, 1)
    segmentation = index.get_segmentation(index.query()[0].id)
    assert segmentation.landmarks_1024 == POINTS and segmentation.rle_left_lung_1024 == "1 1048576"


def test_export_writes_published_rows_then_new_ones_once_per_image(index, sample, tmp_path):
    ids = ["00000001_000.png", "00000002_000.png"]
    published = write_csv(tmp_path / "published.csv", "Image Index", [original_row(i) for i in ids])
    run_import(index, published, "nih")
    # our model segmented one published image again and one new image
    sample("00000002_000.png", model="ours", height=300, width=200)
    sample("00000003_000.png", model="ours", height=300, width=200)
    out = tmp_path / "out.csv"
    assert export(index, out, dataset="nih", model=[OFFICIAL, "ours"]) == 3
    text = out.read_text()
    assert text.startswith(published.read_text())  # the published rows, byte for byte, first
    assert text.count("00000002_000.png") == 1 and "00000003_000.png" in text
    # the other order of precedence takes our rows where we have them
    assert export(index, out, dataset="nih", model="ours,hybridgnet-official") == 3


def test_missing_model_leaves_imported_images_to_their_published_masks(index, tmp_path):
    run_import(index, write_csv(tmp_path / "p.csv", "Image Index", [original_row("00000001_000.png")]), "nih")
    index.register_linked(
        [{"uri": "file:///nih/00000001_000.png", "dataset": "nih", "dataset_image_id": "00000001_000.png"}]
    )
    index.register_image(uri="file:///nih/00000002_000.png", dataset="nih", dataset_image_id="00000002_000.png")
    missing = {m: [i.uri for i in index.images_missing_model(m)] for m in (OFFICIAL, "ours")}
    # the official model's published mask stands for the linked file; ours still needs its bytes
    assert missing[OFFICIAL] == ["file:///nih/00000002_000.png"]
    assert missing["ours"] == ["file:///nih/00000001_000.png", "file:///nih/00000002_000.png"]


def test_import_and_compare_commands(index, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from chexmask.app.cli import cli

    monkeypatch.setenv("CHEXMASK_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CHEXMASK_DATABASE_URL", index.engine.url.render_as_string(hide_password=False))
    rows = [original_row("00000001_000.png"), original_row("00000002_000.png", rle="1 x")]
    path = write_csv(tmp_path / "in.csv", "Image ID", rows)
    runner = CliRunner()
    result = runner.invoke(cli, ["import-chexmask", str(path), "--dataset", "nih"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "1 taken, 0 updated, 0 unchanged, 1 skipped (frame original, model hybridgnet-official)" in result.output
    assert "line 122: Left Lung: unparsable RLE" in result.output
    from chexmask.official import OFFICIAL_WEIGHTS_SHA256

    assert [(m.name, m.weights_sha256) for m in index.models()] == [(OFFICIAL, OFFICIAL_WEIGHTS_SHA256)]
    result = runner.invoke(cli, ["compare", "--dataset", "nih", "--models", OFFICIAL, OFFICIAL], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "1 image(s) segmented by both" in result.output
    assert re.search(r"left_lung +1\.0000", result.output)  # a model agrees with itself


def test_rows_stored_by_another_import_meanwhile_are_upserted(index, tmp_path, monkeypatch):
    """A concurrent import commits the same rows between this batch's lookup and its write:
    the batch's plain INSERTs then conflict, and it is written again as upserts."""
    from chexmask.storage import chexmask_import

    ids = [f"{i:08d}_000.png" for i in range(3)]
    path = write_csv(tmp_path / "in.csv", "Image Index", [original_row(i) for i in ids])
    run_import(index, path, "nih")
    before = index.query(QueryFilters(dataset="nih"))
    lookup = chexmask_import._known
    calls = []

    def lookup_before_the_other_import_committed(connection, uris):
        calls.append(uris)
        return {} if len(calls) == 1 else lookup(connection, uris)

    monkeypatch.setattr(chexmask_import, "_known", lookup_before_the_other_import_committed)
    # and this import started before the other one committed: nothing known to it then
    monkeypatch.setattr(chexmask_import, "_imported_etags", lambda index, dataset: {})
    report = run_import(index, path, "nih")
    assert len(calls) == 2  # the batch was written twice: first as new rows, then as upserts
    assert (report.taken, report.updated, report.unchanged, report.skipped) == (0, 0, 3, 0)
    assert index.query(QueryFilters(dataset="nih")) == before


def test_landmark_texts_with_signs_or_leading_zeros_are_normalised_or_refused():
    from chexmask.storage.chexmask_csv import BadRow, landmarks_json

    points = [[i, 2 * i] for i in range(120)]
    assert json.loads(landmarks_json(numpy_text(points))) == points
    assert json.loads(landmarks_json(",".join(str(v) for p in points for v in p))) == points
    signed = [[-3, 7], *points[1:]]
    assert json.loads(landmarks_json(numpy_text(signed))) == signed
    padded = "[[007 1]" + numpy_text(points[1:])[1:]
    assert json.loads(landmarks_json(padded)) == [[7, 1], *points[1:]]
    with pytest.raises(BadRow, match="not all integers"):
        landmarks_json(numpy_text(points).replace(" 2]", " 2.5]", 1))


@pytest.mark.parametrize("text", ["1 5 x", "1  5", " 1 5", "1 5 ", "1 5 9", "١ 5", "1 5\t7 2", "1,5"], ids=repr)
def test_rle_texts_that_are_not_start_length_pairs_are_refused(text):
    from chexmask.storage.chexmask_csv import BadRow, _rle

    with pytest.raises(BadRow, match="Left Lung: unparsable RLE"):
        _rle(text, 100, "Left Lung")
    assert _rle("1 5 9 2", 100, "Left Lung") == "1 5 9 2"
    assert _rle("", 100, "Left Lung") == ""
