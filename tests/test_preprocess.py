"""preprocess reproduces the official 1024 inputs and padding records byte-exactly."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from chexmask.anatomy import FRAME
from chexmask.errors import RefusedInput
from chexmask.worker.decode import DecodedImage
from chexmask.worker.preprocess import Padding, pad_to_square_centered, preprocess, remove_padding

MIMIC_PAD_FIELDS = (
    "pad_left_rem",
    "pad_top_rem",
    "pad_right_rem",
    "pad_bottom_rem",
    "pad_left",
    "pad_top",
    "pad_right",
    "pad_bottom",
)


@pytest.fixture(scope="session")
def preprocessed(golden_source, decoded):
    return lambda name: preprocess(decoded(golden_source(name)))


def test_pre1024_matches_golden(golden_name: str, preprocessed, preprocessing_dir: Path) -> None:
    golden = cv2.imread(str(preprocessing_dir / f"{golden_name}_pre1024.png"), cv2.IMREAD_UNCHANGED)
    result = preprocessed(golden_name)
    assert result.image.dtype == np.uint8 and result.image.shape == (FRAME, FRAME)
    np.testing.assert_array_equal(result.image, golden)


def test_mimic_style_paddings_csv(preprocessed, preprocessing_dir: Path, golden_csv) -> None:
    rows = golden_csv(preprocessing_dir / "mimic_style_paddings.csv")
    assert len(rows) == 6
    for row in rows:
        padding = preprocessed(Path(row["filename"]).stem).padding
        # mimic.py's "height" column really holds the image height (SPEC 9.1 step 6).
        expected = {"height": int(row["height"]), "width": int(row["width"])}
        expected |= {key: int(row[key]) for key in MIMIC_PAD_FIELDS}
        assert {key: getattr(padding, key) for key in expected} == expected, row["filename"]
        assert padding.remove_padding


def test_vindr_style_paddings_csv(preprocessed, preprocessing_dir: Path, golden_csv) -> None:
    rows = golden_csv(preprocessing_dir / "vindr_style_paddings.csv")
    assert len(rows) == 4
    for row in rows:
        padding = preprocessed(Path(row["filename"]).stem).padding
        expected = {key: int(row[key]) for key in ("width", "height", "pad_left", "pad_top", "pad_right", "pad_bottom")}
        assert {key: getattr(padding, key) for key in expected} == expected, row["filename"]
        assert not padding.remove_padding
        removed = (padding.pad_left_rem, padding.pad_top_rem, padding.pad_right_rem, padding.pad_bottom_rem)
        assert removed == (0, 0, 0, 0)


def test_shapes_match_preprocessing_info(golden_name: str, preprocessed, preprocessing_dir: Path) -> None:
    info = json.loads((preprocessing_dir / "preprocessing_info.json").read_text())["images"]
    entry = next(v for k, v in info.items() if Path(k).stem == golden_name)
    padding = preprocessed(golden_name).padding
    assert [padding.height, padding.width] == entry["orig_shape"]
    assert padding.square_size == entry["square"]
    if "cropped_shape" in entry:
        cropped = [
            padding.height - padding.pad_top_rem - padding.pad_bottom_rem,
            padding.width - padding.pad_left_rem - padding.pad_right_rem,
        ]
        assert cropped == entry["cropped_shape"]


def test_padding_to_dict_round_trips() -> None:
    padding = Padding(600, 700, 20, 23, 87, 19, 0, 17, 0, 18, True)
    assert Padding(**padding.to_dict()) == padding
    assert padding.square_size == 593  # synthetic_padded: crop 558 x 593


def test_remove_padding_counts_value_one_as_padding() -> None:
    image = np.ones((10, 12), np.uint8)
    image[3:6, 4:9] = 2
    crop, borders = remove_padding(image)
    assert crop.shape == (3, 5) and borders == (4, 3, 3, 4)


def test_remove_padding_refuses_all_dark_image() -> None:
    with pytest.raises(RefusedInput) as caught:
        remove_padding(np.ones((8, 8), np.uint8))
    assert caught.value.code == "blank_image"


def test_pad_to_square_puts_odd_pixel_bottom_right() -> None:
    square, (left, top, right, bottom) = pad_to_square_centered(np.full((4, 7), 9, np.uint8))
    assert square.shape == (7, 7) and (left, top, right, bottom) == (0, 1, 0, 2)
    assert square[1:5].min() == 9 and square[0].max() == 0 and square[5:].max() == 0


def test_dicom_skips_remove_padding() -> None:
    pixels = np.zeros((6, 4), np.uint8)
    pixels[2:4, 1:3] = 200  # a dark border remove_padding would crop
    result = preprocess(DecodedImage(pixels, "dicom"))
    assert result.padding.to_dict() == {
        "height": 6,
        "width": 4,
        "pad_left_rem": 0,
        "pad_top_rem": 0,
        "pad_right_rem": 0,
        "pad_bottom_rem": 0,
        "pad_left": 1,
        "pad_top": 0,
        "pad_right": 1,
        "pad_bottom": 0,
        "remove_padding": False,
    }
