"""`chexmask qc uncertainty`: its statistics on constructed data with known answers
(AUC, Spearman, the grouped out-of-fold logistic comparison and its bootstrap), and the
command end to end on two JSRT validation images with the bundled model and bank."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from chexmask.app.cli import cli
from chexmask.worker.qc_uncertainty import auc, bootstrap_difference, out_of_fold, spearman
from chexmask.worker.weights import default_weights


def test_auc_counts_the_pairs_a_bad_case_wins_and_half_the_ties():
    bad = np.array([False, False, True, True])
    # 0.35 beats 0.1 but not 0.4; 0.8 beats both: 3 of 4 pairs.
    assert auc(np.array([0.1, 0.4, 0.35, 0.8]), bad) == 0.75
    assert auc(-np.array([0.1, 0.4, 0.35, 0.8]), bad) == 0.25
    # 0.5 against 0.5 counts half: (1 + 0.5 + 2) / 4.
    assert auc(np.array([0.2, 0.5, 0.5, 0.9]), bad) == 0.875
    assert auc(np.ones(4), bad) == 0.5


def test_spearman_sees_only_ranks():
    error = np.linspace(0, 1, 30)
    assert spearman(np.exp(5 * error), error) == pytest.approx(1.0)
    assert spearman(-(error**3), error) == pytest.approx(-1.0)


def _grouped_cases(seed: int = 0, groups: int = 40, per_group: int = 8):
    """Two independent causes of a bad case, each seen through noise by one feature."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(2, groups * per_group))
    bad = a + b > 1.0
    first, second = a + rng.normal(0, 0.3, a.size), b + rng.normal(0, 0.3, b.size)
    return first, second, bad, np.repeat(np.arange(groups), per_group), rng


def test_a_second_informative_feature_raises_the_out_of_fold_auc():
    first, second, bad, groups, rng = _grouped_cases()
    alone = out_of_fold(first[:, None], bad, groups)
    both = out_of_fold(np.c_[first, second], bad, groups)
    assert auc(alone, bad) == pytest.approx(auc(first, bad), abs=0.02)  # one feature: its own ranking
    assert auc(both, bad) > auc(alone, bad) + 0.1
    low, high = bootstrap_difference(both, alone, bad, groups, reps=400)
    assert 0 < low < auc(both, bad) - auc(alone, bad) < high
    # A feature of pure noise adds nothing: its interval holds zero.
    noise = out_of_fold(np.c_[first, rng.normal(size=first.size)], bad, groups)
    low, high = bootstrap_difference(noise, alone, bad, groups, reps=400)
    assert low < 0 < high


def test_out_of_fold_scores_never_see_their_own_group():
    first, second, bad, groups, _ = _grouped_cases()
    features = np.c_[first, second]
    scores = out_of_fold(features, bad, groups)
    flipped = bad.copy()
    flipped[groups == 3] = ~flipped[groups == 3]
    again = out_of_fold(features, flipped, groups)
    np.testing.assert_array_equal(again[groups == 3], scores[groups == 3])
    assert not np.allclose(again[groups != 3], scores[groups != 3])


def test_bootstrap_of_one_predictor_against_itself_is_zero():
    first, _, bad, groups, _ = _grouped_cases()
    assert bootstrap_difference(first, first, bad, groups, reps=50) == (0.0, 0.0)


def run(*args: str) -> str:
    result = CliRunner().invoke(cli, ["qc", "uncertainty", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_uncertainty_command_end_to_end_and_from_its_cache(jsrt: Path, tmp_path: Path):
    found = default_weights()
    if found is None:
        pytest.skip("this install has no bundled default model")
    manifest = found[0].parent / "manifest.json"
    common = ["--images", str(jsrt / "images"), "--landmarks", str(jsrt / "landmarks"), "--ids-file", str(manifest)]
    common += ["--split", "validation_ids", "--limit", "2", "--kinds", "clean,zoomed_out", "--samples", "3"]
    out = tmp_path / "study"
    text = run(*common, "--out", str(out))
    assert "4 masks of 2 images (0 from the cache), 3 latent samples" in text
    rows = json.loads((out / "cases.json").read_text())["rows"]
    assert [(r["id"], r["kind"]) for r in rows] == [
        (i, k) for i in found[1]["validation_ids"][:2] for k in ("clean", "zoomed_out")
    ]
    for clean, zoomed in (rows[0:2], rows[2:4]):
        assert clean["true"] > 0.85 and clean["rca_max"] > 0.85  # the model fits JSRT's framing
        assert zoomed["true"] < clean["true"] - 0.1  # and not a chest that fills less of the frame
        assert zoomed["uncertainty"] > clean["uncertainty"] > 0
    for row in rows:
        assert 0 < row["rca_max_heart"] <= 1 and row["uncertainty_heart"] > 0
        assert row["true"] == pytest.approx((row["true_lungs"] + row["true_heart"]) / 2)
    summary = json.loads((out / "summary.json").read_text())
    flag = summary["all"]["flagging"]["0.9"]
    assert flag["bad"] == sum(r["true"] < 0.9 for r in rows) == 2
    assert flag["auc"]["rca_max"] == 1.0  # both zoomed-out masks are estimated below both clean ones
    assert "clean_and_ood" not in summary  # no image degradations asked for: one set
    assert (out / "scatter.png").stat().st_size > 10_000

    text = run(*common, "--out", str(out), "--threshold", "0.5")
    assert "4 masks of 2 images (4 from the cache)" in text
    assert list(json.loads((out / "summary.json").read_text())["all"]["flagging"]) == ["0.5"]
