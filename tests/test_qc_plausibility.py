"""Plausibility checks and the statistical shape model, on JSRT ground-truth landmarks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from chexmask.anatomy import ORGAN_ROWS
from chexmask.worker.plausibility import ShapeModel, check, polygon_area, self_intersects
from chexmask.worker.train import load_landmarks


@pytest.fixture(scope="module")
def jsrt_landmarks(jsrt: Path, jsrt_ids: list[str]) -> dict[str, np.ndarray]:
    return {i: load_landmarks(jsrt / "landmarks", i) for i in jsrt_ids}


@pytest.fixture(scope="module")
def shape_model(jsrt_landmarks) -> ShapeModel:
    """Fitted on all but the last 10 images, which the tests use as unseen shapes."""
    return ShapeModel.fit(np.stack(list(jsrt_landmarks.values())[:-10]))


@pytest.fixture(scope="module")
def unseen(jsrt_landmarks) -> list[np.ndarray]:
    return list(jsrt_landmarks.values())[-10:]


def test_polygon_helpers():
    square = np.array([[0, 0], [10, 0], [10, 10], [0, 10]], float)
    bowtie = np.array([[0, 0], [10, 10], [10, 0], [0, 10]], float)
    assert polygon_area(square) == 100
    assert not self_intersects(square)
    assert self_intersects(bowtie)
    # A repeated point (zero-length edge, as rounding can make) is no crossing.
    assert not self_intersects(np.array([[0, 0], [10, 0], [10, 0], [10, 10], [0, 10]], float))


def test_ground_truth_passes(shape_model, unseen):
    # Unseen real anatomy: no flag (JPCLN-style adult PA), plausible ratios.
    for points in unseen[:5]:
        result = check(points, shape_model)
        assert result.flags == []
        assert 0.5 < result.scores["heart_position"] < 0.75
        assert result.scores["shape_outlier"] < shape_model.threshold


def test_self_intersecting_contour_is_flagged(unseen):
    points = unseen[0].copy()
    rl = points[ORGAN_ROWS["RL"]]
    rl[[5, 25]] = rl[[25, 5]]  # two far-apart contour points swapped: the outline crosses itself
    points[ORGAN_ROWS["RL"]] = rl
    assert "self_intersection_rl" in check(points).flags
    assert not any(f.startswith("self_intersection") for f in check(unseen[0]).flags)


def test_heart_outside_the_lungs_is_flagged(unseen):
    points = unseen[0].copy()
    left_of_lungs = points.copy()
    left_of_lungs[ORGAN_ROWS["H"], 0] -= points[ORGAN_ROWS["H"], 0].mean() - points[ORGAN_ROWS["RL"], 0].min() + 50
    assert "heart_not_between_lungs" in check(left_of_lungs).flags
    above = points.copy()
    above[ORGAN_ROWS["H"], 1] -= points[ORGAN_ROWS["H"], 1].min() - points[ORGAN_ROWS["RL"], 1].min() + 20
    assert "heart_above_lungs" in check(above).flags


def test_swapped_lungs_are_flagged(shape_model, unseen):
    points = unseen[0].copy()
    mirrored = points.copy()
    mirrored[:, 0] = 1023 - mirrored[:, 0]  # each lung's contour now lies on the other side
    result = check(mirrored, shape_model)
    assert "lungs_swapped" in result.flags
    assert "shape_outlier" in result.flags


def test_implausible_areas_are_flagged(unseen):
    points = unseen[0].copy()
    heart = points[ORGAN_ROWS["H"]]
    points[ORGAN_ROWS["H"]] = heart.mean(0) + (heart - heart.mean(0)) * 2.5  # heart 6x its area
    assert "heart_lung_ratio" in check(points).flags
    tiny = unseen[0].copy()
    for organ in ("RL", "LL"):
        lung = tiny[ORGAN_ROWS[organ]]
        tiny[ORGAN_ROWS[organ]] = lung.mean(0) + (lung - lung.mean(0)) * 0.3
    assert "lung_area" in check(tiny).flags


def test_shape_outlier_score_grows_with_perturbation(shape_model, unseen):
    rng = np.random.default_rng(0)
    shapes = np.stack(unseen)
    clean = shape_model.scores(shapes)
    noisy = shape_model.scores(shapes + rng.normal(0, 10, shapes.shape))
    noisier = shape_model.scores(shapes + rng.normal(0, 25, shapes.shape))
    assert np.all(noisy > clean)
    assert np.all(noisier > noisy)
    assert np.median(clean) < 2 and np.all(noisier > shape_model.threshold)


def test_shape_outlier_score_ignores_pose_and_size(shape_model, unseen):
    points = unseen[0]
    a = np.deg2rad(8)
    rotation = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    moved = (points - 512) @ rotation.T * 0.8 + 512 + [30, -20]
    np.testing.assert_allclose(shape_model.scores(moved[None]), shape_model.scores(points[None]), rtol=1e-6)


def test_shape_model_round_trips_through_arrays(shape_model, unseen):
    again = ShapeModel.from_arrays(shape_model.to_arrays())
    assert again.threshold == shape_model.threshold
    np.testing.assert_array_equal(again.scores(np.stack(unseen)), shape_model.scores(np.stack(unseen)))
