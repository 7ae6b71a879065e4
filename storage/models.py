"""The index tables. The schema itself is created by the Alembic migrations in
``migrations/versions``; these classes must stay in step with them (a test
compares the two).
"""

from __future__ import annotations

from datetime import datetime, timezone
from enum import Enum
from typing import ClassVar

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from chexmask.anatomy import ORGANS
from chexmask.status import ImageStatus, PushStatus, QCStatus

# Named constraints and indexes, so later migrations can refer to them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Built NULLS FIRST on PostgreSQL by the migrations (so a missing Dice sorts lowest in
# both directions from one index); declared plainly here because autogenerate cannot
# express a per-dialect NULL order.
NULLS_FIRST_INDEXES = frozenset(
    {
        "ix_segmentation_dataset_dice_rca_mean",
        "ix_segmentation_model_version_dice_rca_mean",
        "ix_segmentation_dice_rca_mean",
        "ix_segmentation_created_at_covering",
    }
)


def include_in_autogenerate(obj: object, name: str | None, type_: str, reflected: bool, compare_to: object) -> bool:
    """Alembic ``include_object`` hook: leave the per-dialect NULLS FIRST indexes alone."""
    return not (type_ == "index" and name in NULLS_FIRST_INDEXES)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Timezone-aware UTC timestamps on every backend.

    SQLite keeps no offset, so values are normalised to UTC before writing and
    marked UTC again when read.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        return None if value is None else as_utc(value)

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        return None if value is None else as_utc(value)


def as_utc(value: datetime) -> datetime:
    """Aware datetimes converted to UTC; naive ones are taken to be UTC already."""
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def _enum(cls: type[Enum]) -> sa.Enum:
    # Stored as short strings (no native PG enum) so adding a status needs no type migration.
    return sa.Enum(
        cls,
        native_enum=False,
        create_constraint=False,
        length=16,
        values_callable=lambda members: [m.value for m in members],
        validate_strings=True,
    )


# Plain JSON text (PostgreSQL "json", not "jsonb"): nothing queries inside these values,
# and jsonb stores every number as NUMERIC, which made writing and reading the 240
# landmark coordinates of a row ~10x slower. The text stays exactly as written
# (compact, see index.py), which the export relies on.
JSONType = sa.JSON()

# Imported (published) segmentations, see chexmask_import: their images' URI scheme, and
# the pipeline_version values that say which frame such a row holds.
IMPORT_SCHEME = "chexmask:"
IMPORT_PIPELINE_ORIGINAL = "chexmask-import:original"
IMPORT_PIPELINE_1024 = "chexmask-import:1024"
IMPORT_PIPELINES = (IMPORT_PIPELINE_ORIGINAL, IMPORT_PIPELINE_1024)


class StorageModel(SQLModel):
    # Own metadata so tables defined by other subsystems never leak into these migrations.
    metadata: ClassVar[sa.MetaData] = sa.MetaData(naming_convention=NAMING_CONVENTION)


class ModelVersion(StorageModel, table=True):
    __tablename__ = "model_version"
    __table_args__ = (sa.UniqueConstraint("name"),)

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(sa_type=sa.String(128), nullable=False)
    weights_sha256: str = Field(sa_type=sa.String(64), nullable=False)
    description: str = Field(default="", sa_type=sa.Text, nullable=False)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, nullable=False)


class SourceImage(StorageModel, table=True):
    """One input image, identified by its URI; sha256 is filled once its bytes are read."""

    __tablename__ = "source_image"
    __table_args__ = (
        sa.UniqueConstraint("uri"),
        sa.Index("ix_source_image_sha256", "sha256"),
        sa.Index("ix_source_image_status_id", "status", "id"),
        sa.Index("ix_source_image_dataset_release", "dataset", "release"),
        sa.Index("ix_source_image_retry_at", "retry_at"),
        # pattern ops let PostgreSQL serve prefix LIKE from the index whatever the collation
        sa.Index(
            "ix_source_image_dataset_image_id",
            "dataset_image_id",
            postgresql_ops={"dataset_image_id": "varchar_pattern_ops"},
        ),
    )

    id: int | None = Field(default=None, primary_key=True)
    uri: str = Field(sa_type=sa.String(2048), nullable=False)
    etag_or_version: str | None = Field(default=None, sa_type=sa.String(256))
    sha256: str | None = Field(default=None, sa_type=sa.String(64))
    size: int | None = Field(default=None, sa_type=sa.BigInteger)
    dataset: str = Field(sa_type=sa.String(64), nullable=False)
    release: str | None = Field(default=None, sa_type=sa.String(64))
    dataset_image_id: str | None = Field(default=None, sa_type=sa.String(512))
    height: int | None = None
    width: int | None = None
    modality: str | None = Field(default=None, sa_type=sa.String(16))
    view_position: str | None = Field(default=None, sa_type=sa.String(16))
    first_seen: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, nullable=False)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, nullable=False)
    status: ImageStatus = Field(default=ImageStatus.QUEUED, sa_type=_enum(ImageStatus), nullable=False)
    refusal_code: str | None = Field(default=None, sa_type=sa.String(64))
    reason: str | None = Field(default=None, sa_type=sa.Text)
    attempts: int = Field(default=0, nullable=False)
    # Who holds the image while it is processing, and until when: a holder renews its
    # lease; one that expires (or whose process is gone) is taken over by a sweep.
    lease_owner: str | None = Field(default=None, sa_type=sa.String(128))
    lease_expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    # A failed image with a transient cause is tried again at retry_at, until it has
    # been failing for CHEXMASK_RETRY_FAILED_FOR (counted from failing_since).
    retry_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    failing_since: datetime | None = Field(default=None, sa_type=UTCDateTime)


class Segmentation(StorageModel, table=True):
    """One model's result for one image content (sha256): never two for the same pair.

    ``dataset`` repeats the image's dataset so that the common listing (a dataset,
    filtered and sorted by Dice) is served by one index on one table; it and
    ``is_current`` are kept in step with the image by ``MaskIndex``.
    RLE is kept at both resolutions so the CheXmask export of either is a plain
    streaming read, with no object-store fetch or re-rasterising per row.
    Small, often-read columns come first: SQLite reads a row front to back through
    its overflow pages, so columns after the large RLE texts cost far more.
    """

    __tablename__ = "segmentation"
    __table_args__ = (
        sa.UniqueConstraint("image_sha256", "model_version"),
        sa.Index("ix_segmentation_dataset_dice_rca_mean", "dataset", "dice_rca_mean"),
        sa.Index("ix_segmentation_dataset_id", "dataset", "id"),
        sa.Index("ix_segmentation_model_version_dice_rca_mean", "model_version", "dice_rca_mean"),
        sa.Index("ix_segmentation_dice_rca_mean", "dice_rca_mean"),
        sa.Index("ix_segmentation_image_id", "image_id"),
        # created_at first in the time sort's order, then every column the gallery's
        # segmentation filters test (migration 0005): a filtered page from the index alone.
        sa.Index(
            "ix_segmentation_created_at_covering",
            "created_at",
            "id",
            "is_current",
            "dataset",
            "model_version",
            "dice_rca_mean",
            "dice_rca_max",
        ),
        sa.Index("ix_segmentation_qc_status", "qc_status"),
        sa.Index("ix_segmentation_ctr", "ctr"),
    )

    id: int | None = Field(default=None, primary_key=True)
    image_id: int = Field(foreign_key="source_image.id", nullable=False)
    image_sha256: str = Field(sa_type=sa.String(64), nullable=False)
    dataset: str = Field(sa_type=sa.String(64), nullable=False)
    # Whether the image still has the bytes this was made from. A flag rather than a
    # sha256 comparison in the join: planners cannot estimate such a two-column join
    # and chose full scans for a page of 100.
    is_current: bool = Field(default=True, nullable=False)
    model_version: str = Field(foreign_key="model_version.name", sa_type=sa.String(128), nullable=False)
    weights_sha256: str = Field(sa_type=sa.String(64), nullable=False)
    pipeline_version: str = Field(sa_type=sa.String(32), nullable=False)
    height: int = Field(nullable=False)  # original resolution
    width: int = Field(nullable=False)
    dice_rca_max: float | None = None
    dice_rca_mean: float | None = None
    dice_rca_max_rl: float | None = None
    dice_rca_max_ll: float | None = None
    dice_rca_max_h: float | None = None
    dice_rca_mean_rl: float | None = None
    dice_rca_mean_ll: float | None = None
    dice_rca_mean_h: float | None = None
    qc_status: QCStatus = Field(default=QCStatus.PENDING, sa_type=_enum(QCStatus), nullable=False)
    qc_flags: list[str] | None = Field(default=None, sa_type=JSONType)
    qc_reason: str | None = Field(default=None, sa_type=sa.Text)  # why RCA was skipped or distrusted
    shape_outlier_score: float | None = None
    # Per-organ mean of the landmarks' standard deviation over latent samples (pixels of
    # the 1024 frame), and the sample count; NULL when uncertainty was not asked for.
    uncertainty_rl: float | None = None
    uncertainty_ll: float | None = None
    uncertainty_h: float | None = None
    uncertainty_samples: int | None = None
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, nullable=False)
    # The holder of a pending QC and until when (see SourceImage.lease_owner).
    qc_lease_owner: str | None = Field(default=None, sa_type=sa.String(128))
    qc_lease_expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    object_keys: dict[str, str] = Field(default_factory=dict, sa_type=JSONType, nullable=False)
    timings: dict[str, float] | None = Field(default=None, sa_type=JSONType)
    landmarks_1024: list[list[int]] = Field(sa_type=JSONType, nullable=False)
    landmarks_original: list[list[int]] = Field(sa_type=JSONType, nullable=False)
    # The same as numpy prints it, the original-resolution CSV form (layout.numpy_text):
    # made once here because formatting it per row took two thirds of an export.
    landmarks_original_str: str = Field(sa_type=sa.Text, nullable=False)
    latent: list[float] | None = Field(default=None, sa_type=JSONType)
    landmark_std: list[float] | None = Field(default=None, sa_type=JSONType)  # [120] pixels, 1024 frame
    rle_right_lung: str = Field(sa_type=sa.Text, nullable=False)
    rle_left_lung: str = Field(sa_type=sa.Text, nullable=False)
    rle_heart: str = Field(sa_type=sa.Text, nullable=False)
    rle_right_lung_1024: str = Field(sa_type=sa.Text, nullable=False)
    rle_left_lung_1024: str = Field(sa_type=sa.Text, nullable=False)
    rle_heart_1024: str = Field(sa_type=sa.Text, nullable=False)
    # Measurements (worker/measure.py; migration 0006 added them, so on SQLite they sit
    # after the RLE texts): NULL for rows made before it and for imported rows.
    ctr: float | None = None
    right_lung_area_px: int | None = None
    left_lung_area_px: int | None = None
    heart_area_px: int | None = None
    heart_lung_area_ratio: float | None = None
    right_lung_area_mm2: float | None = None
    left_lung_area_mm2: float | None = None
    heart_area_mm2: float | None = None
    # The source's pixel spacing the mm^2 areas use, and its DICOM attribute; NULL when
    # the image has none (PNG, JPEG, a DICOM without spacing).
    pixel_spacing_row_mm: float | None = None
    pixel_spacing_col_mm: float | None = None
    pixel_spacing_source: str | None = Field(default=None, sa_type=sa.String(32))

    def rle(self, resolution: str = "original") -> dict[str, str]:
        """The three RLE strings by organ, at ``original`` or ``1024`` resolution."""
        suffix = {"original": "", "1024": "_1024"}[resolution]
        return {organ: getattr(self, f"rle_{organ}{suffix}") for organ in ORGANS}


GRADE_COLUMNS = ("overall", *ORGANS)  # the 1-5 grades of a review


class Review(StorageModel, table=True):
    """One reviewer's grades of one segmentation: 5 = no correction needed, 1 = unusable.

    Several reviewers (and several rounds by one) may grade the same mask; the
    organ grades are optional, the overall one is not.
    """

    __tablename__ = "review"
    __table_args__ = (
        sa.Index("ix_review_segmentation_id", "segmentation_id"),
        # "has this reviewer graded it" is asked for every mask the queue offers
        sa.Index("ix_review_reviewer_segmentation_id", "reviewer", "segmentation_id"),
        *(sa.CheckConstraint(f"{g} BETWEEN 1 AND 5", name=f"{g}_grade") for g in GRADE_COLUMNS),
    )

    id: int | None = Field(default=None, primary_key=True)
    segmentation_id: int = Field(foreign_key="segmentation.id", nullable=False)
    reviewer: str = Field(sa_type=sa.String(128), nullable=False)
    overall: int = Field(sa_type=sa.SmallInteger, nullable=False)
    right_lung: int | None = Field(default=None, sa_type=sa.SmallInteger)
    left_lung: int | None = Field(default=None, sa_type=sa.SmallInteger)
    heart: int | None = Field(default=None, sa_type=sa.SmallInteger)
    comment: str | None = Field(default=None, sa_type=sa.Text)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, nullable=False)


class MaskComparison(StorageModel, table=True):
    """How a segmentation agrees with another model's mask of the same image (paired by
    dataset and dataset image id), as the last ``chexmask compare`` of the two found it.

    Kept once per direction, both models on each row (``model`` is the segmentation's
    own, ``other_model`` the other side's), so "masks of A that disagree with B's" is
    a lookup on this table alone from either side; one row per segmentation and other
    model (migration 0009): the latest pairing replaces an earlier one. ``dice_min``,
    the lowest of the organs' Dice, is the agreement the filters use: an image
    disagrees when any organ does.
    """

    __tablename__ = "comparison"
    __table_args__ = (
        sa.UniqueConstraint("segmentation_id", "other_model"),
        sa.Index("ix_comparison_other_model_dice_min", "other_model", "dice_min"),
        sa.Index("ix_comparison_model_other_model", "model", "other_model"),
    )

    id: int | None = Field(default=None, primary_key=True)
    segmentation_id: int = Field(foreign_key="segmentation.id", nullable=False)
    other_segmentation_id: int = Field(foreign_key="segmentation.id", nullable=False)
    other_model: str = Field(sa_type=sa.String(128), nullable=False)
    model: str = Field(sa_type=sa.String(128), nullable=False)  # the segmentation's own (migration 0009)
    frame: str = Field(sa_type=sa.String(16), nullable=False)  # "original" or "1024": where the masks met
    dice_min: float = Field(nullable=False)
    dice_right_lung: float = Field(nullable=False)
    dice_left_lung: float = Field(nullable=False)
    dice_heart: float = Field(nullable=False)
    # pixels of the frame; NULL when only one of the two masks is empty (no finite distance)
    hausdorff_right_lung: float | None = None
    hausdorff_left_lung: float | None = None
    hausdorff_heart: float | None = None
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, nullable=False)


class DicomPush(StorageModel, table=True):
    """Sending one segmentation's DICOM SEG and SR to one destination (``dicom:AET@host:port``
    or ``stow:URL``), with what came of it: nothing sent is lost or silent.

    A pending or failed push with a ``retry_at`` is (re)sent by a sweep once it is
    due; a pending one's ``retry_at`` is how long its sender holds it, so a push whose
    sender died is taken up. A failure is retried with growing waits until it has
    been failing for CHEXMASK_RETRY_FAILED_FOR (counted from ``failing_since``), after
    which ``retry_at`` is empty and only ``chexmask push`` sends it again.
    """

    __tablename__ = "dicom_push"
    __table_args__ = (
        sa.UniqueConstraint("segmentation_id", "destination"),
        sa.Index("ix_dicom_push_retry_at", "retry_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    segmentation_id: int = Field(foreign_key="segmentation.id", nullable=False)
    destination: str = Field(sa_type=sa.String(512), nullable=False)
    status: PushStatus = Field(default=PushStatus.PENDING, sa_type=_enum(PushStatus), nullable=False)
    reason: str | None = Field(default=None, sa_type=sa.Text)
    attempts: int = Field(default=0, nullable=False)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, nullable=False)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, nullable=False)
    pushed_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    retry_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    failing_since: datetime | None = Field(default=None, sa_type=UTCDateTime)
