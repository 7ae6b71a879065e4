"""Leases and automatic retries: who holds an image (or a QC) and until when, and
when a failed image is tried again. Adds nullable columns only, so existing rows
keep their data; a row in ``processing`` from before has no lease and is taken up
by the next sweep.

Revision ID: 0002
Revises: 0001
Create Date: 2025-01-20
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.add_column("source_image", sa.Column("lease_owner", sa.String(128), nullable=True))
    op.add_column("source_image", sa.Column("lease_expires_at", TIMESTAMP, nullable=True))
    op.add_column("source_image", sa.Column("retry_at", TIMESTAMP, nullable=True))
    op.add_column("source_image", sa.Column("failing_since", TIMESTAMP, nullable=True))
    op.create_index("ix_source_image_retry_at", "source_image", ["retry_at"])
    op.add_column("segmentation", sa.Column("qc_lease_owner", sa.String(128), nullable=True))
    op.add_column("segmentation", sa.Column("qc_lease_expires_at", TIMESTAMP, nullable=True))
    op.create_index("ix_segmentation_qc_status", "segmentation", ["qc_status"])


def downgrade() -> None:
    op.drop_index("ix_segmentation_qc_status", "segmentation")
    op.drop_column("segmentation", "qc_lease_expires_at")
    op.drop_column("segmentation", "qc_lease_owner")
    op.drop_index("ix_source_image_retry_at", "source_image")
    for column in ("failing_since", "retry_at", "lease_expires_at", "lease_owner"):
        op.drop_column("source_image", column)
