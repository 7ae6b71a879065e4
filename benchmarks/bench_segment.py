"""Segmentation throughput: ``chexmask segment``'s pipeline against a naive loop.

The naive loop is what the official inference script does: one image at a time,
read, decode, preprocess, infer (batch of 1, torch's own operations on all cores:
``HybridGNetConfig(fast_kernels=False)``), post-process, write. A second naive run
adds the allocator tuning the pipeline uses (``worker/memory.py``), so the report
splits the gain: the allocator, then the fast kernels and parallel images. All
modes run on the same mixed set of real images in the same invocation,
interleaved, each run in its own process (so peak memory is its own), and their
landmarks and latents must be identical.
Usage: ``python -m benchmarks.bench_segment [--images N] [--weights FILE] [--repeat N]``.
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
from chexmask.files import image_files
from chexmask.worker import cpu_kernels
from chexmask.worker.memory import keep_freed_memory
from chexmask.worker.model import HybridGNet, HybridGNetConfig, segment_batch
from chexmask.worker.pipeline import Outcome, Segmentation, Segmenter, prepare, write_outputs
from chexmask.worker.reframe import segment_reframed
from chexmask.worker.weights import ModelInfo, load_model, resolve_weights

# The naive loop as the official script runs it, and the same loop with the memory
# allocator tuned as the pipeline tunes it (to show what each part of the gain is).
NAIVE_MODES = ("naive", "naive-tuned")
SHARED_SAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "samples"


def bench_images(count: int) -> list[Path]:
    """A mixed set: the shared samples (PNG, JPEG, DICOM of several codecs) when present,
    and pydicom-data's RG1 chest in uncompressed and JPEG 2000 form, cycled to ``count``."""
    from pydicom.data import get_testdata_file

    found = image_files((SHARED_SAMPLES,)) if SHARED_SAMPLES.is_dir() else []
    found += [Path(p) for n in ("RG1_UNCR.dcm", "RG1_J2KR.dcm") if (p := get_testdata_file(n, download=False))]
    if not found:
        sys.exit("no benchmark images: install pydicom-data or place ../shared beside the checkout")
    return [found[i % len(found)] for i in range(count)]


def _model(weights: str | None, cfg: HybridGNetConfig = HybridGNetConfig()) -> tuple[HybridGNet, ModelInfo]:
    if weights == "random":
        torch.manual_seed(0)
        if cfg.fast_kernels:
            cpu_kernels.exact_here()  # as load_model does: compile before the clock starts
        return HybridGNet(cfg).eval(), ModelInfo("random", "random", "", "")
    path, info = resolve_weights(weights, Settings.from_env())
    return load_model(path, "cpu", cfg), info


def run_mode(mode: str, images: list[Path], weights: str | None, out: Path, batch_size: int) -> dict:
    model, info = _model(weights, HybridGNetConfig(fast_kernels=mode not in NAIVE_MODES))
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, np.ndarray] = {}
    cpu_started = time.process_time()
    started = time.perf_counter()
    if mode in NAIVE_MODES:
        if mode == "naive-tuned":
            keep_freed_memory()
        for i, path in enumerate(images):
            name = f"{i:04d}_{path.name}"
            try:
                prepared = prepare(path.read_bytes(), name)
                if info.framing is None:
                    landmarks, latents = segment_batch(model, prepared.image[None])
                else:  # the bundled model re-frames what it did not understand: the same work
                    landmarks, latents, _, _ = segment_reframed(model, prepared.image[None], info.framing)
                outcome = Outcome(name, Segmentation(prepared, landmarks[0] * 1024, latents[0], info))
            except RefusedInput as exc:  # recorded like the pipeline does
                outcome = Outcome(name, refusal=exc)
            write_outputs(outcome, out)
            _keep(results, outcome)
    else:
        segmenter = Segmenter(model, info, batch_size, Settings.from_env().model_threads)
        sources = [(f"{i:04d}_{p.name}", p.read_bytes) for i, p in enumerate(images)]
        for outcome in segmenter.run(sources, finish=lambda o: write_outputs(o, out)):
            _keep(results, outcome)
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started
    np.savez(out / "results.npz", **results)
    return {
        "mode": mode,
        "images": len(images),
        "seconds": seconds,
        "images_per_second": len(images) / seconds,
        "cpu_seconds_per_image": cpu_seconds / len(images),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


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
    parser.add_argument(
        "--weights", default=None, help="checkpoint (default: CHEXMASK_WEIGHTS or bundled); 'random' for untrained"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=Settings.from_env().batch_size,
        help="images in the model at once in the pipelined mode (as `chexmask segment`)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per mode; the median is reported")
    parser.add_argument("--mode", choices=[*NAIVE_MODES, "pipelined"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    images = bench_images(args.images)
    if args.mode:  # a child process: run one mode and print its numbers
        print(json.dumps(run_mode(args.mode, images, args.weights, args.out, args.batch_size)))
        return
    runs: dict[str, list[dict]] = {mode: [] for mode in (*NAIVE_MODES, "pipelined")}
    same = True
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeat):  # interleaved, so both modes see the same machine noise
            for mode in runs:
                cmd = [
                    sys.executable,
                    "-m",
                    "benchmarks.bench_segment",
                    "--mode",
                    mode,
                    "--images",
                    str(args.images),
                    "--batch-size",
                    str(args.batch_size),
                    "--out",
                    f"{tmp}/{mode}",
                ]
                if args.weights:
                    cmd += ["--weights", args.weights]
                runs[mode].append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
            same &= all(
                identical(Path(tmp, "naive", "results.npz"), Path(tmp, mode, "results.npz"))
                for mode in ("naive-tuned", "pipelined")
            )
    rows = {mode: _median_run(r) for mode, r in runs.items()}
    print(f"median of {args.repeat} interleaved runs per mode; {torch.get_num_threads()} CPU threads")
    print(f"{'mode':<12} {'images':>6} {'seconds':>8} {'img/s':>7} {'CPU s/img':>10} {'peak RSS MiB':>13}")
    for r in rows.values():
        print(
            f"{r['mode']:<12} {r['images']:>6} {r['seconds']:>8.1f} {r['images_per_second']:>7.2f} "
            f"{r['cpu_seconds_per_image']:>10.2f} {r['peak_rss_mib']:>13.0f}"
        )
    speed = {mode: r["images_per_second"] for mode, r in rows.items()}
    print(
        f"throughput ratio pipelined/naive: {speed['pipelined'] / speed['naive']:.2f}x "
        f"(allocator alone: {speed['naive-tuned'] / speed['naive']:.2f}x, "
        f"fast kernels and parallel images on top: {speed['pipelined'] / speed['naive-tuned']:.2f}x); "
        f"outputs identical: {same}"
    )


def _median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda r: r["images_per_second"])[len(runs) // 2]


if __name__ == "__main__":
    main()
