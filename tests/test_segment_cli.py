"""``chexmask segment`` end to end: real images in, records, masks and the CheXmask CSV out."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from chexmask.worker.postprocess import rle_decode


@pytest.fixture(scope="module")
def golden_weights_file(tmp_path_factory, golden_weights: dict) -> Path:
    """The deterministic weights of SPEC 6, saved like the official checkpoint."""
    path = tmp_path_factory.mktemp("weights") / "golden.pt"
    torch.save(golden_weights, path)
    return path


def chexmask(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chexmask.app.cli", *args], capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def segmented(tmp_path_factory, samples_dir: Path, golden_weights_file: Path):
    """Three real images of three formats plus one corrupt file, segmented in one run."""
    inbox = tmp_path_factory.mktemp("inbox")
    for name in ("00000001_000.png", "16747_3_1.jpg", "siim_cr_jpeg_baseline_mono2.dcm"):
        shutil.copy(samples_dir / name, inbox / name)
    (inbox / "broken.png").write_bytes((samples_dir / "00000001_000.png").read_bytes()[:3000])
    out = tmp_path_factory.mktemp("out")
    result = chexmask(
        "segment", str(inbox), "--weights", str(golden_weights_file), "--out", str(out), "--batch-size", "2"
    )
    return result, out


def test_exit_status_and_summary_report_the_refusal(segmented):
    result, out = segmented
    assert result.returncode == 1, result.stderr
    assert "3 segmented, 1 refused" in result.stdout
    error = json.loads((out / "broken.error.json").read_text())
    assert error["code"] == "truncated" and error["reason"]


def test_records_carry_landmarks_latent_and_provenance(segmented):
    _, out = segmented
    record = json.loads((out / "16747_3_1.json").read_text())
    assert np.asarray(record["landmarks"]).shape == (120, 2)
    assert np.asarray(record["landmarks_original"]).shape == (120, 2)
    assert len(record["latent"]) == 64
    assert (record["height"], record["width"]) == (885, 1036)
    assert record["source"]["format"] == "jpeg"
    assert record["preprocessing"]["remove_padding"] is True
    assert len(record["model"]["weights_sha256"]) == 64
    dicom = json.loads((out / "siim_cr_jpeg_baseline_mono2.json").read_text())
    assert dicom["source"]["modality"] == "CR" and dicom["preprocessing"]["remove_padding"] is False
    for suffix in ("right_lung", "left_lung", "heart"):
        assert (out / f"16747_3_1_{suffix}.png").stat().st_size > 100
    assert cv2.imread(str(out / "16747_3_1_overlay.jpg")).shape == (1024, 1024, 3)


def test_latent_matches_official_batch_of_one(segmented, shared_dir: Path):
    """Through decode, preprocessing and a batch of two, the latent is the official one."""
    _, out = segmented
    golden = np.load(shared_dir / "reference" / "golden_forward.npz")
    names = list(golden["single_names"])
    for name in ("00000001_000", "16747_3_1"):
        record = json.loads((out / f"{name}.json").read_text())
        np.testing.assert_allclose(record["latent"], golden["single_mu"][names.index(name)], atol=2e-4)


def test_csv_is_chexmask_layout_and_decodes_to_the_masks(segmented):
    _, out = segmented
    table = pd.read_csv(out / "segmentations.csv")
    assert list(table.columns) == [
        "image_id",
        "Dice RCA (Mean)",
        "Dice RCA (Max)",
        "Landmarks",
        "Left Lung",
        "Right Lung",
        "Heart",
        "Height",
        "Width",
    ]
    assert len(table) == 3
    row = table[table.image_id == "16747_3_1"].iloc[0]
    record = json.loads((out / "16747_3_1.json").read_text())
    points = np.array([int(v) for v in re.findall(r"-?\d+", row["Landmarks"])]).reshape(120, 2)
    np.testing.assert_array_equal(points, record["landmarks_original"])
    heart_png = cv2.imread(str(out / "16747_3_1_heart.png"), cv2.IMREAD_GRAYSCALE)
    np.testing.assert_array_equal(rle_decode(row["Heart"], row["Height"], row["Width"]), heart_png)


def test_missing_weights_is_one_clear_sentence(tmp_path: Path, samples_dir: Path):
    result = chexmask(
        "segment", str(samples_dir / "00000001_000.png"), "--weights", str(tmp_path / "nope.pt"), "--out", str(tmp_path)
    )
    assert result.returncode == 2
    assert "model weights not found" in result.stderr and "Traceback" not in result.stderr


def test_max_pixels_from_environment_refuses_too_large(tmp_path: Path, samples_dir: Path, golden_weights_file: Path):
    """CHEXMASK_MAX_PIXELS reaches the decoder: a 512x512 image is over a 200000-pixel budget."""
    env = {**os.environ, "CHEXMASK_MAX_PIXELS": "200000"}
    result = chexmask(
        "segment",
        str(samples_dir / "00000001_000.png"),
        "--weights",
        str(golden_weights_file),
        "--out",
        str(tmp_path),
        env=env,
    )
    assert result.returncode == 1, result.stderr
    error = json.loads((tmp_path / "00000001_000.error.json").read_text())
    assert error["code"] == "too_large" and "512x512" in error["reason"]


def test_every_input_gets_its_own_result_or_reason(tmp_path, samples_dir: Path, golden_weights_file: Path):
    """Equal stems and equal names get distinct outputs; a file that cannot be read
    (a FIFO) gets an internal_error record and the run goes on."""
    png, jpg = (samples_dir / "00000001_000.png").read_bytes(), (samples_dir / "16747_3_1.jpg").read_bytes()
    for relative, data in {"a/x.png": png, "b/x.png": png, "c/rand.png": png, "c/rand.jpg": jpg}.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(data)
    os.mkfifo(tmp_path / "c" / "pipe.png")
    out = tmp_path / "out"
    inputs = [str(tmp_path / p) for p in ("a/x.png", "b/x.png", "c/rand.png", "c/rand.jpg", "c/pipe.png")]
    result = chexmask("segment", *inputs, "--weights", str(golden_weights_file), "--out", str(out))
    assert result.returncode == 1, result.stderr
    assert "4 segmented, 0 refused, 1 failed" in result.stdout
    for name in ("a__x.png", "b__x.png", "rand.png", "rand.jpg"):
        assert json.loads((out / f"{name}.json").read_text())["image_id"] == name
    error = json.loads((out / "pipe.error.json").read_text())
    assert error["code"] == "internal_error" and "regular file" in error["reason"]
    csv_ids = pd.read_csv(out / "segmentations.csv")["image_id"].tolist()
    assert sorted(csv_ids) == ["a__x.png", "b__x.png", "rand.jpg", "rand.png"]
