"""Re-framing (worker/reframe.py): images the bundled model did not understand are
segmented again with the chest where it expects it; the others keep their result."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from chexmask.anatomy import FRAME
from chexmask.config import Settings
from chexmask.worker.augment import zoom
from chexmask.worker.metrics import landmark_scores
from chexmask.worker.model import segment_batch
from chexmask.worker.reframe import Framing, segment_reframed, unwarp, warp
from chexmask.worker.train import load_landmarks
from chexmask.worker.weights import REFRAMED_SUFFIX, default_weights, load, resolve_weights

found = default_weights()
needs_weights = pytest.mark.skipif(found is None, reason="this checkout has no bundled default weights")


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    """The bundled model and its identity, re-framing on (the default)."""
    return load(None, Settings(home=tmp_path_factory.mktemp("home")), "cpu")


@pytest.fixture(scope="module")
def chest(jsrt: Path):
    """A JSRT validation image and its landmarks, as it is and zoomed out (0.65: neck,
    arms and abdomen in view, black around)."""
    image_id = found[1]["validation_ids"][0]
    image = cv2.imread(str(jsrt / "images" / f"{image_id}.png"), cv2.IMREAD_GRAYSCALE)
    truth = load_landmarks(jsrt / "landmarks", image_id)
    return (image, truth, *zoom(image, truth, 0.65))


def square(cx: float, cy: float, half: float) -> np.ndarray:
    """120 points on a square's outline, centred at (cx, cy)."""
    t = np.linspace(0, 4, 120, endpoint=False)
    side, f = np.floor(t), t % 1
    x = np.select([side == 0, side == 1, side == 2], [-1 + 2 * f, np.ones_like(f), 1 - 2 * f], -np.ones_like(f))
    y = np.select([side == 0, side == 1, side == 2], [-np.ones_like(f), -1 + 2 * f, np.ones_like(f)], 1 - 2 * f)
    return np.stack([cx + half * x, cy + half * y], 1).astype(np.float32)


def test_fit_takes_the_median_box_and_a_threshold_above_most_training_latents():
    rng = np.random.default_rng(0)
    shapes = np.stack([square(500 + d, 480 - d, 400 + 2 * d) for d in range(-5, 6)])
    latents = rng.normal(2.0, 3.0, (400, 64))
    framing = Framing.fit(shapes, latents)
    assert framing.box == pytest.approx((500, 480, 800, 800))
    distances = [framing.distance(z) for z in latents]
    assert np.mean(np.array(distances) <= framing.threshold) == pytest.approx(0.99, abs=0.005)
    assert framing.distance(latents.mean(0)) < 0.01  # the training mean is the centre
    back = Framing.from_json(framing.to_json())
    assert back.box == framing.box and back.threshold == pytest.approx(framing.threshold, abs=1e-4)
    np.testing.assert_allclose(back.latent_std, framing.latent_std, atol=1e-6)


def test_towards_brings_a_small_off_centre_chest_onto_the_training_box():
    framing = Framing((512, 480, 800, 800), np.zeros(64), np.ones(64), 1.5)
    small = square(300, 650, 200)  # a chest 400 px wide, low and left
    matrix = framing.towards(small)
    moved = small @ matrix[:, :2].T + matrix[:, 2]
    np.testing.assert_allclose(moved.min(0), [112, 80], atol=1e-3)
    np.testing.assert_allclose(moved.max(0), [912, 880], atol=1e-3)
    np.testing.assert_allclose(unwarp(moved, matrix), small, atol=1e-3)
    # the image moves with the points: a bright dot at a point lands at its image
    image = np.zeros((FRAME, FRAME), np.uint8)
    cv2.circle(image, (300, 650), 4, 255, -1)
    ys, xs = np.nonzero(warp(image, matrix) > 128)
    assert abs(xs.mean() - 512) < 2 and abs(ys.mean() - 480) < 2


@needs_weights
def test_default_weights_are_reframed_unless_turned_off(tmp_path: Path, random_weights: Path):
    _, info = resolve_weights(None, Settings(home=tmp_path))
    assert info.framing is not None and info.name == found[1]["name"] + REFRAMED_SUFFIX
    assert info.version == f"{info.name}-{found[1]['sha256'][:12]}"
    _, plain = resolve_weights(None, Settings(home=tmp_path, reframe=False))
    assert plain.framing is None and plain.name == found[1]["name"] and plain.version != info.version
    _, other = resolve_weights(str(random_weights), Settings(home=tmp_path))
    assert other.framing is None  # only the bundled model knows its training framing


@needs_weights
def test_a_zoomed_out_chest_is_found_and_a_jsrt_like_one_keeps_its_result(bundled, chest):
    (model, info), (image, _, small, small_truth) = bundled, chest

    plain, plain_latent = segment_batch(model, image[None])
    framed, framed_latent, std, first = segment_reframed(model, image[None], info.framing)
    assert first[0] == info.framing.distance(plain_latent[0]) <= info.framing.threshold
    np.testing.assert_array_equal(framed, plain)  # understood: the plain result, bit for bit
    np.testing.assert_array_equal(framed_latent, plain_latent)
    assert std is None

    lost, lost_latent = segment_batch(model, small[None])
    found_again, _, _, first = segment_reframed(model, small[None], info.framing)
    before = landmark_scores(lost[0] * FRAME, small_truth)
    after = landmark_scores(found_again[0] * FRAME, small_truth)
    assert first[0] == info.framing.distance(lost_latent[0]) > info.framing.threshold
    assert before["dice_lungs"] < 0.8, before
    assert after["dice_lungs"] > 0.92 and after["dice_heart"] > 0.85, after


@needs_weights
def test_uncertainty_of_a_reframed_image_is_in_its_own_scale(bundled, chest):
    (model, info), (image, _, small, _) = bundled, chest
    landmarks, _, _, _ = segment_reframed(model, small[None], info.framing)
    sampled, _, std, _ = segment_reframed(model, small[None], info.framing, samples=5)
    np.testing.assert_allclose(sampled, landmarks, atol=1e-4)  # sampling does not move the result
    assert std is not None and std.shape == (1, 120) and (std > 0).all()
    # the chest was seen ~1.5x larger: its spread is brought back to the small image's scale
    _, _, seen_std, _ = segment_reframed(model, image[None], info.framing, samples=5)
    assert 0.3 < float(np.median(std)) / float(np.median(seen_std)) < 1.2


@needs_weights
def test_the_record_says_whether_an_image_was_reframed(bundled, chest):
    from dataclasses import replace

    from chexmask.worker.pipeline import Segmenter, prepare

    (model, info), (image, _, small, _) = bundled, chest
    # grey around the chest, as soft tissue would be: the preprocessing crops black borders off
    small = small.copy()
    outside = zoom(np.full_like(image, 255), np.zeros((120, 2), np.float32), 0.65)[0] == 0
    small[outside] = 90
    pngs = [prepare(cv2.imencode(".png", im)[1].tobytes(), f"{name}.png") for name, im in (("a", image), ("b", small))]
    kept, moved = (s.record() for s in Segmenter(model, info, workers=1).segment(pngs))
    assert kept["framing"]["reframed"] is False and moved["framing"]["reframed"] is True
    assert moved["framing"]["latent_distance"] > moved["framing"]["threshold"] > kept["framing"]["latent_distance"]
    assert moved["model"]["name"] == found[1]["name"] + REFRAMED_SUFFIX
    plain = Segmenter(model, replace(info, framing=None), workers=1).segment(pngs[1:])[0].record()
    assert "framing" not in plain
    assert np.abs(np.array(plain["landmarks"]) - np.array(moved["landmarks"])).max() > 50  # re-framing moved it


@needs_weights
def test_segment_command_reframes_unless_told_not_to(jsrt: Path, tmp_path: Path, monkeypatch):
    import json

    from click.testing import CliRunner

    from chexmask.app.cli import cli

    monkeypatch.setenv("CHEXMASK_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CHEXMASK_REFRAME", raising=False)
    image_id = found[1]["validation_ids"][0]
    source = jsrt / "images" / f"{image_id}.png"
    records = {}
    for flag in ("--reframe", "--no-reframe"):
        out = tmp_path / flag
        result = CliRunner().invoke(cli, ["segment", flag, "--out", str(out), str(source)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        records[flag] = json.loads((out / f"{image_id}.json").read_text())
    assert records["--reframe"]["model"]["name"] == found[1]["name"] + REFRAMED_SUFFIX
    assert records["--reframe"]["framing"]["reframed"] is False  # a JSRT image: understood
    plain = records["--no-reframe"]
    assert plain["model"]["name"] == found[1]["name"] and "framing" not in plain
    assert records["--reframe"]["landmarks"] == records["--no-reframe"]["landmarks"]


@needs_weights
def test_one_forward_pass_for_the_batch_then_reframing_image_by_image(bundled, chest):
    """``together`` (the device path): the batch goes through the network at once, and
    only the image it did not understand is segmented again, alone."""
    (model, info), (image, _, small, _) = bundled, chest
    batch = np.stack([image, small])
    alone, _, _, first_alone = segment_reframed(model, batch, info.framing)
    together, _, _, first_together = segment_reframed(model, batch, info.framing, together=True)
    assert list(first_together > info.framing.threshold) == [False, True]
    np.testing.assert_allclose(first_together, first_alone, atol=1e-3)
    assert np.abs(together - alone).max() * FRAME < 2.0  # float rounding of the batched pass, not a jump
