"""`chexmask qc build-bank` and `chexmask qc validate`, and the validation's degradations."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from chexmask.anatomy import ORGAN_ROWS
from chexmask.app.cli import cli
from chexmask.worker.bank import ReferenceBank
from chexmask.worker.plausibility import polygon_area
from chexmask.worker.qc_commands import degrade
from chexmask.worker.train import load_landmarks


@pytest.fixture(scope="module")
def split(jsrt_ids: list[str], tmp_path_factory) -> Path:
    """A small split file: 5 references, 2 held-out images."""
    ids = jsrt_ids
    path = tmp_path_factory.mktemp("split") / "split.json"
    path.write_text(json.dumps({"train": ids[:5], "val": ids[20:22]}))
    return path


def run(*args: str) -> str:
    result = CliRunner().invoke(cli, ["qc", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_build_bank_command(jsrt, split, tmp_path):
    out = tmp_path / "bank.npz"
    text = run(
        "build-bank",
        "--images",
        str(jsrt / "images"),
        "--landmarks",
        str(jsrt / "landmarks"),
        "--ids-file",
        str(split),
        "--no-latents",
        "--out",
        str(out),
    )
    assert "5 references at 96x96, latents no" in text
    assert ReferenceBank.load(out).ids == json.loads(split.read_text())["train"]


def test_degradations_do_what_they_say(jsrt, jsrt_ids):
    truth = load_landmarks(jsrt / "landmarks", jsrt_ids[0]).astype(np.float64)
    rng = np.random.default_rng(0)
    moved = degrade(truth, "shift", rng)
    offset = moved - truth
    np.testing.assert_allclose(offset, np.broadcast_to(offset[0], offset.shape))
    assert 0 < np.abs(offset[0]).max() <= 80
    swapped = degrade(truth, "swap", rng)
    assert swapped[ORGAN_ROWS["RL"], 0].mean() > swapped[ORGAN_ROWS["LL"], 0].mean()  # sides exchanged
    turned = degrade(truth, "rotate", rng)
    heart = ORGAN_ROWS["H"]
    assert polygon_area(turned[heart]) == pytest.approx(polygon_area(truth[heart]), rel=1e-9)
    assert not np.allclose(turned, truth)
    noisy = degrade(truth, "noise", rng)
    assert 3 < (noisy - truth).std() < 31  # sigma drawn from 4-30 px
    with pytest.raises(ValueError):
        degrade(truth, "melt", rng)


@pytest.mark.slow
def test_validate_command_end_to_end(jsrt, split, random_weights, tmp_path):
    """Random (seeded) weights: their masks are poor, so the cases span the whole range."""
    weights = random_weights
    bank = tmp_path / "bank.npz"
    common = ["--images", str(jsrt / "images"), "--landmarks", str(jsrt / "landmarks"), "--ids-file", str(split)]
    run("build-bank", *common, "--weights", str(weights), "--out", str(bank), "--threads", "1")
    out = tmp_path / "val"
    text = run(
        "validate",
        "--bank",
        str(bank),
        *common,
        "--weights",
        str(weights),
        "--partial-weights",
        str(weights),
        "--out",
        str(out),
        "--threads",
        "1",
        "--folds",
        "2",
    )
    assert "dice_rca_max: pearson" in text and "ratio" in text and "inverted images:" in text
    with (out / "cases.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * 15  # every landmark case and image degradation for each held-out image
    assert {r["kind"] for r in rows} >= {"jpeg", "inverted", "occluded"}
    truth = [r for r in rows if r["kind"] == "truth"]
    assert all(float(r["true"]) == 1.0 and float(r["rca_max"]) > 0.8 for r in truth)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 2 and summary["latents"] is True
    assert summary["calibration"] == "cross-validated, 2 folds" and summary["inverted"]["n"] == 2
    assert summary["dice_rca_max"]["pearson"] > 0.8  # random masks (true ~0) against truth (1)
    assert summary["cost_ratio"] > 0
    assert (out / "scatter.png").stat().st_size > 10_000
