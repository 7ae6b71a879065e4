"""Evaluate weights on landmark-annotated images: Dice of the rasterised organs,
Hausdorff distance and landmark error, per image and on average."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from chexmask.anatomy import FRAME
from chexmask.worker.metrics import landmark_scores
from chexmask.worker.model import HybridGNet, segment_batch
from chexmask.worker.train import list_ids, load_landmarks


def evaluate(
    model: HybridGNet, images: Path, landmarks: Path, ids: list[str] | None = None, batch_size: int = 4
) -> tuple[list[dict], dict]:
    """Per-image score rows and their means. ``ids`` defaults to every annotated image."""
    ids = ids or list_ids(images, landmarks)
    rows = []
    for start in tqdm(range(0, len(ids), batch_size), desc="evaluate", unit="batch"):
        chunk = ids[start : start + batch_size]
        batch = np.stack([cv2.imread(str(images / f"{i}.png"), cv2.IMREAD_GRAYSCALE) for i in chunk])
        predicted, _ = segment_batch(model, batch)
        for image_id, pred in zip(chunk, predicted, strict=True):
            rows.append({"image_id": image_id, **landmark_scores(pred * FRAME, load_landmarks(landmarks, image_id))})
    means = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "image_id"}
    return rows, {"images": len(rows), **means}


def write_report(rows: list[dict], summary: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    with open(out / "per_image.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
