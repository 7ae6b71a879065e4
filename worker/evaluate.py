"""Evaluate weights on landmark-annotated images: Dice of the rasterised organs,
Hausdorff distance and landmark error, per image and on average; with ``ood`` on the
out-of-distribution versions of the images (``worker.augment.CONDITIONS``), per condition."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from chexmask.anatomy import FRAME
from chexmask.worker.augment import CONDITIONS
from chexmask.worker.metrics import landmark_scores
from chexmask.worker.model import HybridGNet, segment_batch
from chexmask.worker.reframe import Framing, segment_reframed
from chexmask.worker.train import list_ids, load_landmarks, ood_cases


def evaluate(
    model: HybridGNet,
    images: Path,
    landmarks: Path,
    ids: list[str] | None = None,
    ood: bool = False,
    framing: Framing | None = None,
) -> tuple[list[dict], dict]:
    """Per-image score rows and their means. ``ids`` defaults to every annotated image;
    with ``framing`` images the model did not understand are re-framed (``worker.reframe``).
    With ``ood`` every image is scored under every OOD condition instead, and the
    summary has the means per condition and over all of them (``ood``)."""
    ids = ids or list_ids(images, landmarks)
    if ood:
        cases = ood_cases(images, landmarks, ids)
        total = len(ids) * len(CONDITIONS)
    else:
        cases = (
            ("", i, cv2.imread(str(images / f"{i}.png"), cv2.IMREAD_GRAYSCALE), load_landmarks(landmarks, i))
            for i in ids
        )
        total = len(ids)
    rows = []
    for condition, image_id, image, true in tqdm(cases, total=total, desc="evaluate", unit="image"):
        if framing is None:
            predicted, _ = segment_batch(model, image[None])
        else:
            predicted = segment_reframed(model, image[None], framing)[0]
        row = {"condition": condition} if ood else {}
        rows.append({**row, "image_id": image_id, **landmark_scores(predicted[0] * FRAME, true)})
    summary: dict = {"images": len(ids), **means(rows)}
    if ood:
        summary = {"images": len(ids), "ood": means(rows)}
        summary.update({c: means([r for r in rows if r["condition"] == c]) for c in CONDITIONS})
    return rows, summary


def means(rows: list[dict]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k not in ("image_id", "condition")}


def condition_table(summary: dict) -> str:
    """The per-condition Dice of an OOD summary as a Markdown table (the model card's)."""
    lines = ["| condition | Dice lungs | Dice heart |", "|---|---|---|"]
    for condition in (*CONDITIONS, "ood"):
        s = summary[condition]
        name = "**all conditions**" if condition == "ood" else condition
        lines.append(f"| {name} | {s['dice_lungs']:.3f} | {s['dice_heart']:.3f} |")
    return "\n".join(lines)


def write_report(rows: list[dict], summary: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    with open(out / "per_image.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
