"""Measurements of each segmentation (worker/measure.py): CTR, organ areas in pixels
and mm^2, the heart/lung area ratio, and the pixel spacing the mm^2 values use.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COLUMNS = (
    ("ctr", sa.Float()),
    ("right_lung_area_px", sa.Integer()),
    ("left_lung_area_px", sa.Integer()),
    ("heart_area_px", sa.Integer()),
    ("heart_lung_area_ratio", sa.Float()),
    ("right_lung_area_mm2", sa.Float()),
    ("left_lung_area_mm2", sa.Float()),
    ("heart_area_mm2", sa.Float()),
    ("pixel_spacing_row_mm", sa.Float()),
    ("pixel_spacing_col_mm", sa.Float()),
    ("pixel_spacing_source", sa.String(32)),
)


def upgrade() -> None:
    # Nullable columns: existing rows keep their data and read NULL (not measured). No
    # backfill here: it would draw three masks per row at full resolution, minutes per
    # million rows inside one migration transaction.
    with op.batch_alter_table("segmentation") as batch:
        for name, type_ in _COLUMNS:
            batch.add_column(sa.Column(name, type_, nullable=True))
    op.create_index("ix_segmentation_ctr", "segmentation", ["ctr"])


def downgrade() -> None:
    op.drop_index("ix_segmentation_ctr", table_name="segmentation")
    with op.batch_alter_table("segmentation") as batch:
        for name, _ in reversed(_COLUMNS):
            batch.drop_column(name)
