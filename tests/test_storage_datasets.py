"""Canonical dataset names and the CheXmask id column of each."""

import pytest

from chexmask.datasets import canonical, id_column


@pytest.mark.parametrize(
    "name, expected",
    [
        ("ChestX-Ray8", "chestx-ray8"),
        ("NIH", "chestx-ray8"),
        ("chestxray14", "chestx-ray8"),
        ("CheXpert", "chexpert"),
        ("MIMIC-CXR-JPG", "mimic-cxr-jpg"),
        ("mimic", "mimic-cxr-jpg"),
        ("mimic_cxr", "mimic-cxr-jpg"),
        ("PadChest", "padchest"),
        ("VinDr-CXR", "vindr-cxr"),
        ("vindr", "vindr-cxr"),
        (" My Hospital ", "my-hospital"),
    ],
)
def test_canonical_names(name, expected):
    assert canonical(name) == expected


@pytest.mark.parametrize(
    "name, column",
    [
        ("nih", "Image Index"),
        ("chexpert", "Path"),
        ("MIMIC-CXR-JPG", "dicom_id"),
        ("padchest", "ImageID"),
        ("vindr", "image_id"),
        ("my-hospital", "image_id"),
    ],
)
def test_id_columns(name, column):
    assert id_column(name) == column


def test_empty_name_is_refused():
    with pytest.raises(ValueError):
        canonical("  ")
