"""Stored per-image comparisons between two models' masks (``chexmask compare``), so
queries and the API can filter on how a mask agrees with another model's.

A new table: existing data is untouched.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copy of the type in models.py: a migration must not change when the models do.
TIMESTAMP = sa.DateTime(timezone=True)
ORGANS = ("right_lung", "left_lung", "heart")


def upgrade() -> None:
    op.create_table(
        "comparison",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("segmentation_id", sa.Integer(), nullable=False),
        sa.Column("other_segmentation_id", sa.Integer(), nullable=False),
        sa.Column("other_model", sa.String(128), nullable=False),
        sa.Column("frame", sa.String(16), nullable=False),
        sa.Column("dice_min", sa.Float(), nullable=False),
        *(sa.Column(f"dice_{organ}", sa.Float(), nullable=False) for organ in ORGANS),
        *(sa.Column(f"hausdorff_{organ}", sa.Float(), nullable=True) for organ in ORGANS),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_comparison"),
        sa.ForeignKeyConstraint(
            ["segmentation_id"], ["segmentation.id"], name="fk_comparison_segmentation_id_segmentation"
        ),
        sa.ForeignKeyConstraint(
            ["other_segmentation_id"], ["segmentation.id"], name="fk_comparison_other_segmentation_id_segmentation"
        ),
        sa.UniqueConstraint(
            "segmentation_id", "other_segmentation_id", name="uq_comparison_segmentation_id_other_segmentation_id"
        ),
    )
    op.create_index("ix_comparison_other_model_dice_min", "comparison", ["other_model", "dice_min"])


def downgrade() -> None:
    op.drop_table("comparison")
