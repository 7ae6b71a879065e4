"""Throughput of ``chexmask serve`` against ``chexmask segment`` on the same images.

``segment``: the pipelined folder run (``Segmenter.run`` writing files), timed
from the first read to the last file written, in the main thread as the command
runs it, and again in a worker thread (serve infers in one; on some CPUs torch
runs faster there, which would flatter serve). ``serve``: a running server
(model loaded, folder watched); N images are dropped into its inbox at once and
timed until the index has all of them final. All exclude process start and model
load, and run one after the other in this invocation on the same distinct images
(serve would reuse results for repeated content). Prints the images per second
of each and serve's overhead against the like-for-like (threaded) run; target:
at most 15%.

Usage: ``python -m benchmarks.bench_serve [--images N] [--weights FILE|random]``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from chexmask.config import Settings


def distinct_images(count: int | None) -> list[Path]:
    """The benchmark's mixed real images, without repeated content."""
    from benchmarks.bench_segment import bench_images

    seen, images = set(), []
    for path in bench_images(64):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            images.append(path)
    return images[:count] if count else images


def time_segment(images: list[Path], weights: str, out: Path, batch_size: int) -> float:
    """What ``chexmask segment`` does, after the model is loaded."""
    from chexmask.worker.pipeline import Segmenter, write_outputs
    from chexmask.worker.weights import load

    model, info = load(weights, Settings.from_env(), "cpu")
    out.mkdir(parents=True, exist_ok=True)
    segmenter = Segmenter(model, info, batch_size)
    started = time.perf_counter()
    for _ in segmenter.run([(p.name, p.read_bytes) for p in images], finish=lambda o: write_outputs(o, out)):
        pass
    return time.perf_counter() - started


def _timed_into(times: list[float], *args: object) -> None:
    times.append(time_segment(*args))  # type: ignore[arg-type]


def time_serve(images: list[Path], env: dict[str, str], home: Path) -> float:
    """Seconds from dropping the images into a running ``chexmask serve`` until all are indexed."""
    from chexmask.storage.index import MaskIndex

    inbox = home / "inbox"
    home.mkdir(parents=True, exist_ok=True)
    log = (home / "serve.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "chexmask.app.cli", "serve", "--inbox", str(inbox)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait(lambda: "watching" in (home / "serve.log").read_text() or server.poll() is not None, 600)
        if server.poll() is not None:
            sys.exit(f"serve exited early:\n{(home / 'serve.log').read_text()}")
        started = time.perf_counter()
        for path in images:  # as a copy tool would: write aside, then rename into place
            tmp = inbox / f".{path.name}.part"
            tmp.write_bytes(path.read_bytes())
            tmp.rename(inbox / path.name)
        index = MaskIndex(f"sqlite:///{home / 'index.db'}")
        _wait(lambda: _final(index) >= len(images), 3600)
        seconds = time.perf_counter() - started
        index.close()
        return seconds
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(120)
        log.close()


def _final(index) -> int:
    return sum(1 for image in index.images(limit=10_000) if image.status.final)


def _wait(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark step timed out")
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, help="number of distinct images (default: all of the set)")
    parser.add_argument("--weights", help="checkpoint (default: CHEXMASK_WEIGHTS or bundled); 'random' for untrained")
    parser.add_argument("--batch-size", type=int, default=Settings.from_env().batch_size)
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="rounds; each run's best time counts (the least disturbed by other load on the machine)",
    )
    args = parser.parse_args()
    images = distinct_images(args.images)
    rows: dict[str, list[float]] = {"segment": [], "segment (model in a thread)": [], "serve": []}
    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights
        if weights == "random":
            import torch

            from chexmask.worker.model import HybridGNet

            torch.manual_seed(0)
            weights = f"{tmp}/random.pt"
            torch.save(HybridGNet().state_dict(), weights)
        weights = weights or Settings.from_env().weights
        env = {**os.environ, "CHEXMASK_BATCH_SIZE": str(args.batch_size), "CHEXMASK_DEVICE": "cpu"}
        env.pop("CHEXMASK_DATABASE_URL", None)
        env.pop("CHEXMASK_STORE_URL", None)
        if weights:
            env["CHEXMASK_WEIGHTS"] = weights
        for round_ in range(args.repeat):  # interleaved, so a burst of other load hits all alike
            out = Path(tmp, f"round{round_}")
            rows["segment"].append(time_segment(images, weights, out / "segment", args.batch_size))
            threaded: list[float] = []
            thread = threading.Thread(
                target=_timed_into, args=(threaded, images, weights, out / "segment-thread", args.batch_size)
            )
            thread.start()
            thread.join()
            rows["segment (model in a thread)"].append(threaded[0])
            home = out / "serve"
            rows["serve"].append(time_serve(images, {**env, "CHEXMASK_HOME": str(home)}, home))
    n = len(images)
    best = {name: min(times) for name, times in rows.items()}
    print(f"{'run':<28} {'images':>6} {'best s':>7} {'img/s':>6}  all runs (s)")
    for name, times in rows.items():
        print(f"{name:<28} {n:>6} {best[name]:>7.1f} {n / best[name]:>6.2f}  {' '.join(f'{t:.1f}' for t in times)}")
    like_for_like = best["serve"] / best["segment (model in a thread)"] - 1
    print(
        f"serve overhead: {like_for_like:+.1%} against segment with the model in a thread "
        f"({best['serve'] / best['segment'] - 1:+.1%} against segment as run); target <= +15%"
    )


if __name__ == "__main__":
    main()
