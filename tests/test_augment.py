"""worker/augment.py: landmarks follow the geometric transforms exactly, the other
transforms leave them alone, outputs stay uint8 1024x1024, and a seed fixes everything."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from chexmask.anatomy import FRAME
from chexmask.worker import augment
from chexmask.worker.augment import CONDITIONS, ood_sample


def dot_image(points: np.ndarray) -> np.ndarray:
    """A black frame with a bright disc (radius 6) at each point."""
    image = np.zeros((FRAME, FRAME), np.uint8)
    for x, y in np.round(points).astype(int):
        cv2.circle(image, (int(x), int(y)), 6, (255,), -1)
    return image


def dot_centres(image: np.ndarray) -> np.ndarray:
    """Intensity-weighted centres of the bright blobs of an image."""
    count, labels, _, _ = cv2.connectedComponentsWithStats((image > 60).astype(np.uint8))
    ys, xs = np.mgrid[:FRAME, :FRAME]
    weights = image.astype(np.float64)
    centres = []
    for label in range(1, count):
        w = np.where(labels == label, weights, 0)
        centres.append(((xs * w).sum() / w.sum(), (ys * w).sum() / w.sum()))
    return np.array(centres)


GRADIENT = (np.add.outer(np.arange(FRAME), np.arange(FRAME)) // 8 % 256).astype(np.uint8)


@pytest.fixture
def points() -> np.ndarray:
    """120 landmarks on a coarse grid well inside the frame, 60 px apart (dots never merge)."""
    grid = np.stack(np.meshgrid(np.arange(12), np.arange(10)), -1).reshape(-1, 2)
    return (200 + grid * 60).astype(np.float32)


GEOMETRIC = {
    "zoom out": lambda i, p, r: augment.zoom(i, p, 0.7),
    "zoom in": lambda i, p, r: augment.zoom(i, p, 1.1),
    "rotate": lambda i, p, r: augment.rotate(i, p, 13.0),
    "shift": lambda i, p, r: augment.shift(i, p, -150.0, 90.0),
    "portrait": lambda i, p, r: augment.reframe(i, p, (150.0, 0.0, 800.0, 1024.0)),
    "landscape pad": lambda i, p, r: augment.reframe(i, p, (-100.0, 120.0, 1224.0, 850.0)),
    "random aspect": augment.random_aspect,
    "random shift": augment.random_shift,
    "random rotation": augment.random_rotation,
    "random zoom": augment.random_zoom,
}


@pytest.mark.parametrize("name", GEOMETRIC)
def test_landmarks_follow_geometric_transforms(name, points):
    rng = np.random.default_rng(7)
    image, moved = GEOMETRIC[name](dot_image(points), points, rng)
    inside = ((moved > 10) & (moved < FRAME - 10)).all(1)
    assert inside.sum() >= 60  # the check below must see most dots
    found = dot_centres(image)
    # Each transformed landmark inside the frame has a dot within a pixel of it, and
    # there are no dots elsewhere.
    nearest = np.linalg.norm(found[None] - moved[inside][:, None], axis=2).min(1)
    assert nearest.max() < 1.0, (name, nearest.max())
    assert len(found) == inside.sum() or name in ("rotate", "random rotation", "random shift", "shift")


@pytest.mark.parametrize(
    "transform",
    [
        lambda i, p, r: (augment.collimate(i, p, r), p),
        lambda i, p, r: (augment.burn_text(i, r), p),
        lambda i, p, r: (augment.random_gamma_contrast(i, r), p),
        lambda i, p, r: (augment.random_processing(i, r), p),
        lambda i, p, r: (augment.random_degradation(i, r), p),
    ],
)
def test_photometric_transforms_keep_landmarks_and_change_pixels(transform, points):
    image = GRADIENT
    changed = False
    for seed in range(4):
        out, kept = transform(image, points, np.random.default_rng(seed))
        assert kept is points
        assert out.shape == (FRAME, FRAME) and out.dtype == np.uint8
        changed |= not np.array_equal(out, image)
    assert changed


def test_collimation_stays_off_the_organs(points):
    image = np.full((FRAME, FRAME), 128, np.uint8)
    for seed in range(20):
        out = augment.collimate(image, points, np.random.default_rng(seed), value=0)
        x0, y0 = points.min(0).astype(int)
        x1, y1 = points.max(0).astype(int)
        assert (out[y0 : y1 + 1, x0 : x1 + 1] == 128).all()


@pytest.mark.parametrize("policy", ["world", "basic"])
def test_policies_are_seeded_and_keep_the_frame(policy, points):
    transform = augment.POLICIES[policy]
    assert transform is not None
    image = dot_image(points)
    outs = [transform(image, points, np.random.default_rng(s)) for s in (3, 3, 4)]
    assert np.array_equal(outs[0][0], outs[1][0]) and np.array_equal(outs[0][1], outs[1][1])
    assert not np.array_equal(outs[0][0], outs[2][0])
    for out, moved in outs:
        assert out.shape == (FRAME, FRAME) and out.dtype == np.uint8
        assert moved.shape == (120, 2) and moved.dtype == np.float32


def test_world_keeps_the_organs_in_view(points):
    rng = np.random.default_rng(0)
    for _ in range(30):
        _, moved = augment.world(dot_image(points), points, rng)
        assert augment.organs_visible(moved)


def test_ood_samples_are_deterministic_per_condition_and_image(points):
    image = np.maximum(dot_image(points) // 2, GRADIENT)
    for condition in CONDITIONS:
        a = ood_sample(image, points, condition, "JPCLN001")
        b = ood_sample(image, points, condition, "JPCLN001")
        c = ood_sample(image, points, condition, "JPCLN004")
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
        assert a[0].shape == (FRAME, FRAME) and a[0].dtype == np.uint8
        assert not np.array_equal(a[0], image), condition
        assert not np.array_equal(a[0], c[0]), condition


def test_fine_tuning_from_weights_without_fc_logvar_starts_from_a_narrow_posterior(tmp_path):
    import torch

    from chexmask.worker.model import HybridGNet
    from chexmask.worker.train import load_init_weights
    from chexmask.worker.weights import compact_state_dict

    torch.manual_seed(0)
    source = HybridGNet()
    compact = tmp_path / "compact.pt"
    torch.save(compact_state_dict(source), compact)
    model = HybridGNet()
    load_init_weights(model, compact, -9.0)
    assert (model.encoder.fc_logvar.weight == 0).all() and (model.encoder.fc_logvar.bias == -9.0).all()
    torch.testing.assert_close(model.encoder.fc_mu.weight, source.encoder.fc_mu.weight.half().float())

    kept = tmp_path / "kept.pt"
    torch.save(compact_state_dict(source, keep_logvar=True), kept)
    load_init_weights(model, kept, -9.0)
    torch.testing.assert_close(model.encoder.fc_logvar.bias, source.encoder.fc_logvar.bias.half().float())


def test_evaluate_ood_scores_every_condition(jsrt, random_weights):
    from chexmask.worker.evaluate import condition_table, evaluate
    from chexmask.worker.weights import load_model

    rows, summary = evaluate(load_model(random_weights), jsrt / "images", jsrt / "landmarks", ["JPCLN001"], ood=True)
    assert [r["condition"] for r in rows] == list(CONDITIONS)
    assert set(summary) == {"images", "ood", *CONDITIONS}
    for condition in CONDITIONS:
        assert 0 <= summary[condition]["dice_lungs"] <= 1
    assert summary["ood"]["dice_heart"] == pytest.approx(np.mean([r["dice_heart"] for r in rows]))
    table = condition_table(summary)
    assert table.count("\n") == len(CONDITIONS) + 2 and "zoomed_out" in table


def test_weight_averaging_keeps_the_mean_of_the_epochs_across_a_resume(jsrt, tmp_path):
    import shutil

    import torch

    from chexmask.worker.train import TrainConfig, train

    out = tmp_path / "run"
    config = TrainConfig(epochs=1, batch_size=1, lr=1e-4, limit=3, average_from=1)
    train(jsrt / "images", jsrt / "landmarks", out, config)
    first = torch.load(out / "last.ckpt", weights_only=False)["model"]
    averaged = torch.load(out / "average.pt", weights_only=True)
    torch.testing.assert_close(averaged["encoder.fc_mu.weight"], first["encoder.fc_mu.weight"].half())
    shutil.copy(out / "last.ckpt", tmp_path / "epoch1.ckpt")

    config.epochs = 2
    train(jsrt / "images", jsrt / "landmarks", out, config, resume=tmp_path / "epoch1.ckpt")
    second = torch.load(out / "last.ckpt", weights_only=False)["model"]
    averaged = torch.load(out / "average.pt", weights_only=True)
    for key in ("encoder.fc_mu.weight", next(k for k in first if k.startswith("graphConv"))):
        assert not torch.equal(first[key], second[key])
        torch.testing.assert_close(averaged[key].float(), (first[key] + second[key]) / 2, atol=2e-3, rtol=2e-3)
    history = json.loads((out / "history.json").read_text())
    assert [e["averaged_epochs"] for e in history] == [1, 2]
    assert 0 < history[-1]["average_dice_lungs"] <= 1
