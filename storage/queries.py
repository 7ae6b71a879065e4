"""What a query asks for: filters, sort keys and the row each listing returns,
translated into SQL conditions over the segmentation and image tables."""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from chexmask.datasets import canonical
from chexmask.status import ImageStatus, QCStatus
from chexmask.storage.models import MaskComparison, Segmentation, SourceImage, as_utc


@dataclass(frozen=True)
class QueryFilters:
    """What to select. ``None`` means no constraint.

    ``id_pattern`` matches ``dataset_image_id``: with ``*``/``?`` it is a glob,
    with ``%`` an SQL LIKE pattern, otherwise an exact id. Matching is case
    sensitive on every backend. ``created_after`` (inclusive) and
    ``created_before`` (exclusive) bound the segmentation time; naive datetimes
    are taken as UTC. ``status`` is the image's.

    ``compare_to`` keeps segmentations that ``chexmask compare`` paired with that
    model's mask of the same image (stored comparisons); ``min_agreement_dice``
    and ``max_agreement_dice`` (inclusive, need ``compare_to``) bound their
    agreement: the lowest of the organs' Dice between the two masks.
    """

    dataset: str | None = None
    release: str | None = None
    model: str | None = None
    status: ImageStatus | None = None
    min_dice_mean: float | None = None
    max_dice_mean: float | None = None
    min_dice_max: float | None = None
    max_dice_max: float | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    id_pattern: str | None = None
    min_ctr: float | None = None
    max_ctr: float | None = None
    compare_to: str | None = None
    min_agreement_dice: float | None = None
    max_agreement_dice: float | None = None

    def __post_init__(self) -> None:
        if self.compare_to is None and (self.min_agreement_dice, self.max_agreement_dice) != (None, None):
            raise ValueError("an agreement Dice bound needs compare_to (the model compared with)")

    @property
    def segmentation_level(self) -> bool:
        """Whether any filter concerns segmentations rather than images."""
        image_fields = {"dataset", "release", "status", "id_pattern"}
        return any(getattr(self, f.name) is not None for f in fields(self) if f.name not in image_fields)


@dataclass(frozen=True)
class SegmentationSummary:
    """One row of a query: a segmentation with its image."""

    id: int
    image_id: int
    uri: str
    dataset: str
    release: str | None
    dataset_image_id: str | None
    status: ImageStatus
    model_version: str
    dice_rca_mean: float | None
    dice_rca_max: float | None
    qc_status: QCStatus
    height: int
    width: int
    created_at: datetime
    # the rest of the quality record: per organ (rl, ll, h), flags, and why QC was skipped or capped
    dice_rca_mean_rl: float | None = None
    dice_rca_mean_ll: float | None = None
    dice_rca_mean_h: float | None = None
    dice_rca_max_rl: float | None = None
    dice_rca_max_ll: float | None = None
    dice_rca_max_h: float | None = None
    qc_flags: list[str] | None = None
    qc_reason: str | None = None
    # measurements (worker/measure.py); None where not measured
    ctr: float | None = None
    right_lung_area_px: int | None = None
    left_lung_area_px: int | None = None
    heart_area_px: int | None = None
    heart_lung_area_ratio: float | None = None
    right_lung_area_mm2: float | None = None
    left_lung_area_mm2: float | None = None
    heart_area_mm2: float | None = None
    pixel_spacing_row_mm: float | None = None
    pixel_spacing_col_mm: float | None = None
    pixel_spacing_source: str | None = None
    # mean landmark standard deviation per organ (pixels, 1024 frame), when sampled
    uncertainty_rl: float | None = None
    uncertainty_ll: float | None = None
    uncertainty_h: float | None = None


# The measurement columns, in the order queries and the export's --measurements add them.
MEASUREMENT_COLUMNS = (
    Segmentation.ctr,
    Segmentation.right_lung_area_px,
    Segmentation.left_lung_area_px,
    Segmentation.heart_area_px,
    Segmentation.heart_lung_area_ratio,
    Segmentation.right_lung_area_mm2,
    Segmentation.left_lung_area_mm2,
    Segmentation.heart_area_mm2,
    Segmentation.pixel_spacing_row_mm,
    Segmentation.pixel_spacing_col_mm,
    Segmentation.pixel_spacing_source,
)

SUMMARY_COLUMNS = (
    Segmentation.id,
    Segmentation.image_id,
    SourceImage.uri,
    SourceImage.dataset,
    SourceImage.release,
    SourceImage.dataset_image_id,
    SourceImage.status,
    Segmentation.model_version,
    Segmentation.dice_rca_mean,
    Segmentation.dice_rca_max,
    Segmentation.qc_status,
    Segmentation.height,
    Segmentation.width,
    Segmentation.created_at,
    Segmentation.dice_rca_mean_rl,
    Segmentation.dice_rca_mean_ll,
    Segmentation.dice_rca_mean_h,
    Segmentation.dice_rca_max_rl,
    Segmentation.dice_rca_max_ll,
    Segmentation.dice_rca_max_h,
    Segmentation.qc_flags,
    Segmentation.qc_reason,
    *MEASUREMENT_COLUMNS,
    Segmentation.uncertainty_rl,
    Segmentation.uncertainty_ll,
    Segmentation.uncertainty_h,
)

SORT_KEYS: dict[str, Any] = {
    "id": Segmentation.id,
    "created_at": Segmentation.created_at,
    "dice_rca_mean": Segmentation.dice_rca_mean,
    "dice_rca_max": Segmentation.dice_rca_max,
    "dataset_image_id": SourceImage.dataset_image_id,
}


def image_conditions(filters: QueryFilters) -> list[Any]:
    conditions: list[Any] = []
    if filters.dataset is not None:
        conditions.append(SourceImage.dataset == canonical(filters.dataset))
    if filters.release is not None:
        conditions.append(SourceImage.release == filters.release)
    if filters.status is not None:
        conditions.append(SourceImage.status == ImageStatus(filters.status))
    if filters.id_pattern is not None:
        conditions.append(_id_condition(filters.id_pattern))
    return conditions


def _id_condition(pattern: str) -> Any:
    column = SourceImage.dataset_image_id
    if "*" in pattern or "?" in pattern:
        escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        return column.like(escaped.replace("*", "%").replace("?", "_"), escape="\\")
    if "%" in pattern:
        return column.like(pattern)
    # Ids often contain "_"; without "%" a pattern is an exact id, not a LIKE.
    return column == pattern


def segmentation_conditions(filters: QueryFilters) -> list[Any]:
    conditions: list[Any] = []
    if filters.model is not None:
        conditions.append(Segmentation.model_version == filters.model)
    if filters.min_dice_mean is not None:
        conditions.append(Segmentation.dice_rca_mean >= filters.min_dice_mean)
    if filters.max_dice_mean is not None:
        conditions.append(Segmentation.dice_rca_mean <= filters.max_dice_mean)
    if filters.min_dice_max is not None:
        conditions.append(Segmentation.dice_rca_max >= filters.min_dice_max)
    if filters.max_dice_max is not None:
        conditions.append(Segmentation.dice_rca_max <= filters.max_dice_max)
    if filters.min_ctr is not None:
        conditions.append(Segmentation.ctr >= filters.min_ctr)
    if filters.max_ctr is not None:
        conditions.append(Segmentation.ctr <= filters.max_ctr)
    if filters.created_after is not None:
        conditions.append(Segmentation.created_at >= as_utc(filters.created_after))
    if filters.created_before is not None:
        conditions.append(Segmentation.created_at < as_utc(filters.created_before))
    if filters.compare_to is not None:
        conditions.append(_agreement_condition(filters))
    return conditions


def _agreement_condition(filters: QueryFilters) -> Any:
    """Some stored comparison with a mask of ``compare_to`` within the agreement bounds."""
    bounds = [MaskComparison.segmentation_id == Segmentation.id, MaskComparison.other_model == filters.compare_to]
    if filters.min_agreement_dice is not None:
        bounds.append(MaskComparison.dice_min >= filters.min_agreement_dice)
    if filters.max_agreement_dice is not None:
        bounds.append(MaskComparison.dice_min <= filters.max_agreement_dice)
    return sa.exists().where(*bounds)


def order_by(sort: str) -> list[Any]:
    descending = sort.startswith("-")
    key = sort.removeprefix("-")
    if key not in SORT_KEYS:
        raise ValueError(f"cannot sort by {key!r}; choose from {', '.join(SORT_KEYS)}")
    column = SORT_KEYS[key]
    if descending:
        order = [column.desc().nulls_last(), Segmentation.id.desc()]
    else:
        order = [column.asc().nulls_first(), Segmentation.id.asc()]
    return order[1:] if key == "id" else order
