"""What a query asks for: filters, sort keys and the row each listing returns,
translated into SQL conditions over the segmentation and image tables."""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Annotated, Any

import sqlalchemy as sa
from pydantic import Field
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import aliased

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
    model's mask of the same image (stored comparisons); ``min_agreement_dice`` and
    ``max_agreement_dice`` (inclusive, need ``compare_to``) bound their agreement:
    the lowest of the organs' Dice between the two masks.
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


def compared(description: str) -> Any:
    """The schema's description of a field filled only when a listing names a model to compare to."""
    return Field(description=f"With compare_to, else null: {description}.")


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
    # With compare_to: the stored comparison with that model's mask of the same image
    # (AGREEMENT_COLUMNS); None without compare_to.
    other_model: Annotated[str | None, compared("the model compared with (compare_to)")] = None
    other_segmentation_id: Annotated[int | None, compared("id of that model's segmentation of the same image")] = None
    other_dice_rca_mean: Annotated[float | None, compared("that segmentation's Dice RCA (Mean)")] = None
    other_dice_rca_max: Annotated[float | None, compared("that segmentation's Dice RCA (Max)")] = None
    agreement_dice: Annotated[
        float | None, compared("the agreement: the lowest of the three organs' Dice between the two masks")
    ] = None
    agreement_dice_rl: Annotated[float | None, compared("Dice between the two right lung masks")] = None
    agreement_dice_ll: Annotated[float | None, compared("Dice between the two left lung masks")] = None
    agreement_dice_h: Annotated[float | None, compared("Dice between the two heart masks")] = None
    agreement_hausdorff_rl: Annotated[
        float | None,
        compared("right lung Hausdorff distance, pixels of agreement_frame (null: one mask empty)"),
    ] = None
    agreement_hausdorff_ll: Annotated[
        float | None,
        compared("left lung Hausdorff distance, pixels of agreement_frame (null: one mask empty)"),
    ] = None
    agreement_hausdorff_h: Annotated[
        float | None,
        compared("heart Hausdorff distance, pixels of agreement_frame (null: one mask empty)"),
    ] = None
    agreement_frame: Annotated[str | None, compared("where the masks were compared: original or 1024")] = None
    compared_at: Annotated[datetime | None, compared("when `chexmask compare` stored this result")] = None


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

# The comparison a listing with compare_to joins (``agreement_on``), and the other model's mask.
AGREEMENT = aliased(MaskComparison, name="agreement")
OTHER_SEGMENTATION = aliased(Segmentation, name="other_segmentation")

AGREEMENT_COLUMNS = (
    AGREEMENT.other_model.label("other_model"),
    AGREEMENT.other_segmentation_id.label("other_segmentation_id"),
    OTHER_SEGMENTATION.dice_rca_mean.label("other_dice_rca_mean"),
    OTHER_SEGMENTATION.dice_rca_max.label("other_dice_rca_max"),
    AGREEMENT.dice_min.label("agreement_dice"),
    AGREEMENT.dice_right_lung.label("agreement_dice_rl"),
    AGREEMENT.dice_left_lung.label("agreement_dice_ll"),
    AGREEMENT.dice_heart.label("agreement_dice_h"),
    AGREEMENT.hausdorff_right_lung.label("agreement_hausdorff_rl"),
    AGREEMENT.hausdorff_left_lung.label("agreement_hausdorff_ll"),
    AGREEMENT.hausdorff_heart.label("agreement_hausdorff_h"),
    AGREEMENT.frame.label("agreement_frame"),
    AGREEMENT.created_at.label("compared_at"),
)
AGREEMENT_FIELDS = tuple(column.key for column in AGREEMENT_COLUMNS)

SORT_KEYS: dict[str, Any] = {
    "id": Segmentation.id,
    "created_at": Segmentation.created_at,
    "dice_rca_mean": Segmentation.dice_rca_mean,
    "dice_rca_max": Segmentation.dice_rca_max,
    "dataset_image_id": SourceImage.dataset_image_id,
}


def one_of(column: Any, values: list[str], dialect: str) -> Any:
    """``column IN values``. On PostgreSQL as ``= ANY`` of one array parameter: binding
    and planning a list of 500 parameters took 10 times as long as its index lookups."""
    if dialect == "postgresql":
        return column == sa.any_(sa.literal(values, ARRAY(sa.String)))
    return column.in_(values)


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
    return conditions


def agreement_on(filters: QueryFilters, by_model_index: bool = True) -> Any:
    """The join condition of ``AGREEMENT``: each segmentation's comparison with
    ``compare_to``'s mask of its image (one at most, migration 0009), kept when within
    the agreement bounds.

    An index join either way round: from the comparison's (other_model, dice_min)
    index to the segmentations' primary key, or from a segmentation to its
    comparison by the unique (segmentation_id, other_model) index.
    ``by_model_index=False`` makes the same tests in a form the first index cannot
    serve, leaving the database the second way only (see ``browse``).
    """
    other_model, dice = AGREEMENT.other_model, AGREEMENT.dice_min
    if not by_model_index:
        other_model, dice = other_model + "", dice + 0
    conditions = [AGREEMENT.segmentation_id == Segmentation.id, other_model == filters.compare_to]
    if filters.min_agreement_dice is not None:
        conditions.append(dice >= filters.min_agreement_dice)
    if filters.max_agreement_dice is not None:
        conditions.append(dice <= filters.max_agreement_dice)
    return sa.and_(*conditions)


def with_agreement(statement: sa.Select) -> sa.Select:
    """``statement`` (``select_segmentations`` with compare_to) with AGREEMENT_COLUMNS added."""
    return statement.add_columns(*AGREEMENT_COLUMNS).outerjoin(
        OTHER_SEGMENTATION, OTHER_SEGMENTATION.id == AGREEMENT.other_segmentation_id
    )


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
