"""Measurements of one segmentation: cardiothoracic ratio, organ areas, their ratio.

Everything is measured in the image's original frame (``landmarks_original``, the
original-resolution masks), so a pixel is a pixel of the source image.

Definitions (README "Measurements"):

* **Heart width**: the widest horizontal extent of the heart contour, max x - min x
  over its 26 landmarks.
* **Thoracic width**: the widest inner thoracic extent, the horizontal distance
  between the lateral lung borders: the largest x of the left-lung contour (image
  right) minus the smallest x of the right-lung contour (image left). Each border is
  taken at its own widest point, not on one common row, as a reader does who places
  the two calipers at the widest inner rib margins; the lungs' lateral contour
  follows the inner rib margin.
* **CTR** = heart width / thoracic width (None when the thoracic width is not
  positive, an unusable contour).
* **Areas**: the pixels of each organ's filled mask at the original resolution (the
  masks the RLE columns hold, OpenCV's polygon fill of the contour, SPEC 9.3), in
  pixels, and in mm^2 when the pixel spacing is known (pixels x row spacing x column
  spacing). The two lungs' masks never overlap in practice; their areas are summed.
* **Heart/lung area ratio** = heart area / (right lung area + left lung area).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from chexmask.anatomy import ORGAN_NAMES, ORGAN_ROWS
from chexmask.worker.postprocess import organ_masks


@dataclass(frozen=True)
class PixelSpacing:
    """Millimetres between the centres of adjacent rows and columns, and the DICOM
    attribute they came from (``PixelSpacing``, ``ImagerPixelSpacing``, ...)."""

    row_mm: float
    column_mm: float
    source: str

    @property
    def pixel_area_mm2(self) -> float:
        return self.row_mm * self.column_mm


@dataclass(frozen=True)
class Measurements:
    """The index columns of one segmentation's measurements (names as in the index)."""

    ctr: float | None
    right_lung_area_px: int
    left_lung_area_px: int
    heart_area_px: int
    heart_lung_area_ratio: float | None
    right_lung_area_mm2: float | None = None
    left_lung_area_mm2: float | None = None
    heart_area_mm2: float | None = None
    pixel_spacing_row_mm: float | None = None
    pixel_spacing_col_mm: float | None = None
    pixel_spacing_source: str | None = None

    def columns(self) -> dict[str, Any]:
        return asdict(self)


def heart_width(landmarks: np.ndarray) -> float:
    """Max x - min x of the heart contour (pixels)."""
    xs = np.asarray(landmarks, dtype=np.float64)[ORGAN_ROWS["H"], 0]
    return float(xs.max() - xs.min())


def thoracic_width(landmarks: np.ndarray) -> float:
    """Max x of the left-lung contour - min x of the right-lung contour (pixels)."""
    points = np.asarray(landmarks, dtype=np.float64)
    return float(points[ORGAN_ROWS["LL"], 0].max() - points[ORGAN_ROWS["RL"], 0].min())


def cardiothoracic_ratio(landmarks: np.ndarray) -> float | None:
    """Heart width over thoracic width; None when the thorax has no positive width."""
    thorax = thoracic_width(landmarks)
    return heart_width(landmarks) / thorax if thorax > 0 else None


def mask_areas(masks: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Pixels of each organ's 0/255 mask, by organ code (RL, LL, H); only 255 counts, as in the RLE."""
    return {organ: int(np.count_nonzero(np.asarray(mask) == 255)) for organ, mask in masks.items()}


def measure(
    landmarks_original: np.ndarray, masks_original: Mapping[str, np.ndarray], spacing: PixelSpacing | None
) -> Measurements:
    """The measurements of a segmentation from its original-frame landmarks and masks."""
    areas = mask_areas(masks_original)
    lungs = areas["RL"] + areas["LL"]
    in_mm2: dict[str, Any] = {}
    if spacing is not None:
        in_mm2 = {f"{ORGAN_NAMES[o]}_area_mm2": areas[o] * spacing.pixel_area_mm2 for o in ORGAN_ROWS}
        in_mm2.update(
            pixel_spacing_row_mm=spacing.row_mm,
            pixel_spacing_col_mm=spacing.column_mm,
            pixel_spacing_source=spacing.source,
        )
    return Measurements(
        ctr=cardiothoracic_ratio(landmarks_original),
        right_lung_area_px=areas["RL"],
        left_lung_area_px=areas["LL"],
        heart_area_px=areas["H"],
        heart_lung_area_ratio=areas["H"] / lungs if lungs else None,
        **in_mm2,
    )


def measure_landmarks(
    landmarks_original: np.ndarray, height: int, width: int, spacing: PixelSpacing | None = None
) -> Measurements:
    """``measure`` for a row that has landmarks only (an imported segmentation): the
    masks are drawn from the landmarks first, exactly as the pipeline draws them."""
    points = np.asarray(landmarks_original)
    return measure(points, organ_masks(points, height, width), spacing)


def spacing_of(source: Mapping[str, Any]) -> PixelSpacing | None:
    """The spacing the decoder chose (its provenance's ``pixel_spacing_mm`` and
    ``pixel_spacing_source``), or None for an image without one (PNG, JPEG, ...)."""
    value = source.get("pixel_spacing_mm")
    if not value:
        return None
    row_mm, column_mm = value
    return PixelSpacing(float(row_mm), float(column_mm), str(source["pixel_spacing_source"]))
