"""From model landmarks to CheXmask outputs: pixels, masks, RLE, original resolution.

Conventions follow SPEC 9.3-9.5: landmarks are (x, y) = (column, row), rounded
half-to-even like numpy; each organ is a filled OpenCV polygon; RLE is
row-major, 1-based "start length" pairs of the 255 pixels.
"""

from __future__ import annotations

import sys

import cv2
import numpy as np

from chexmask.anatomy import FRAME, ORGAN_ROWS
from chexmask.worker.preprocess import Padding

OVERLAY_JPEG_QUALITY = 90
# BGR fill colours of the overlay, and how much of the X-ray shows through.
_OVERLAY_COLOURS: dict[str, tuple[int, int, int]] = {
    "RL": (230, 120, 30),  # blue
    "LL": (40, 190, 40),  # green
    "H": (40, 40, 220),  # red
}
_OVERLAY_ALPHA = 0.35


def landmarks_to_pixels(landmarks01: np.ndarray, size: int = FRAME) -> np.ndarray:
    """Model output in [0, 1] units to integer pixels of the ``size`` frame."""
    return np.round(np.asarray(landmarks01) * size).astype(np.int64)


def _polygon(points: np.ndarray) -> np.ndarray:
    # OpenCV takes contours as int32 (N, 1, 2) arrays.
    return np.asarray(points, dtype=np.int32).reshape(-1, 1, 2)


def organ_masks(points: np.ndarray, height: int, width: int) -> dict[str, np.ndarray]:
    """One filled uint8 0/255 mask per organ, on a height x width canvas.

    Points outside the canvas are clipped by the rasteriser; self-intersecting
    polygons get OpenCV's fill rule, exactly as the official scripts (SPEC 9.3).
    """
    points = np.asarray(points)
    masks = {}
    for organ, rows in ORGAN_ROWS.items():
        mask = np.zeros((height, width), np.uint8)
        cv2.drawContours(mask, [_polygon(points[rows])], -1, (255,), thickness=cv2.FILLED)
        masks[organ] = mask
    return masks


def combined_mask(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """The inference script's single mask: lungs 1, heart 2 drawn on top of them."""
    points = np.asarray(points)
    mask = np.zeros((height, width), np.uint8)
    for organ, value in (("RL", 1), ("LL", 1), ("H", 2)):
        cv2.drawContours(mask, [_polygon(points[ORGAN_ROWS[organ]])], -1, (value,), thickness=cv2.FILLED)
    return mask


def rle_encode(mask: np.ndarray) -> str:
    """Runs of 255 as "start length" pairs, row-major, start 1-based ('' if empty).

    Only exact 255 counts, as the official ``(mask / 255).astype(int)`` does.
    """
    inside = np.concatenate(([False], np.asarray(mask).ravel() == 255, [False]))
    pairs = np.flatnonzero(inside[1:] != inside[:-1])  # start, end, start, end...
    pairs[1::2] -= pairs[0::2]
    pairs[0::2] += 1
    return " ".join(map(str, pairs.tolist()))


def rle_decode(rle: str, height: int, width: int) -> np.ndarray:
    """Inverse of ``rle_encode``: a uint8 0/255 mask. '' decodes to an empty mask."""
    flat = np.zeros(height * width, np.uint8)
    values = np.asarray(rle.split(), dtype=np.int64)
    for start, length in zip(values[0::2], values[1::2], strict=True):
        flat[start - 1 : start - 1 + length] = 255
    return flat.reshape(height, width)


def to_original(landmarks1024: np.ndarray, padding: Padding, size: int = FRAME) -> np.ndarray:
    """Back-project 1024-frame landmarks onto the original image (integer pixels).

    This is back_mimic/back_vin with the true height and width (SPEC 9.4
    ``consistent_hw``): scale by the padded square's side, then undo the
    centring pad and the remove_padding crop. Nothing is clipped.
    """
    points = np.asarray(landmarks1024, dtype=np.float64) / size * padding.square_size
    points[:, 0] += padding.pad_left_rem - padding.pad_left
    points[:, 1] += padding.pad_top_rem - padding.pad_top
    return np.round(points).astype(np.int64)


def csv_landmarks_1024(points: np.ndarray) -> str:
    """The 1024-level CSV cell: "x0,y0,x1,y1,...", as how_we_saved_annotations.py writes it."""
    return ",".join(str(int(v)) for v in np.asarray(points).ravel())


def csv_landmarks_original(points: np.ndarray) -> str:
    """The original-resolution CSV cell: numpy's str() of the 120x2 int array.

    The options are pinned to numpy's defaults (and no summarising) so a
    print-option change elsewhere in the process cannot alter the text.
    """
    return np.array2string(np.asarray(points, dtype=np.int64), max_line_width=75, threshold=sys.maxsize, separator=" ")


def overlay_jpeg(image: np.ndarray, masks: dict[str, np.ndarray], landmarks: np.ndarray) -> bytes:
    """A JPEG for people: the grey X-ray, tinted organ fills, contours and landmark dots.

    JPEG rather than PNG: a 1024 overlay is ~120 KiB instead of ~1 MiB (it is stored
    for every image) and encodes 15x faster; the masks themselves stay lossless PNGs.

    ``image``, ``masks`` and ``landmarks`` must share one frame (1024 or original).
    """
    picture = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    tint = picture.copy()
    for organ, mask in masks.items():
        tint[mask == 255] = _OVERLAY_COLOURS[organ]
    picture = cv2.addWeighted(tint, _OVERLAY_ALPHA, picture, 1 - _OVERLAY_ALPHA, 0)
    # Lines and dots scale with the image so they stay visible on large originals.
    thickness = max(1, round(max(image.shape) / 512))
    landmarks = np.asarray(landmarks)
    for organ, rows in ORGAN_ROWS.items():
        colour = _OVERLAY_COLOURS[organ]
        cv2.polylines(picture, [_polygon(landmarks[rows])], True, colour, thickness, cv2.LINE_AA)
        for x, y in landmarks[rows]:
            cv2.circle(picture, (int(x), int(y)), 2 * thickness, (255, 255, 255), -1, cv2.LINE_AA)
    return _jpeg(picture)


def grey_jpeg(image: np.ndarray) -> bytes:
    """The plain grey X-ray as a JPEG: what the web app draws switchable organ layers over."""
    return _jpeg(image)


def _jpeg(picture: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, OVERLAY_JPEG_QUALITY])
    if not ok:
        raise ValueError("OpenCV could not encode the picture as JPEG")
    return encoded.tobytes()
