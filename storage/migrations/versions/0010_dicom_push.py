"""Pushes of the DICOM SEG and SR to configured destinations (worker/push.py): one row
per segmentation and destination, with its outcome, reason and next retry.

A new table: existing data is untouched.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copy of the type in models.py: a migration must not change when the models do.
TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "dicom_push",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("segmentation_id", sa.Integer(), nullable=False),
        sa.Column("destination", sa.String(512), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.Column("pushed_at", TIMESTAMP, nullable=True),
        sa.Column("retry_at", TIMESTAMP, nullable=True),
        sa.Column("failing_since", TIMESTAMP, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_dicom_push"),
        sa.ForeignKeyConstraint(
            ["segmentation_id"], ["segmentation.id"], name="fk_dicom_push_segmentation_id_segmentation"
        ),
        sa.UniqueConstraint("segmentation_id", "destination", name="uq_dicom_push_segmentation_id_destination"),
    )
    op.create_index("ix_dicom_push_retry_at", "dicom_push", ["retry_at"])


def downgrade() -> None:
    op.drop_table("dicom_push")
