"""Fit the re-framing reference of the bundled weights (``worker/reframe.py``) and
store it in chexmask/weights/manifest.json under "framing".

    python scripts/fit_framing.py --jsrt ../shared/data/jsrt

Training images only (the manifest's validation ids are left out): the median box of
their true landmarks, and the mean, spread and 99th percentile distance of the
latents the weights give them. Nothing is tuned on the validation images.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from chexmask.config import Settings
from chexmask.worker.model import segment_batch
from chexmask.worker.reframe import THRESHOLD_PERCENTILE, Framing
from chexmask.worker.train import list_ids, load_landmarks
from chexmask.worker.weights import load_model, resolve_weights

WEIGHTS = Path(__file__).resolve().parents[1] / "chexmask" / "weights"


def main(jsrt: Path) -> None:
    torch.set_num_threads(2)
    started = time.perf_counter()
    images, landmarks = jsrt / "images", jsrt / "landmarks"
    manifest = json.loads((WEIGHTS / "manifest.json").read_text())
    train = sorted(set(list_ids(images, landmarks)) - set(manifest["validation_ids"]))
    path, _ = resolve_weights(None, Settings(reframe=False))
    model = load_model(path)
    latents = [
        segment_batch(model, cv2.imread(str(images / f"{i}.png"), cv2.IMREAD_GRAYSCALE)[None])[1][0]
        for i in tqdm(train, desc="latents", unit="image")
    ]
    points = np.stack([load_landmarks(landmarks, i) for i in train])
    framing = Framing.fit(points, np.stack(latents))
    manifest["framing"] = {
        **framing.to_json(),
        "fit": f"{len(train)} training images; threshold = their {THRESHOLD_PERCENTILE}th percentile latent distance",
        "command": "python scripts/fit_framing.py --jsrt ../shared/data/jsrt",
    }
    (WEIGHTS / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"box {framing.box}, threshold {framing.threshold:.3f} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jsrt", type=Path, default=Path("../shared/data/jsrt"))
    main(parser.parse_args().jsrt)
