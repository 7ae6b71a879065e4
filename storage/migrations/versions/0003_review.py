"""Expert review: grades of a segmentation, overall and per organ, by reviewer.

Revision ID: 0003
Revises: 0002
Create Date: 2025-01-15
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copy of the type in models.py: a migration must not change when the models do.
TIMESTAMP = sa.DateTime(timezone=True)
GRADES = ("overall", "right_lung", "left_lung", "heart")


def upgrade() -> None:
    op.create_table(
        "review",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("segmentation_id", sa.Integer(), nullable=False),
        sa.Column("reviewer", sa.String(128), nullable=False),
        sa.Column("overall", sa.SmallInteger(), nullable=False),
        sa.Column("right_lung", sa.SmallInteger(), nullable=True),
        sa.Column("left_lung", sa.SmallInteger(), nullable=True),
        sa.Column("heart", sa.SmallInteger(), nullable=True),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_review"),
        sa.ForeignKeyConstraint(
            ["segmentation_id"], ["segmentation.id"], name="fk_review_segmentation_id_segmentation"
        ),
        *(sa.CheckConstraint(f"{g} BETWEEN 1 AND 5", name=f"ck_review_{g}_grade") for g in GRADES),
    )
    op.create_index("ix_review_segmentation_id", "review", ["segmentation_id"])
    op.create_index("ix_review_reviewer_segmentation_id", "review", ["reviewer", "segmentation_id"])


def downgrade() -> None:
    op.drop_table("review")
