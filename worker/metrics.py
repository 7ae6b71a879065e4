"""Agreement between two landmark sets: Dice of the rasterised organs (as the
HybridGNet papers evaluate), Hausdorff distance and mean landmark error, in pixels."""

from __future__ import annotations

import cv2
import numpy as np
from scipy.spatial.distance import directed_hausdorff

from chexmask.anatomy import FRAME, ORGAN_ROWS


def fill(points: np.ndarray, size: int = FRAME) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    cv2.drawContours(mask, [np.round(points).astype(np.int32).reshape(-1, 1, 2)], -1, (1,), -1)
    return mask.astype(bool)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def landmark_scores(pred: np.ndarray, true: np.ndarray, size: int = FRAME) -> dict[str, float]:
    """pred, true: [120,2] pixel coordinates in the same frame."""
    masks = {k: (fill(pred[s], size), fill(true[s], size)) for k, s in ORGAN_ROWS.items()}
    lungs = (masks["RL"][0] | masks["LL"][0], masks["RL"][1] | masks["LL"][1])
    scores = {
        "dice_lungs": dice(*lungs),
        "dice_heart": dice(*masks["H"]),
        "dice_rl": dice(*masks["RL"]),
        "dice_ll": dice(*masks["LL"]),
        "landmark_error_px": float(np.linalg.norm(pred - true, axis=1).mean()),
    }
    for k, s in ORGAN_ROWS.items():
        scores[f"hausdorff_{k.lower()}_px"] = float(
            max(directed_hausdorff(pred[s], true[s])[0], directed_hausdorff(true[s], pred[s])[0])
        )
    return scores
