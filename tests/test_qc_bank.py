"""The QC reference bank: build from JSRT, save/load round trip, nearest references."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from chexmask.errors import ConfigError
from chexmask.worker.bank import ReferenceBank
from chexmask.worker.train import load_landmarks

BANK_IDS = 4


@pytest.fixture(scope="module")
def ids(jsrt_ids: list[str]) -> list[str]:
    return jsrt_ids[:BANK_IDS]


@pytest.fixture(scope="module")
def bank(jsrt_bank) -> ReferenceBank:
    return jsrt_bank(BANK_IDS)


def test_build_holds_images_landmarks_and_shape_model(bank, jsrt, ids):
    assert bank.ids == ids and len(bank) == BANK_IDS
    assert bank.images.shape == (BANK_IDS, 96, 96) and bank.images.dtype == np.uint8
    assert bank.latents is None and bank.weights_sha256 == ""
    np.testing.assert_array_equal(bank.landmarks[1], load_landmarks(jsrt / "landmarks", ids[1]))
    full = cv2.imread(str(jsrt / "images" / f"{ids[0]}.png"), cv2.IMREAD_GRAYSCALE)
    # An area average of the 1024 image (1024/96 px per pixel), to rounding: pixel (30, 45)
    # covers rows 320-330.67 and columns 480-490.67.
    assert abs(float(bank.images[0, 30, 45]) - full[320:331, 480:491].mean()) <= 2
    assert bank.shape_model.scores(bank.landmarks).shape == (BANK_IDS,)


def test_save_load_round_trip(bank, tmp_path):
    path = tmp_path / "bank.npz"
    bank.save(path)
    again = ReferenceBank.load(path)
    assert again.ids == bank.ids and again.weights_sha256 == ""
    np.testing.assert_array_equal(again.images, bank.images)
    np.testing.assert_array_equal(again.landmarks, bank.landmarks)
    assert again.latents is None
    np.testing.assert_array_equal(again.shape_model.scores(bank.landmarks), bank.shape_model.scores(bank.landmarks))
    assert not (tmp_path / "bank.npz.part").exists()


def test_latents_of_other_weights_are_dropped(bank, tmp_path):
    rng = np.random.default_rng(0)
    bank.latents, bank.weights_sha256 = rng.normal(size=(BANK_IDS, 64)).astype(np.float32), "a" * 64
    try:
        bank.save(tmp_path / "bank.npz")
    finally:
        bank.latents, bank.weights_sha256 = None, ""
    same = ReferenceBank.load(tmp_path / "bank.npz", "a" * 64)
    assert same.latents is not None and same.weights_sha256 == "a" * 64
    # Latent neighbours: a latent close to reference 2 finds it first.
    query = same.latents[2:3] + 0.01
    assert same.nearest(same.images[:1], query, 2)[0, 0] == 2
    other = ReferenceBank.load(tmp_path / "bank.npz", "b" * 64)
    assert other.latents is None and other.weights_sha256 == ""


def test_nearest_by_image_survives_inversion(bank):
    # Without latents the references are picked by thumbnail correlation, whose sign is
    # ignored: a reference and its inverted image both find that reference first.
    rows = bank.nearest(np.stack([bank.images[3], 255 - bank.images[3]]), None, 3)
    assert rows.shape == (2, 3)
    assert list(rows[:, 0]) == [3, 3]


def test_load_refuses_other_files(tmp_path):
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ConfigError):
        ReferenceBank.load(tmp_path / "other.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a bank")
    with pytest.raises(ConfigError):
        ReferenceBank.load(tmp_path / "junk.npz")


@pytest.mark.slow
def test_build_with_model_stores_its_latents(jsrt, ids, tmp_path):
    """Latents come from segment_batch of the given model (deterministic random weights)."""
    from chexmask.worker.model import HybridGNet, segment_batch

    torch.manual_seed(0)
    model = HybridGNet().eval()
    bank = ReferenceBank.build(jsrt / "images", jsrt / "landmarks", ids[:3], model, "c" * 64, batch_size=2)
    assert bank.latents.shape == (3, 64) and bank.weights_sha256 == "c" * 64
    image = cv2.imread(str(jsrt / "images" / f"{ids[2]}.png"), cv2.IMREAD_GRAYSCALE)
    np.testing.assert_allclose(bank.latents[2], segment_batch(model, image[None])[1][0], rtol=1e-5, atol=1e-6)
    bank.save(tmp_path / "bank.npz")
    np.testing.assert_array_equal(ReferenceBank.load(tmp_path / "bank.npz", "c" * 64).latents, bank.latents)
