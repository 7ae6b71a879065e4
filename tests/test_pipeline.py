"""``Segmenter.run``: images side by side in threads give what one image at a time gives."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from chexmask.worker.model import HybridGNet, segment_batch
from chexmask.worker.pipeline import Segmenter
from chexmask.worker.weights import ModelInfo

NAMES = ("00000001_000.png", "16747_3_1.jpg", "siim_cr_jpeg_baseline_mono2.dcm", "utils_example1.jpg")


@pytest.fixture(scope="module")
def model() -> HybridGNet:
    torch.manual_seed(0)  # untrained weights are the most sensitive to last-bit differences
    return HybridGNet().eval()


def sources(samples_dir: Path) -> list[tuple[str, object]]:
    found = [(name, (samples_dir / name).read_bytes) for name in NAMES]
    found.insert(2, ("broken.png", lambda: (samples_dir / NAMES[0]).read_bytes()[:3000]))
    return found


def test_parallel_run_equals_one_by_one_in_input_order(model, samples_dir: Path):
    info = ModelInfo("random", "random", "", "")
    serial = list(Segmenter(model, info, batch_size=1, workers=1).run(sources(samples_dir)))
    finished: list[str] = []
    parallel = list(
        Segmenter(model, info, batch_size=4, workers=2).run(
            sources(samples_dir), finish=lambda o: finished.append(o.name)
        )
    )
    names = [name for name, _ in sources(samples_dir)]
    assert [o.name for o in serial] == [o.name for o in parallel] == names
    assert sorted(finished) == sorted(names)
    assert parallel[2].refusal is not None and parallel[2].refusal.code == "truncated"
    for a, b in zip(serial, parallel, strict=True):
        if a.ok:
            np.testing.assert_array_equal(a.segmentation.landmarks, b.segmentation.landmarks)
            np.testing.assert_array_equal(a.segmentation.latent, b.segmentation.latent)
            assert a.segmentation.rle == b.segmentation.rle


PAGE_FAULTS_PER_FORWARD_PASS = """
import resource, sys, numpy as np, torch
from chexmask.worker.memory import keep_freed_memory
from chexmask.worker.model import HybridGNet, segment_batch
if sys.argv[1] == "tuned":
    assert keep_freed_memory()
model, image = HybridGNet().eval(), np.zeros((1, 1024, 1024), np.uint8)
for _ in range(2):  # the heap settles
    segment_batch(model, image)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):
    segment_batch(model, image)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 2)
"""


def page_faults(mode: str) -> int:
    """Minor page faults of a forward pass in a fresh process (this one's heap has a past)."""
    run = subprocess.run(
        [sys.executable, "-c", PAGE_FAULTS_PER_FORWARD_PASS, mode], capture_output=True, text=True, check=True
    )
    return int(run.stdout)


def test_freed_tensor_memory_is_reused_from_one_image_to_the_next():
    default, tuned = page_faults("default"), page_faults("tuned")
    assert default > 50_000  # glibc unmaps every large tensor on free: its pages fault again
    assert tuned < default / 10


@pytest.mark.slow  # twelve forward passes of the trained model
def test_a_batch_in_one_forward_pass_matches_image_by_image_up_to_rounding(samples_dir: Path):
    """The device path (``segment_batch(..., together=True)``): each image normalised by
    itself inside one pass. Not bit for bit (kernels differ by batch shape), so the
    default stays image by image; the difference must stay far below a pixel on average."""
    from chexmask.config import Settings
    from chexmask.worker.pipeline import prepare
    from chexmask.worker.weights import load

    trained, _ = load(None, Settings(), "cpu")
    images = np.stack([prepare((samples_dir / name).read_bytes(), name).image for name in NAMES])
    one_by_one, latents = segment_batch(trained, images)
    together, latents_together = segment_batch(trained, images, together=True)
    np.testing.assert_allclose(latents_together, latents, atol=1e-4)
    pixels = np.abs(together - one_by_one) * 1024
    assert pixels.mean() < 0.25 and pixels.max() < 3, (pixels.mean(), pixels.max())
    # and the batch's order does not matter beyond the same rounding
    reversed_, _ = segment_batch(trained, np.ascontiguousarray(images[::-1]), together=True)
    assert np.abs(reversed_[::-1] - together).max() * 1024 < 3
