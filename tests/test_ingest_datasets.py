"""Dataset and dataset-image-id inference from path conventions."""

from __future__ import annotations

import pytest

from chexmask.datasets import GENERIC, ID_COLUMNS, identify


@pytest.mark.parametrize(
    ("path", "dataset", "image_id"),
    [
        ("/data/nih/images_001/images/00000001_000.png", "chestx-ray8", "00000001_000.png"),
        ("00027426_000.png", "chestx-ray8", "00027426_000.png"),
        (
            "/mnt/CheXpert-v1.0/train/patient00001/study1/view1_frontal.jpg",
            "chexpert",
            "CheXpert-v1.0/train/patient00001/study1/view1_frontal.jpg",
        ),
        # The downsampled copy is listed under the full release's Path in the CSV.
        (
            "s3/CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg",
            "chexpert",
            "CheXpert-v1.0/valid/patient64541/study1/view1_frontal.jpg",
        ),
        (
            "chexpert/train/patient00005/study2/view2_lateral.jpg",
            "chexpert",
            "CheXpert-v1.0/train/patient00005/study2/view2_lateral.jpg",
        ),
        (
            "mimic-cxr-jpg/2.0.0/files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg",
            "mimic-cxr-jpg",
            "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014",
        ),
        (
            "padchest/12/216840111366964012283393834152009033102258826_00-064-025.png",
            "padchest",
            "216840111366964012283393834152009033102258826_00-064-025.png",
        ),
        (
            "padchest/0/20536686640136348236148679891455886468_k6ga29.png",
            "padchest",
            "20536686640136348236148679891455886468_k6ga29.png",
        ),
        ("vindr/train/000434271f63a053c4128a0ba6352c7f.dicom", "vindr-cxr", "000434271f63a053c4128a0ba6352c7f"),
        ("/inbox/ward 3/patient x.dcm", GENERIC, "patient x"),
        ("utils_example1.jpg", GENERIC, "utils_example1"),
    ],
)
def test_inferred_from_path(path, dataset, image_id):
    found = identify(path)
    assert (found.dataset, found.image_id) == (dataset, image_id)


def test_every_known_dataset_has_an_adapter():
    assert {
        identify(p).dataset
        for p in (
            "00000001_000.png",
            "CheXpert-v1.0/train/patient1/study1/view1_frontal.jpg",
            "files/p10/p10000032/s50414267/x.jpg",
            "1" * 25 + "_00-064-025.png",
            "a" * 32 + ".dicom",
        )
    } == set(ID_COLUMNS)


@pytest.mark.parametrize(
    ("path", "given", "dataset", "image_id"),
    [
        # The override names the dataset (aliases resolved); the id follows its convention.
        ("anything/00000001_000.png", "NIH", "chestx-ray8", "00000001_000.png"),
        ("renamed/scan 7.png", "ChestX-ray8", "chestx-ray8", "scan 7.png"),
        (
            "x/CheXpert-v1.0/train/patient1/study1/view1_frontal.jpg",
            "chexpert",
            "chexpert",
            "CheXpert-v1.0/train/patient1/study1/view1_frontal.jpg",
        ),
        ("files/p10/p10000032/s50414267/abc.jpg", "mimic", "mimic-cxr-jpg", "abc"),
        ("00000001_000.png", "My Hospital", "my-hospital", "00000001_000"),
    ],
)
def test_override(path, given, dataset, image_id):
    found = identify(path, given)
    assert (found.dataset, found.image_id) == (dataset, image_id)
