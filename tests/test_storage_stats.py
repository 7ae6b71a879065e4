"""Per dataset and release: counts by status, Dice RCA summaries, histogram figure."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from chexmask.status import ImageStatus
from chexmask.storage.stats import compute_stats, plot_dice_histograms

NIH_MEANS = [0.30, 0.55, 0.70, 0.72, 0.80, 0.85, 0.90, 0.95]
VINDR_MEANS = [0.65, 0.75, 0.88]


@pytest.fixture
def scored(index, sample):
    for i, mean in enumerate(NIH_MEANS):
        sample(f"nih_{i}", dataset="nih", release="2017", dice_mean=mean, dice_max=mean + 0.05)
    for i, mean in enumerate(VINDR_MEANS):
        sample(f"vindr_{i}", dataset="vindr", release="1.0.0", dice_mean=mean, dice_max=mean + 0.05)
    sample("vindr_pending", dataset="vindr", release="1.0.0")  # QC not run yet
    refused = index.register_image(uri="file:///bad.dcm", dataset="vindr", release="1.0.0").image
    index.mark(refused.id, ImageStatus.REFUSED, code="wrong_modality")
    index.register_image(uri="file:///new.png", dataset="nih", release="2017")
    return index


def test_numbers_per_dataset_and_release(scored):
    nih, vindr = compute_stats(scored)
    assert (nih.dataset, nih.release, vindr.dataset, vindr.release) == ("chestx-ray8", "2017", "vindr-cxr", "1.0.0")
    assert nih.status_counts == {ImageStatus.DONE: 8, ImageStatus.QUEUED: 1}
    assert vindr.status_counts == {ImageStatus.DONE: 4, ImageStatus.REFUSED: 1}
    assert (nih.images, nih.segmentations, vindr.segmentations) == (9, 8, 4)

    values = np.array(NIH_MEANS)
    summary = nih.dice_mean
    assert summary.n == 8
    assert summary.mean == pytest.approx(values.mean())
    assert [summary.q05, summary.q25, summary.q50, summary.q75, summary.q95] == pytest.approx(
        np.quantile(values, [0.05, 0.25, 0.5, 0.75, 0.95])
    )
    assert summary.frac_good == 6 / 8  # 0.70 counts as good
    assert nih.dice_max.mean == pytest.approx(values.mean() + 0.05)
    assert vindr.dice_mean.n == 3  # the pending segmentation has no Dice yet
    assert vindr.dice_mean.frac_good == pytest.approx(2 / 3)


def test_filters_and_models(scored, sample):
    assert [g.dataset for g in compute_stats(scored, dataset="VinDr-CXR")] == ["vindr-cxr"]
    assert compute_stats(scored, release="nope") == []
    sample("nih_0", dataset="nih", release="2017", model="v2", dice_mean=0.1)
    (nih,) = compute_stats(scored, dataset="nih", model="v2")
    assert (nih.segmentations, nih.dice_mean.mean) == (1, pytest.approx(0.1))
    assert nih.status_counts[ImageStatus.DONE] == 8  # image counts ignore the model
    (nih_all,) = compute_stats(scored, dataset="nih")
    assert nih_all.segmentations == 9


def test_as_dict_is_json_ready(scored):
    record = compute_stats(scored, dataset="vindr")[0].as_dict()
    assert record["status_counts"] == {"queued": 0, "processing": 0, "done": 4, "refused": 1, "failed": 0}
    assert record["images"] == 5 and record["dice_rca_mean"]["n"] == 3


def test_histogram_png(scored, tmp_path):
    out = tmp_path / "dice.png"
    plot_dice_histograms(compute_stats(scored), out)
    with Image.open(out) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert width > 300 and height > 300
    plot_dice_histograms([], tmp_path / "empty.png")  # an empty index still draws
    assert (tmp_path / "empty.png").stat().st_size > 0
