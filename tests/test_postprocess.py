"""postprocess reproduces the official masks, RLE strings and back-projection (OpenCV 4.10 goldens)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from chexmask.anatomy import ORGAN_ROWS
from chexmask.worker.postprocess import (
    combined_mask,
    csv_landmarks_1024,
    csv_landmarks_original,
    landmarks_to_pixels,
    organ_masks,
    overlay_jpeg,
    rle_decode,
    rle_encode,
    to_original,
)
from chexmask.worker.preprocess import Padding

# CheXmask CSV column of each organ (SPEC 9.5: "Left Lung" is LL, "Right Lung" is RL).
RLE_COLUMNS = {"RL": "Right Lung", "LL": "Left Lung", "H": "Heart"}
MIMIC_NAMES = ("00000001_000", "16747_3_1", "covid-19-pneumonia-58-prior", "synthetic_padded", "utils_example1")
ALL_NAMES = (*MIMIC_NAMES, "RG1_UNCR")
PAD_FIELDS = (
    "pad_left_rem",
    "pad_top_rem",
    "pad_right_rem",
    "pad_bottom_rem",
    "pad_left",
    "pad_top",
    "pad_right",
    "pad_bottom",
)


def read_png(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


@pytest.fixture(scope="session")
def landmarks(postprocessing_goldens) -> dict[str, np.ndarray]:
    return {name: np.array(points) for name, points in postprocessing_goldens["landmarks_px1024"].items()}


@pytest.fixture(scope="session")
def rows_1024(postprocessing_dir: Path, golden_csv) -> dict[str, dict[str, str]]:
    rows = {r["dicom_id"]: r for r in golden_csv(postprocessing_dir / "mimic_preprocessed_1024.csv")}
    rows |= {Path(r["image_id"]).stem: r for r in golden_csv(postprocessing_dir / "vindr_preprocessed_1024.csv")}
    return rows


@pytest.fixture(scope="session")
def paddings(preprocessing_dir: Path, golden_csv) -> dict[str, Padding]:
    """The golden paddings, read with their true height/width semantics."""
    found = {}
    for row in golden_csv(preprocessing_dir / "mimic_style_paddings.csv"):
        pads = [int(row[key]) for key in PAD_FIELDS]
        found[Path(row["filename"]).stem] = Padding(int(row["height"]), int(row["width"]), *pads, True)
    for row in golden_csv(preprocessing_dir / "vindr_style_paddings.csv"):
        pads = [int(row[key]) for key in ("pad_left", "pad_top", "pad_right", "pad_bottom")]
        found[Path(row["filename"]).stem] = Padding(int(row["height"]), int(row["width"]), 0, 0, 0, 0, *pads, False)
    return found


def test_organ_ranges() -> None:
    assert {organ: (rows.start, rows.stop - 1) for organ, rows in ORGAN_ROWS.items()} == {
        "RL": (0, 43),
        "LL": (44, 93),
        "H": (94, 119),
    }


def test_landmarks_to_pixels_matches_forward_golden(shared_dir: Path, landmarks) -> None:
    forward = np.load(shared_dir / "reference" / "golden_forward.npz")
    pixels = landmarks_to_pixels(forward["single_landmarks"])
    np.testing.assert_array_equal(pixels, forward["single_landmarks_px1024"])
    names = list(forward["single_names"])
    for name in set(ALL_NAMES) - {"utils_example1"}:  # utils_example1 uses the official Example landmarks
        np.testing.assert_array_equal(pixels[names.index(name)], landmarks[name], err_msg=name)


def test_landmarks_to_pixels_rounds_half_to_even() -> None:
    halves = np.array([[0.5, 1.5], [2.5, -0.5]]) / 1024
    np.testing.assert_array_equal(landmarks_to_pixels(halves), [[0, 2], [2, 0]])


@pytest.mark.parametrize("name", ALL_NAMES)
def test_masks_1024_match_goldens(name: str, landmarks, rows_1024, postprocessing_dir: Path) -> None:
    masks = organ_masks(landmarks[name], 1024, 1024)
    for organ, mask in masks.items():
        np.testing.assert_array_equal(mask, read_png(postprocessing_dir / f"{name}_{organ}_1024.png"), err_msg=organ)
        assert rle_encode(mask) == rows_1024[name][RLE_COLUMNS[organ]], organ
    combined = combined_mask(landmarks[name], 1024, 1024)
    np.testing.assert_array_equal(combined, read_png(postprocessing_dir / f"{name}_combined_1024_inference_style.png"))
    assert csv_landmarks_1024(landmarks[name]) == rows_1024[name]["Landmarks"]
    assert (rows_1024[name]["Height"], rows_1024[name]["Width"]) == ("1024", "1024")


def test_mask_areas_match_checks(postprocessing_goldens, landmarks) -> None:
    for name in ALL_NAMES:
        masks = organ_masks(landmarks[name], 1024, 1024)
        areas = {organ: int(np.count_nonzero(mask)) for organ, mask in masks.items()}
        assert areas == postprocessing_goldens["checks"][name]["area_1024"], name


@pytest.mark.parametrize(
    ("name", "csv_name", "png_suffix"),
    [(name, "mimic_original_resolution_consistent_hw.csv", "mimic_orig_consistent_hw") for name in MIMIC_NAMES]
    + [("RG1_UNCR", "vindr_original_resolution.csv", "vindr_orig")],
)
def test_original_resolution_matches_goldens(
    name: str, csv_name: str, png_suffix: str, rows_1024, paddings, postprocessing_dir: Path, golden_csv
) -> None:
    rows = golden_csv(postprocessing_dir / csv_name)
    row = next(r for r in rows if Path(r.get("dicom_id") or r["image_id"]).stem == name)
    padding = paddings[name]
    assert (int(row["Height"]), int(row["Width"])) == (padding.height, padding.width)
    # The back scripts start from the 1024 CSV's landmark string.
    points_1024 = np.array(rows_1024[name]["Landmarks"].split(","), dtype=np.int64).reshape(-1, 2)
    points = to_original(points_1024, padding)
    assert csv_landmarks_original(points) == row["Landmarks"]
    masks = organ_masks(points, padding.height, padding.width)
    for organ, mask in masks.items():
        golden = read_png(postprocessing_dir / f"{name}_{organ}_{png_suffix}.png")
        np.testing.assert_array_equal(mask, golden, err_msg=organ)
        assert rle_encode(mask) == row[RLE_COLUMNS[organ]], organ


def test_to_original_matches_parsed_goldens(postprocessing_goldens, landmarks, paddings) -> None:
    for row in postprocessing_goldens["mimic_original_resolution_consistent_hw"]:
        name = row["dicom_id"]
        points = to_original(landmarks[name], paddings[name])
        np.testing.assert_array_equal(points, row["_landmarks_parsed"], err_msg=name)
    row = postprocessing_goldens["vindr_original_resolution"][0]
    np.testing.assert_array_equal(to_original(landmarks["RG1_UNCR"], paddings["RG1_UNCR"]), row["_landmarks_parsed"])


def test_to_original_float_landmarks_by_hand() -> None:
    # synthetic_padded: crop 558 x 593 at (20, 23), padded 17 on top to 593 square.
    padding = Padding(600, 700, 20, 23, 87, 19, 0, 17, 0, 18, True)
    # 512/1024 * 593 = 296.5; x: 296.5 + 20 = 316.5 -> 316, y: 296.5 - 17 + 23 = 302.5 -> 302 (half-to-even)
    np.testing.assert_array_equal(to_original(np.array([[512.0, 512.0]]), padding), [[316, 302]])


def test_rle_round_trip_on_golden_masks(postprocessing_dir: Path, rows_1024) -> None:
    for name in ALL_NAMES:
        for organ, column in RLE_COLUMNS.items():
            golden = read_png(postprocessing_dir / f"{name}_{organ}_1024.png")
            np.testing.assert_array_equal(rle_decode(rows_1024[name][column], 1024, 1024), golden)
            assert rle_encode(rle_decode(rows_1024[name][column], 1024, 1024)) == rows_1024[name][column]


def test_rle_edges_and_empty_mask() -> None:
    mask = np.zeros((3, 4), np.uint8)
    mask[0, 0] = mask[0, 3] = mask[1, 0] = mask[2, 3] = 255
    mask[1, 2] = 254  # only exact 255 counts
    assert rle_encode(mask) == "1 1 4 2 12 1"  # runs continue across row ends
    np.testing.assert_array_equal(rle_decode("1 1 4 2 12 1", 3, 4), np.where(mask == 255, 255, 0))
    assert rle_encode(np.zeros((5, 5), np.uint8)) == ""
    np.testing.assert_array_equal(rle_decode("", 5, 5), np.zeros((5, 5), np.uint8))


def test_csv_landmarks_original_is_numpy_str() -> None:
    points = np.array([[106, 380], [-2, 243], [1, 294]])
    assert csv_landmarks_original(points) == "[[106 380]\n [ -2 243]\n [  1 294]]"


def test_overlay_shows_xray_and_organs(preprocessing_dir: Path, landmarks) -> None:
    image = read_png(preprocessing_dir / "utils_example1_pre1024.png")
    points = landmarks["utils_example1"]
    masks = organ_masks(points, 1024, 1024)
    picture = cv2.imdecode(np.frombuffer(overlay_jpeg(image, masks, points), np.uint8), cv2.IMREAD_UNCHANGED)
    assert picture.shape == (1024, 1024, 3)
    # Far from every organ the X-ray shows unchanged and grey.
    outside = cv2.dilate(np.maximum.reduce(list(masks.values())), np.ones((15, 15), np.uint8)) == 0
    # (within JPEG's error).
    error = np.abs(picture[outside].astype(int) - image[outside][:, None].astype(int))
    assert error.mean() < 2 and np.percentile(error, 99) <= 8
    # Inside the heart (and not a lung) red dominates; inside the right lung blue does.
    heart_only = (masks["H"] == 255) & (masks["RL"] == 0) & (masks["LL"] == 0)
    blue, green, red = (picture[heart_only][:, c].astype(int).mean() for c in range(3))
    assert red > blue + 30 and red > green + 30
    right_lung = (masks["RL"] == 255) & (masks["H"] == 0)
    blue, green, red = (picture[right_lung][:, c].astype(int).mean() for c in range(3))
    assert blue > red + 30
