"""CheXmask CSV/Parquet export: the layout of SPEC 9.5, read back with the official
decoding rule (SPEC 9.3 step 4)."""

from __future__ import annotations

import csv
import hashlib
import io
import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from chexmask.errors import ConfigError
from chexmask.storage.export import export
from chexmask.storage.layout import csv_line, header, numpy_text

REFERENCE = Path("/work/shared/reference/postprocessing")
ORGAN_SLICES = {"right_lung": slice(0, 44), "left_lung": slice(44, 94), "heart": slice(94, 120)}
HEADER_TAIL = ["Dice RCA (Mean)", "Dice RCA (Max)", "Landmarks", "Left Lung", "Right Lung", "Heart", "Height", "Width"]


def outline(cx: float, cy: float, rx: float, ry: float, n: int) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def landmarks(scale_x: float, scale_y: float) -> np.ndarray:
    """120 points in the HybridGNet organ order, scaled from a 1024 frame."""
    points = np.concatenate(
        [
            outline(330, 480, 150, 330, 44),  # right lung (image left)
            outline(700, 480, 150, 330, 50),  # left lung
            outline(560, 640, 170, 140, 26),  # heart
        ]
    )
    return np.round(points * [scale_x, scale_y]).astype(int)


def draw(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """The official mask drawing (SPEC 9.3 step 2)."""
    canvas = np.zeros((height, width))
    return cv2.drawContours(canvas, [points.reshape(-1, 1, 2)], -1, 255, -1)


def rle_encode(mask: np.ndarray) -> str:
    """The official RLE (SPEC 9.3 step 3): 1-based starts, row-major."""
    pixels = np.concatenate([[0], (mask / 255).astype(int).flatten(), [0]])
    runs = np.where(pixels[1:] != pixels[:-1])[0] + 1
    runs[1::2] -= runs[::2]
    return " ".join(str(x) for x in runs)


def rle_decode(rle: str, height: int, width: int) -> np.ndarray:
    """The official decoder (SPEC 9.3 step 4)."""
    flat = np.zeros(height * width, dtype=np.uint8)
    numbers = np.asarray(rle.split(), dtype=int)
    for start, length in zip(numbers[0::2], numbers[1::2], strict=True):
        flat[start - 1 : start - 1 + length] = 255
    return flat.reshape(height, width)


def add_drawn(sample, name: str, height: int, width: int, **kwargs) -> dict:
    """A segmentation whose RLE is drawn from its landmarks, as the pipeline does."""
    at_1024 = landmarks(1, 1)
    original = landmarks(width / 1024, height / 1024)
    masks = {o: draw(original[s], height, width) for o, s in ORGAN_SLICES.items()}
    masks_1024 = {o: draw(at_1024[s], 1024, 1024) for o, s in ORGAN_SLICES.items()}
    sample(
        name,
        height=height,
        width=width,
        landmarks_1024=at_1024.tolist(),
        landmarks_original=original.tolist(),
        rle={o: rle_encode(m) for o, m in masks.items()},
        rle_1024={o: rle_encode(m) for o, m in masks_1024.items()},
        **kwargs,
    )
    return {"original": (original, masks), "1024": (at_1024, masks_1024)}


@pytest.mark.parametrize("resolution", ["original", "1024"])
def test_round_trip_with_official_decoder(index, sample, tmp_path, resolution):
    sizes = {"00000001_000.png": (600, 700), "00000002_000.png": (1024, 1024), "00000003_000.png": (2048, 1536)}
    dice = [{}, {"dice_mean": 0.81, "dice_max": 0.91}, {"dice_mean": 0.82, "dice_max": 0.92}]
    expected = {}
    for (name, (h, w)), qc in zip(sizes.items(), dice, strict=True):
        expected[name] = add_drawn(sample, name, h, w, **qc)[resolution]

    out = tmp_path / "nih.csv"
    assert export(index, out, dataset="nih", resolution=resolution) == 3

    frame = pd.read_csv(out)
    assert list(frame.columns) == ["Image Index", *HEADER_TAIL]
    assert list(frame["Image Index"]) == list(sizes)
    assert np.isnan(frame["Dice RCA (Mean)"][0]) and np.isnan(frame["Dice RCA (Max)"][0])
    assert list(frame["Dice RCA (Mean)"][1:]) == [0.81, 0.82]  # the mean, in the Mean column
    assert list(frame["Dice RCA (Max)"][1:]) == [0.91, 0.92]
    for _, row in frame.iterrows():
        points, masks = expected[row["Image Index"]]
        height, width = row["Height"], row["Width"]
        if resolution == "1024":
            assert (height, width) == (1024, 1024)
            parsed = np.array(row["Landmarks"].split(","), dtype=int).reshape(-1, 2)
        else:
            assert (height, width) == sizes[row["Image Index"]]
            parsed = np.array(re.findall(r"-?\d+", row["Landmarks"]), dtype=int).reshape(-1, 2)
        np.testing.assert_array_equal(parsed, points)
        for column, organ in (("Left Lung", "left_lung"), ("Right Lung", "right_lung"), ("Heart", "heart")):
            decoded = rle_decode(row[column], height, width)
            assert decoded.any()
            np.testing.assert_array_equal(decoded, masks[organ])


def test_landmark_text_is_numpys(tmp_path):
    rng = np.random.default_rng(0)
    for low, high in ((0, 10), (-5, 1000), (-20000, 20000), (100, 999)):
        points = rng.integers(low, high, size=(120, 2))
        assert numpy_text(points.tolist()) == str(points)


def test_csv_lines_are_the_csv_modules():
    rng = np.random.default_rng(1)
    pieces = ["a", "b,c", 'say "hi"', "x\ny", "", " lead", "trail ", "é", "1 2 3", '"', ","]
    rows = [
        ["".join(rng.choice(pieces, size=3)), None, 0.1 + i / 7, i, "1 5 20 3", *rng.choice(pieces, 2)]
        for i in range(300)
    ]
    expected = io.StringIO()
    csv.writer(expected, lineterminator="\n").writerows(rows)
    assert "".join(map(csv_line, rows)) == expected.getvalue()
    # Deliberately unlike Python 3.11's csv module: a bare "\r" is quoted, since
    # readers (pandas among them) take it for a line end.
    assert csv_line(["a\rb", 1]) == '"a\rb",1\n'


@pytest.mark.skipif(not REFERENCE.is_dir(), reason=f"reference goldens not at {REFERENCE}")
@pytest.mark.parametrize(
    "dataset, at_1024, original",
    [
        ("mimic-cxr-jpg", "mimic_preprocessed_1024.csv", "mimic_original_resolution_consistent_hw.csv"),
        ("vindr-cxr", "vindr_preprocessed_1024.csv", "vindr_original_resolution.csv"),
    ],
)
def test_export_reproduces_official_files_byte_for_byte(index, tmp_path, dataset, at_1024, original):
    rows_1024 = _read(REFERENCE / at_1024)
    rows_original = _read(REFERENCE / original)
    id_column = header(dataset)[0]
    for row, row_original in zip(rows_1024, rows_original, strict=True):
        assert row[id_column] == row_original[id_column]
        digest = hashlib.sha256(row[id_column].encode()).hexdigest()
        image = index.register_image(
            uri=f"file:///{row[id_column]}", dataset=dataset, dataset_image_id=row[id_column], sha256=digest
        ).image
        index.add_segmentation(
            image_id=image.id,
            image_sha256=digest,
            model_version="hybridgnet",
            weights_sha256="00" * 32,
            landmarks_1024=np.array(row["Landmarks"].split(","), dtype=int).reshape(-1, 2),
            landmarks_original=np.array(re.findall(r"-?\d+", row_original["Landmarks"]), dtype=int).reshape(-1, 2),
            height=int(row_original["Height"]),
            width=int(row_original["Width"]),
            rle=_masks(row_original),
            rle_1024=_masks(row),
        )
    for resolution, golden in (("1024", at_1024), ("original", original)):
        out = tmp_path / f"{resolution}.csv"
        export(index, out, dataset=dataset, resolution=resolution)
        assert out.read_bytes() == (REFERENCE / golden).read_bytes()


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _masks(row: dict[str, str]) -> dict[str, str]:
    return {"left_lung": row["Left Lung"], "right_lung": row["Right Lung"], "heart": row["Heart"]}


def test_parquet_holds_the_same_table(index, sample, tmp_path):
    for i in range(3):
        add_drawn(sample, f"id_{i}", 300 + i, 400, dice_mean=0.7 + i / 10, dice_max=0.9)
    assert export(index, tmp_path / "a.csv", dataset="nih") == 3
    assert export(index, tmp_path / "a.parquet", dataset="nih") == 3
    from_csv = pd.read_csv(tmp_path / "a.csv")
    from_parquet = pd.read_parquet(tmp_path / "a.parquet")
    pd.testing.assert_frame_equal(from_parquet, from_csv, check_dtype=False)


def test_export_selection(index, sample, tmp_path):
    sample("a", dataset="padchest", release="r1", dice_mean=0.6)
    sample("b", dataset="padchest", release="r1", dice_mean=0.75)
    sample("c", dataset="padchest", release="r2", dice_mean=0.9)
    sample("d", dataset="chexpert", dice_mean=0.9)

    def ids(**kwargs) -> list[str]:
        out = tmp_path / "out.csv"
        export(index, out, dataset="PadChest", **kwargs)
        frame = pd.read_csv(out)
        assert frame.columns[0] == "ImageID"
        return list(frame["ImageID"])

    assert ids() == ["a", "b", "c"]
    assert ids(release="r1") == ["a", "b"]
    assert ids(min_dice_mean=0.7) == ["b", "c"]
    assert ids(model="another") == []

    sample("a", dataset="padchest", release="r1", model="hybridgnet-v2", dice_mean=0.5)
    with pytest.raises(ConfigError, match="--model"):
        ids()
    assert ids(model="hybridgnet-v2") == ["a"]


def test_failed_export_leaves_previous_file(index, sample, tmp_path, monkeypatch):
    for name in ("a", "b", "c"):
        sample(name)
    out = tmp_path / "exports" / "nih.csv"
    out.parent.mkdir()
    out.write_text("previous export\n")
    real_stream = index.stream

    def stream_then_fail(statement, batch_size):
        rows = real_stream(statement, batch_size)
        yield next(rows)
        yield next(rows)
        raise RuntimeError("database went away mid-export")

    monkeypatch.setattr(index, "stream", stream_then_fail)
    with pytest.raises(RuntimeError, match="mid-export"):
        export(index, out, dataset="nih")
    assert out.read_text() == "previous export\n"
    assert [p.name for p in out.parent.iterdir()] == ["nih.csv"]  # no temp file left
