"""Per-landmark uncertainty from the latent distribution (model.segment_with_uncertainty):
samples decoded as one batch equal separate decodes, no spread without variance, weights
without fc_logvar refused, and the pipeline's record and CSV carry it."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from chexmask.anatomy import FRAME, LANDMARK_STD_COLUMN, UNCERTAINTY_COLUMNS
from chexmask.errors import WeightsError
from chexmask.worker.model import (
    HybridGNet,
    decode_samples,
    segment_batch,
    segment_with_uncertainty,
    to_input,
)
from chexmask.worker.weights import compact_state_dict, load_model


@pytest.fixture(scope="module")
def model(random_weights) -> HybridGNet:
    return load_model(random_weights)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(3)
    disc = np.hypot(*np.mgrid[-512:512, -512:512]) < 380
    return (disc * 140 + rng.integers(0, 60, (FRAME, FRAME))).astype(np.uint8)


@pytest.fixture(scope="module")
def encoded(model, image):
    with torch.inference_mode():
        mu, _, conv5, conv6 = model.encoder(to_input(image[None]))
        logvar = model.encoder.fc_logvar(conv6.flatten(1))
    return mu[0], logvar[0], conv5, conv6


def test_samples_decoded_as_one_batch_equal_separate_decodes(model, encoded):
    mu, logvar, conv5, conv6 = encoded
    z = mu[None] + torch.randn((6, mu.shape[0]), generator=torch.Generator().manual_seed(1)) * 0.5
    # In float64: in float32 the last-bit differences of another summation order can flip
    # a skip lookup's 3-or-4 sample count (SPEC 3), which random weights amplify into
    # visible jumps; the computation itself is the same.
    exact = copy.deepcopy(model).double()
    z64, maps = z.double(), (conv5.double(), conv6.double())
    with torch.inference_mode():
        together = exact.decode(z64, *maps)[0]  # one image's maps shared (roi_lookup_shared)
        separate = torch.cat([exact.decode(z64[i : i + 1], *maps)[0] for i in range(6)])  # roi_lookup
        repeated = exact.decode(z64, *(m.expand(6, -1, -1, -1) for m in maps))[0]  # roi_lookup, batch 6
    assert together.shape == (6, 120, 2)
    torch.testing.assert_close(together, separate, rtol=0, atol=1e-9)
    torch.testing.assert_close(together, repeated, rtol=0, atol=1e-9)
    assert (together[0] - together[1]).abs().max() > 1e-3  # different latents, different landmarks

    with torch.inference_mode():
        drawn = decode_samples(model, mu, logvar, conv5, conv6, 6, seed=4)
        again = decode_samples(model, mu, logvar, conv5, conv6, 6, seed=4)
    assert torch.equal(drawn, again)


def test_uncertainty_keeps_the_landmarks_and_is_zero_without_variance(random_weights, image):
    model = load_model(random_weights)
    landmarks, latents = segment_batch(model, image[None])
    with_std = segment_with_uncertainty(model, image[None], 8)
    assert np.array_equal(with_std[0], landmarks) and np.array_equal(with_std[1], latents)
    std = with_std[2]
    assert std.shape == (1, 120) and (std > 0).all()

    with torch.no_grad():
        model.encoder.fc_logvar.weight.zero_()
        model.encoder.fc_logvar.bias.fill_(-1e4)  # exp(-5000) = 0: every sample is mu
    assert (segment_with_uncertainty(model, image[None], 8)[2] == 0).all()

    with torch.no_grad():
        model.encoder.fc_logvar.bias.fill_(-6.0)
    narrow = segment_with_uncertainty(model, image[None], 8)[2]
    with torch.no_grad():
        model.encoder.fc_logvar.bias.fill_(-2.0)
    wide = segment_with_uncertainty(model, image[None], 8)[2]
    assert 0 < narrow.mean() < wide.mean()


def test_weights_without_fc_logvar_refuse_uncertainty(model, image, tmp_path):
    compact = tmp_path / "compact.pt"
    torch.save(compact_state_dict(model), compact)
    stripped = load_model(compact)
    assert not stripped.has_logvar
    with pytest.raises(WeightsError, match="fc_logvar"):
        segment_with_uncertainty(stripped, image[None], 20)

    kept = tmp_path / "kept.pt"
    torch.save(compact_state_dict(model, keep_logvar=True), kept)
    assert load_model(kept).has_logvar


def test_pipeline_record_and_csv_carry_uncertainty(model, random_weights, image):
    import cv2

    from chexmask.worker.pipeline import Segmenter, prepare
    from chexmask.worker.weights import ModelInfo

    info = ModelInfo("random", "random-0", "0" * 64, str(random_weights))
    png = cv2.imencode(".png", image)[1].tobytes()
    plain = Segmenter(model, info, workers=1).segment([prepare(png, "x.png")])[0]
    sampled = Segmenter(model, info, workers=1, uncertainty=5).segment([prepare(png, "x.png")])[0]
    assert "uncertainty" not in plain.record()
    assert list(sampled.csv_row())[: len(plain.csv_row())] == list(plain.csv_row())  # CheXmask columns first
    extra = list(sampled.csv_row())[len(plain.csv_row()) :]
    assert extra == [*UNCERTAINTY_COLUMNS, LANDMARK_STD_COLUMN]
    record = sampled.record()["uncertainty"]
    assert record["samples"] == 5 and len(record["landmark_std"]) == 120
    assert record["organ_mean_std"]["heart"] == pytest.approx(np.mean(record["landmark_std"][94:]), abs=1e-3)
    assert np.array_equal(sampled.landmarks, plain.landmarks)

    stripped = HybridGNet()
    stripped.has_logvar = False
    with pytest.raises(WeightsError):
        Segmenter(stripped, info, workers=1, uncertainty=5)


def test_segment_command_writes_uncertainty_and_refuses_it_without_fc_logvar(random_weights, image, tmp_path):
    import csv
    import json
    import subprocess
    import sys

    import cv2

    cv2.imwrite(str(tmp_path / "x.png"), image)

    def segment(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "chexmask.app.cli", "segment", str(tmp_path / "x.png"), *args]
        return subprocess.run(command, capture_output=True, text=True)

    done = segment("--weights", str(random_weights), "--out", str(tmp_path / "out"), "--uncertainty", "4")
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "out" / "x.json").read_text())["uncertainty"]
    assert record["samples"] == 4 and len(record["landmark_std"]) == 120
    with open(tmp_path / "out" / "segmentations.csv") as fh:
        columns = next(csv.reader(fh))
    assert columns[-4:] == [*UNCERTAINTY_COLUMNS, LANDMARK_STD_COLUMN]

    compact = tmp_path / "compact.pt"  # as chexmask-jsrt-v2 is stored: fp16, no fc_logvar
    torch.save(compact_state_dict(load_model(random_weights)), compact)
    refused = segment("--weights", str(compact), "--out", str(tmp_path / "v2"), "--uncertainty", "20")
    assert refused.returncode != 0
    assert "fc_logvar" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "v2" / "x.json").exists()


def test_compact_weights_take_the_fitted_logvar_beside_them(model, image, tmp_path):
    from chexmask.worker.weights import logvar_file

    compact = tmp_path / "compact.pt"
    torch.save(compact_state_dict(model), compact)
    head = {"weight": torch.zeros(64, model.encoder.fc_logvar.in_features), "bias": torch.full((64,), -3.0)}
    torch.save({k: v.half() for k, v in head.items()}, logvar_file(compact))
    assert logvar_file(compact).name == "compact.logvar.pt"
    loaded = load_model(compact)
    assert loaded.has_logvar
    assert torch.equal(loaded.encoder.fc_logvar.bias, head["bias"])
    assert segment_with_uncertainty(loaded, image[None], 8)[2].mean() > 0

    torch.save({"bias": head["bias"]}, logvar_file(compact))  # not a whole fc_logvar
    with pytest.raises(WeightsError, match="fc_logvar"):
        load_model(compact)


def test_the_default_model_ships_a_pinned_fitted_logvar(tmp_path):
    """chexmask-jsrt-v2 left fc_logvar out; scripts/fit_logvar.py fitted one beside it,
    pinned in the manifest: uncertainty works out of the box and the landmarks are the
    compact file's own (fc_mu and everything else untouched)."""
    from chexmask.config import Settings
    from chexmask.worker.weights import default_weights, file_sha256, logvar_file, read_checkpoint, resolve_weights

    found = default_weights()
    if found is None:
        pytest.skip("this install has no default weights")
    path, entry = found
    assert file_sha256(logvar_file(path)) == entry["logvar"]["sha256"]
    resolved, info = resolve_weights(None, Settings(home=tmp_path))
    assert info.weights_sha256 == entry["sha256"]  # the model's identity is unchanged
    loaded = load_model(resolved)
    assert loaded.has_logvar
    compact, _ = read_checkpoint(resolved)
    state = loaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in compact.items() if not k.startswith("encoder.fc_logvar"))
    logvar = loaded.encoder.fc_logvar.bias
    assert -12 < float(logvar.mean()) < 0  # a narrow posterior around mu, not the zeros of a missing head
