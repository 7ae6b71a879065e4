"""Segmentation throughput: ``chexmask segment``'s pipeline against a naive loop.

The naive loop is what the official inference script does: one image at a time,
read, decode, preprocess, infer (batch of 1), post-process, write. Both modes
run on the same mixed set of real images in the same invocation, each in its own
process (so peak memory is its own), and their landmarks and latents must be
identical. Usage: ``python -m chexmask.worker.bench [--images N] [--weights FILE]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from chexmask.config import Settings
from chexmask.errors import RefusedInput
from chexmask.worker.commands import collect_paths
from chexmask.worker.model import HybridGNet
from chexmask.worker.pipeline import Outcome, Segmenter, prepare, write_outputs
from chexmask.worker.weights import ModelInfo, load

SHARED_SAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "samples"


def bench_images(count: int) -> list[Path]:
    """A mixed set: the shared samples (PNG, JPEG, DICOM of several codecs) when present,
    and pydicom-data's RG1 chest in uncompressed and JPEG 2000 form, cycled to ``count``."""
    from pydicom.data import get_testdata_file

    found = collect_paths((SHARED_SAMPLES,)) if SHARED_SAMPLES.is_dir() else []
    found += [Path(p) for n in ("RG1_UNCR.dcm", "RG1_J2KR.dcm") if (p := get_testdata_file(n, download=False))]
    if not found:
        sys.exit("no benchmark images: install pydicom-data or place ../shared beside the checkout")
    return [found[i % len(found)] for i in range(count)]


def _model(weights: str | None) -> tuple[HybridGNet, ModelInfo]:
    if weights == "random":
        torch.manual_seed(0)
        return HybridGNet().eval(), ModelInfo("random", "random", "", "")
    return load(weights, Settings.from_env(), "cpu")


def run_mode(mode: str, images: list[Path], weights: str | None, out: Path, batch_size: int) -> dict:
    model, info = _model(weights)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, np.ndarray] = {}
    started = time.perf_counter()
    if mode == "naive":
        segmenter = Segmenter(model, info, batch_size=1, threads=1)
        for i, path in enumerate(images):
            name = f"{i:04d}_{path.name}"
            try:
                outcome = Outcome(name, segmentation=segmenter.segment([prepare(path.read_bytes(), name)])[0])
            except RefusedInput as exc:  # recorded like the pipeline does
                outcome = Outcome(name, refusal=exc)
            write_outputs(outcome, out)
            _keep(results, outcome)
    else:
        segmenter = Segmenter(model, info, batch_size=batch_size)
        sources = [(f"{i:04d}_{p.name}", p.read_bytes) for i, p in enumerate(images)]
        for outcome in segmenter.run(sources, finish=lambda o: write_outputs(o, out)):
            _keep(results, outcome)
    seconds = time.perf_counter() - started
    np.savez(out / "results.npz", **results)
    return {"mode": mode, "images": len(images), "seconds": seconds, "images_per_second": len(images) / seconds,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _keep(results: dict, outcome: Outcome) -> None:
    if outcome.segmentation is not None:
        results[f"{outcome.name}/landmarks"] = outcome.segmentation.landmarks
        results[f"{outcome.name}/latent"] = outcome.segmentation.latent


def identical(a: Path, b: Path) -> bool:
    x, y = np.load(a), np.load(b)
    return set(x.files) == set(y.files) and all(np.array_equal(x[k], y[k]) for k in x.files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=24, help="number of images (the mixed set is cycled)")
    parser.add_argument("--weights", default=None, help="checkpoint (default: CHEXMASK_WEIGHTS or bundled); 'random' for untrained")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--mode", choices=["naive", "pipelined"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    images = bench_images(args.images)
    if args.mode:  # a child process: run one mode and print its numbers
        print(json.dumps(run_mode(args.mode, images, args.weights, args.out, args.batch_size)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        rows = {}
        for mode in ("naive", "pipelined"):
            cmd = [sys.executable, "-m", "chexmask.worker.bench", "--mode", mode, "--images", str(args.images),
                   "--batch-size", str(args.batch_size), "--out", f"{tmp}/{mode}"]
            if args.weights:
                cmd += ["--weights", args.weights]
            rows[mode] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        same = identical(Path(tmp, "naive", "results.npz"), Path(tmp, "pipelined", "results.npz"))
    print(f"{'mode':<10} {'images':>6} {'seconds':>8} {'img/s':>7} {'peak RSS MiB':>13}")
    for r in rows.values():
        print(f"{r['mode']:<10} {r['images']:>6} {r['seconds']:>8.1f} {r['images_per_second']:>7.2f} {r['peak_rss_mib']:>13.0f}")
    ratio = rows["pipelined"]["images_per_second"] / rows["naive"]["images_per_second"]
    print(f"throughput ratio pipelined/naive: {ratio:.2f}x; outputs identical: {same}")


if __name__ == "__main__":
    main()
