"""Why QC did not score a segmentation (bank switched off, missing, ...): qc_reason.

Revision ID: 0004
Revises: 0003
Create Date: 2024-12-10
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A nullable column: existing rows keep their data and read NULL (no reason recorded).
    with op.batch_alter_table("segmentation") as batch:
        batch.add_column(sa.Column("qc_reason", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("segmentation") as batch:
        batch.drop_column("qc_reason")
