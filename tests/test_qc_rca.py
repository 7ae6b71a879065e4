"""RCA by registration and the per-image QC entry point, on a few JSRT images."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from chexmask.worker import rca
from chexmask.worker.bank import ReferenceBank
from chexmask.worker.qc import assess, assess_batch
from chexmask.worker.train import load_landmarks

BANK_SIZE = 6
HELD_OUT = 10  # index (in list_ids order) of an image that is not in the bank


@pytest.fixture(scope="module")
def ids(jsrt_ids: list[str]) -> list[str]:
    return jsrt_ids


@pytest.fixture(scope="module")
def bank(jsrt_bank) -> ReferenceBank:
    return jsrt_bank(BANK_SIZE)


def read(jsrt: Path, image_id: str) -> tuple[np.ndarray, np.ndarray]:
    image = cv2.imread(str(jsrt / "images" / f"{image_id}.png"), cv2.IMREAD_GRAYSCALE)
    return image, load_landmarks(jsrt / "landmarks", image_id)


def shifted(points: np.ndarray, dx: float) -> np.ndarray:
    return points + np.array([dx, 0.0], dtype=points.dtype)


# ---------------------------------------------------------------------------
# The transform


def test_bspline_weights_sum_to_one():
    x = torch.linspace(-1, 1, 101)
    for g in (6, 8, 16):
        w = rca.bspline_basis(x, g)
        assert (w >= 0).all()
        torch.testing.assert_close(w.sum(1), torch.ones(101))


def test_transform_grid_and_points_agree():
    # The dense grid (separable matmuls) and point mapping (einsum) are two code paths
    # of one function: at pixel centres they must give the same positions.
    torch.manual_seed(0)
    transform = rca.Transform(torch.eye(2, 3)[None] + 0.05 * torch.randn(1, 2, 3), 0.05 * torch.randn(1, 2, 8, 8))
    c = rca.pixel_centres(32)
    centres = torch.stack(torch.meshgrid(c, c, indexing="xy"), -1).reshape(1, -1, 2)
    torch.testing.assert_close(transform.grid(32).reshape(1, -1, 2), transform.points(centres), atol=1e-5, rtol=0)
    np.testing.assert_allclose(rca.from_norm(rca.to_norm(torch.tensor([0.0, 511.5, 1023.0]))), [0, 511.5, 1023])


def test_register_runs_under_inference_mode():
    # The worker may call QC from inference code; registration needs autograd anyway.
    cfg = rca.RCAConfig(size=32, coarse_size=16, steps=(2, 2, 2), grids=(5, 6), affine_window=5, windows=(3, 5))
    threads = torch.get_num_threads()
    with torch.inference_mode():
        images = torch.rand(2, 1, 32, 32)
        transform = rca.register(images, images.flip(-1), cfg)
    assert torch.get_num_threads() == threads  # registration's own thread count is undone
    assert transform.ctrl.shape == (2, 2, 6, 6) and torch.isfinite(transform.ctrl).all()
    assert not torch.equal(transform.theta, torch.eye(2, 3).expand(2, 2, 3))


def test_register_recovers_a_known_shift_even_inverted(bank):
    # Moving = reference 0 moved 48 px right (1024 frame): the anatomy at x in the
    # reference sits at x + 48 in the image, so its landmarks must come out shifted.
    image = cv2.resize(bank.images[0], (1024, 1024), interpolation=cv2.INTER_CUBIC)
    moved = cv2.warpAffine(image, np.float32([[1, 0, 48], [0, 1, 0]]), (1024, 1024), borderMode=cv2.BORDER_REPLICATE)
    small = np.stack([rca.working_image(moved, bank.size), 255 - rca.working_image(moved, bank.size)])
    carried = rca.carry_references(small, np.zeros((2, 1), int), bank)
    for found in carried[:, 0]:
        error = np.linalg.norm(found - shifted(bank.landmarks[0], 48), axis=1)
        assert error.mean() < 6, error.mean()  # under one working pixel (8 px)


# ---------------------------------------------------------------------------
# RCA


def test_reference_against_itself_scores_high(bank, jsrt, ids):
    image, truth = read(jsrt, ids[0])
    # With a near-identical image: re-windowed (gamma) and inverted. The similarity ignores both.
    changed = (255 - 255 * (image / 255) ** 0.7).astype(np.uint8)
    result, again = assess_batch(np.stack([image, changed]), np.stack([truth, truth]), None, bank)
    assert result.status == "done" and result.references[0] == ids[0]
    assert len(result.references) == rca.RCAConfig.k and result.seconds > 0
    assert result.dice_rca_max > 0.97
    assert result.dice_rca_max >= result.dice_rca_mean
    assert again.references[0] == ids[0]
    assert again.dice_rca_max > 0.95
    assert again.dice_rca_max_rl > 0.95 and again.dice_rca_max_ll > 0.95 and again.dice_rca_max_h > 0.9


def test_perturbed_masks_score_lower_in_order(bank, jsrt, ids):
    image, truth = read(jsrt, ids[HELD_OUT])
    small = rca.working_image(image, bank.size)[None]
    carried = rca.carry_references(small, bank.nearest(small, None, 5), bank)[0]

    def scores(points):
        estimate = rca.summarise(rca.dice_table(points, carried))
        true = rca.dice_table(points, truth[None], 1024)["overall"][0]
        return estimate["max"], true

    mirrored = truth.copy()
    mirrored[:, 0] = 2 * truth[:, 0].mean() - mirrored[:, 0]
    cases = [truth, shifted(truth, 25), shifted(truth, 60), mirrored]
    (good, _), *rest = [scores(p) for p in cases]
    assert good > 0.88  # an unseen image, against only 6 references
    estimates = [good] + [e for e, _ in rest]
    assert estimates == sorted(estimates, reverse=True), estimates
    assert estimates[2] < good - 0.1
    for estimate, true in rest:  # and each estimate is near the truth
        assert abs(estimate - true) < 0.08, (estimate, true)


def test_dice_table_of_identical_and_disjoint_contours(bank):
    truth = bank.landmarks[0]
    same = rca.dice_table(truth, truth[None])
    assert all(same[k][0] == 1.0 for k in (*rca.ORGAN_KEYS, "overall"))
    away = rca.dice_table(truth, shifted(truth, 2000)[None])  # off the canvas: empty masks
    assert away["overall"][0] == 0.0


# ---------------------------------------------------------------------------
# assess


def test_assess_without_bank_is_skipped(jsrt, ids):
    image, truth = read(jsrt, ids[0])
    result = assess(image, truth, None, None)
    assert result.status == "skipped" and "CHEXMASK_QC_BANK" in result.reason
    assert result.dice_rca_max is None and result.dice_rca_mean_h is None and result.references == []
    assert result.flags == [] and result.shape_outlier_score is None
    assert 0.1 < result.scores["lung_area_fraction"] < 0.6
    swapped = truth.copy()
    swapped[:, 0] = 1023 - swapped[:, 0]
    assert "lungs_swapped" in assess(image, swapped, None, None).flags


@pytest.mark.slow
def test_assess_batch_matches_single_images(bank, jsrt, ids):
    images, truths = zip(*(read(jsrt, i) for i in ids[HELD_OUT : HELD_OUT + 2]), strict=True)
    batch = assess_batch(np.stack(images), np.stack(truths), None, bank)
    for image, truth, together in zip(images, truths, batch, strict=True):
        alone = assess(image, truth, None, bank)
        assert together.references == alone.references
        assert together.dice_rca_max == pytest.approx(alone.dice_rca_max, abs=2e-3)
        assert together.dice_rca_mean_lungs == pytest.approx(alone.dice_rca_mean_lungs, abs=2e-3)
        assert together.dice_rca_max >= together.dice_rca_mean
        assert together.shape_outlier_score == alone.shape_outlier_score
