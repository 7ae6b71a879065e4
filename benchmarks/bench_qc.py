"""QC cost against segmentation in ``serve``, and the QC validation, in one run.

Cost: the same distinct real images (``bench_serve.distinct_images``)
go through an in-process ``serve`` twice, each time with a fresh index and
store: with QC switched off (``CHEXMASK_QC_BANK=none``), then with the bundled
bank. Both runs exclude the model load; the process CPU time (all threads) of
the first, per image, is the segmentation's cost from decoding to the stored
result, and the difference of the two is QC's. Target: ratio at most 1.0.

Validation: ``chexmask qc validate --folds 4`` with the bundled bank's references
on the default model's 20 held-out JSRT images (``validation_ids``; needs
../shared/data/jsrt). The bundled calibration was fitted on these images' cases
(the only ones the model never trained on), so the benchmark calibrates each
image with a map fitted on the other 15 images' cases, not in-sample. Targets
on the model's masks of clean and degraded images: Pearson >= 0.92, MAE <= 0.035;
inverted images flagged (>= 9 in 12) or estimated within 0.05.

Usage: ``python benchmarks/bench_qc.py [--images N] [--jsrt DIR] [--out DIR]`` (``make bench-qc``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.bench_serve import distinct_images
from chexmask.config import Settings

FOLDS = 4


def serve_cpu_seconds(images: list[Path], root: Path, qc_bank: str | None) -> float:
    """Process CPU seconds of serving the images once (model already loaded)."""
    from chexmask.app.serve import Server

    inbox = root / "inbox"
    inbox.mkdir(parents=True)
    for path in images:
        shutil.copyfile(path, inbox / path.name)
    os.environ["CHEXMASK_HOME"] = str(root / "home")
    os.environ.pop("CHEXMASK_DATABASE_URL", None)
    os.environ.pop("CHEXMASK_STORE_URL", None)
    if qc_bank is None:
        os.environ.pop("CHEXMASK_QC_BANK", None)
    else:
        os.environ["CHEXMASK_QC_BANK"] = qc_bank
    server = Server(Settings.from_env(), inbox, settle=0)
    try:
        server.start()
        started = time.process_time()
        server.run_once()
        seconds = time.process_time() - started
        assert server.tally.counts.get("segmented") == len(images), server.tally.counts
    finally:
        server.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16, help="distinct real images served per run")
    parser.add_argument("--jsrt", type=Path, default=Path("../shared/data/jsrt"))
    parser.add_argument("--out", type=Path, default=Path(".chexmask/bench-qc"))
    args = parser.parse_args()

    images = distinct_images(args.images)
    with tempfile.TemporaryDirectory() as tmp:
        serve_cpu_seconds(images[:2], Path(tmp) / "warm-up", None)  # first-call allocations
        segmentation = serve_cpu_seconds(images, Path(tmp) / "off", "none") / len(images)
        with_qc = serve_cpu_seconds(images, Path(tmp) / "on", None) / len(images)
    qc = with_qc - segmentation
    print(
        f"serve, {len(images)} images, {os.cpu_count()} cores, CPU s per image: segmentation {segmentation:.3f}, "
        f"QC {qc:.3f}, ratio {qc / segmentation:.2f} (target <= 1.0)"
    )

    summary = validation(args.jsrt, args.out)
    if summary is None:
        print(f"validation skipped: no JSRT data at {args.jsrt}")
        return
    degraded, inverted = summary["image_degradations"], summary["inverted"]
    stats = degraded["dice_rca_max"]
    print(
        f"validation ({summary['calibration']}), {summary['images']} held-out images, the model's masks of clean and degraded images "
        f"({degraded['cases']} cases): Dice RCA (Max) Pearson {stats['pearson']:.3f} (target >= 0.92), "
        f"MAE {stats['mae']:.3f} (target <= 0.035), bias {stats['bias']:+.3f}"
    )
    for label, part in (("all cases", summary), ("true >= 0.5", summary["true_ge_0.5"])):
        s = part["dice_rca_max"]
        print(f"  {label} ({part['cases']}): Pearson {s['pearson']:.3f}, MAE {s['mae']:.3f}, bias {s['bias']:+.3f}")
    print(
        f"  inverted: {inverted['flagged']}/{inverted['n']} flagged, {inverted['within_0.05']}/{inverted['n']} "
        f"within 0.05 (target >= 3/4 flagged)"
    )
    for kind, row in summary["by_kind"].items():
        flags = ", ".join(f"{flag} {n}" for flag, n in row["flagged"].items() if n)
        print(
            f"  {kind:<13} n {row['n']:>3}  true {row['true']:.3f}  estimate {row['rca_max']:.3f}  "
            f"raw {row['raw_max']:.3f}  MAE {row['mae_max']:.3f}  {flags}"
        )
    print(
        f"  validation CPU s per image: segmentation forward {summary['seconds_per_image']['segmentation']:.3f}, "
        f"QC {summary['seconds_per_image']['qc']:.3f}; wrote {args.out}/summary.json, cases.csv, scatter.png"
    )


def validation(jsrt: Path, out: Path) -> dict | None:
    from chexmask.worker.bank import resolve
    from chexmask.worker.qc_commands import validate
    from chexmask.worker.weights import default_weights, load

    if not (jsrt / "images").is_dir():
        return None
    model, info = load(None, Settings.from_env(), "cpu")
    bank, _ = resolve(None, info.weights_sha256)
    ids = default_weights()[1]["validation_ids"]
    summary = validate(bank, model, jsrt / "images", jsrt / "landmarks", ids, out, folds=FOLDS)
    (out / "bench.json").write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
