"""GPU throughput and fidelity: ``chexmask segment`` on a device against a naive GPU loop.

Needs a CUDA device (and a CUDA build of torch: ``TORCH_SPEC=torch==2.14.1 make setup``).
In one run, on the same mixed real images (``bench_segment.bench_images``):

- fidelity: the device's latents and landmarks against the CPU's, image by image,
  and the one-pass batch (``segment_batch(together=True)``) against image by image
  on the device: max latent difference, mean and p99 landmark difference in pixels;
- naive: the official script's loop on the device (read, decode, infer batch of 1,
  post-process, write; one image after another);
- pipeline: ``Segmenter.run`` with CPU threads decoding and post-processing around
  the model, image by image and in one-pass batches of several sizes;
- peak GPU memory of each mode.

QC is not in these numbers yet: the RCA registration runs on the CPU. Prints one
JSON object; targets (issue 16): >= 183 images/s per GPU with QC, >= 5x naive.
Usage: ``python -m benchmarks.bench_gpu [--images N] [--threads N]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_segment import bench_images
from chexmask.config import Settings
from chexmask.errors import RefusedInput
from chexmask.worker.model import segment_batch
from chexmask.worker.pipeline import Outcome, Segmentation, Segmenter, prepare, write_outputs
from chexmask.worker.weights import load_model, resolve_weights


def fidelity(images: list[Path]) -> dict[str, float]:
    path, _ = resolve_weights(None, Settings.from_env())
    cpu, gpu = load_model(path, "cpu"), load_model(path, "cuda")
    batch = np.stack([prepare(p.read_bytes(), p.name).image for p in images[:16]])
    lm_cpu, mu_cpu = segment_batch(cpu, batch)
    lm_gpu, mu_gpu = segment_batch(gpu, batch)
    lm_together, _ = segment_batch(gpu, batch, together=True)
    device_px = np.abs(lm_gpu - lm_cpu).reshape(-1) * 1024
    together_px = np.abs(lm_together - lm_gpu).reshape(-1) * 1024
    return {
        "latent_max_abs": float(np.abs(mu_gpu - mu_cpu).max()),
        "device_vs_cpu_px_mean": float(device_px.mean()),
        "device_vs_cpu_px_p99": float(np.percentile(device_px, 99)),
        "together_vs_one_by_one_px_mean": float(together_px.mean()),
        "together_vs_one_by_one_px_p99": float(np.percentile(together_px, 99)),
    }


def naive(images: list[Path], out: Path) -> float:
    path, info = resolve_weights(None, Settings.from_env())
    model = load_model(path, "cuda")
    started = time.perf_counter()
    for i, source in enumerate(images):
        name = f"{i:05d}_{source.name}"
        try:
            prepared = prepare(source.read_bytes(), name)
            landmarks, latents = segment_batch(model, prepared.image[None])
            outcome = Outcome(name, Segmentation(prepared, landmarks[0] * 1024, latents[0], info))
        except RefusedInput as exc:
            outcome = Outcome(name, refusal=exc)
        write_outputs(outcome, out)
    return len(images) / (time.perf_counter() - started)


def pipeline(images: list[Path], out: Path, batch_size: int, threads: int, together: bool) -> float:
    path, info = resolve_weights(None, Settings.from_env())
    segmenter = Segmenter(load_model(path, "cuda"), info, batch_size, threads, together=together)
    sources = [(f"{i:05d}_{p.name}", p.read_bytes) for i, p in enumerate(images)]
    started = time.perf_counter()
    for _ in segmenter.run(sources, finish=lambda o: write_outputs(o, out)):
        pass
    return len(images) / (time.perf_counter() - started)


def measured(run, *args) -> dict[str, float]:
    torch.cuda.reset_peak_memory_stats()
    return {"images_per_second": run(*args), "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--threads", type=int, default=16, help="CPU threads decoding and post-processing")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu needs a CUDA device")
    images = bench_images(args.images)
    report: dict[str, object] = {
        "device": torch.cuda.get_device_name(),
        "images": len(images),
        "fidelity": fidelity(images),
    }
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "naive").mkdir()
        report["naive"] = measured(naive, images, Path(tmp, "naive"))
        for batch in (1, 8, 16, 32):
            for together in (False,) if batch == 1 else (False, True):
                folder = Path(tmp, f"b{batch}{'t' if together else ''}")
                folder.mkdir()
                key = f"pipeline_batch{batch}{'_together' if together else ''}"
                report[key] = measured(pipeline, images, folder, batch, args.threads, together)
    best = max(v["images_per_second"] for k, v in report.items() if k.startswith("pipeline"))  # type: ignore[index, union-attr]
    report["speedup_over_naive"] = best / report["naive"]["images_per_second"]  # type: ignore[index]
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
