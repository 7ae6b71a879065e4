"""The bundled default model: pinned, loadable, and it finds lungs and heart."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from chexmask.config import Settings
from chexmask.worker.metrics import landmark_scores
from chexmask.worker.model import segment_batch
from chexmask.worker.train import load_landmarks
from chexmask.worker.weights import REFRAMED_SUFFIX, default_weights, file_sha256, load

found = default_weights()
pytestmark = pytest.mark.skipif(found is None, reason="this checkout has no bundled default weights")


def test_manifest_pins_the_file():
    path, entry = found
    assert file_sha256(path) == entry["sha256"]
    assert entry["file"] == path.name and path.stat().st_size < 25 * 2**20


def test_default_model_is_used_without_weights_setting(tmp_path: Path):
    model, info = load(None, Settings(home=tmp_path), "cpu")
    assert info.name == found[1]["name"] + REFRAMED_SUFFIX and info.version.startswith(info.name)
    assert info.weights_sha256 == found[1]["sha256"]
    assert not model.training


def test_default_model_segments_a_held_out_jsrt_image(jsrt: Path, tmp_path: Path):
    """An image from the model card's validation split: lungs and heart where the
    annotation says, with the Dice the card reports (within a margin)."""
    entry = found[1]
    model, _ = load(None, Settings(home=tmp_path), "cpu")
    image_id = entry["validation_ids"][0]
    image = cv2.imread(str(jsrt / "images" / f"{image_id}.png"), cv2.IMREAD_GRAYSCALE)
    landmarks, latent = segment_batch(model, image[None])
    scores = landmark_scores(landmarks[0] * 1024, load_landmarks(jsrt / "landmarks", image_id))
    assert scores["dice_lungs"] > 0.9 and scores["dice_heart"] > 0.85, json.dumps(scores)
    assert np.isfinite(latent).all()
