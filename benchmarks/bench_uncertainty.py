"""What per-landmark uncertainty costs: a segmentation with N latent samples against
the same segmentation without, on the CPU, in the same run (target: N = 20 costs at
most 0.3x a segmentation).

A segmentation here is ``Segmenter.segment`` of a prepared image: the model and the
post-processing (landmarks to masks, RLE at both resolutions), as ``chexmask segment``
and ``serve`` run it, one image at a time on all cores. The two modes alternate image
by image, and each image's time is the best of ``--repeat`` runs, so a busy machine
disturbs both alike. Usage: ``python -m benchmarks.bench_uncertainty [--images N]
[--samples N] [--repeat N] [--weights FILE|random]``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from benchmarks.bench_segment import bench_images
from chexmask.errors import RefusedInput
from chexmask.worker import cpu_kernels
from chexmask.worker.model import HybridGNet
from chexmask.worker.pipeline import Prepared, Segmenter, prepare
from chexmask.worker.weights import ModelInfo, load_model


def _model(weights: str) -> tuple[HybridGNet, ModelInfo]:
    if weights == "random":  # seeded weights with an fc_logvar: the cost does not depend on the values
        torch.manual_seed(0)
        cpu_kernels.exact_here()
        return HybridGNet().eval(), ModelInfo("random", "random", "", "")
    return load_model(weights), ModelInfo("bench", "bench", "", weights)


def _prepared(count: int) -> list[Prepared]:
    out = []
    for path in bench_images(count):
        try:
            out.append(prepare(path.read_bytes(), path.name))
        except RefusedInput:
            continue
    return out


def _best_time(segmenter: Segmenter, item: Prepared, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        segmenter.segment([item])
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--weights", default="random")
    args = parser.parse_args()

    model, info = _model(args.weights)
    plain = Segmenter(model, info, batch_size=1, workers=1)
    sampled = Segmenter(model, info, batch_size=1, workers=1, uncertainty=args.samples)
    items = _prepared(args.images)
    plain.segment(items[:1]), sampled.segment(items[:1])  # warm up both paths
    times: dict[str, list[float]] = {"segmentation": [], "with_uncertainty": []}
    for item in items:
        times["segmentation"].append(_best_time(plain, item, args.repeat))
        times["with_uncertainty"].append(_best_time(sampled, item, args.repeat))
    seg, unc = (float(np.median(v)) for v in times.values())
    report = {
        "images": len(items),
        "samples": args.samples,
        "torch_threads": torch.get_num_threads(),
        "segmentation_s": round(seg, 4),
        "with_uncertainty_s": round(unc, 4),
        "uncertainty_cost_ratio": round((unc - seg) / seg, 3),
        "target_ratio": 0.3,
        "per_image_ratio": [round((u - s) / s, 3) for s, u in zip(*times.values(), strict=True)],
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
