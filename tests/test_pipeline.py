"""``Segmenter.run``: images side by side in threads give what one image at a time gives."""

from __future__ import annotations

import resource
from pathlib import Path

import numpy as np
import pytest
import torch

from chexmask.worker.memory import keep_freed_memory
from chexmask.worker.model import HybridGNet
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
    parallel = list(Segmenter(model, info, batch_size=4, workers=2).run(
        sources(samples_dir), finish=lambda o: finished.append(o.name)))
    names = [name for name, _ in sources(samples_dir)]
    assert [o.name for o in serial] == [o.name for o in parallel] == names
    assert sorted(finished) == sorted(names)
    assert parallel[2].refusal is not None and parallel[2].refusal.code == "truncated"
    for a, b in zip(serial, parallel):
        if a.ok:
            np.testing.assert_array_equal(a.segmentation.landmarks, b.segmentation.landmarks)
            np.testing.assert_array_equal(a.segmentation.latent, b.segmentation.latent)
            assert a.segmentation.rle == b.segmentation.rle


def test_freed_tensors_are_reused_without_page_faults():
    assert keep_freed_memory()
    torch.empty(8 << 20).fill_(1)  # 32 MiB, like the first encoder level
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.empty(8 << 20).fill_(1)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 1000  # unmapped on free, each would fault 8,192 pages again
